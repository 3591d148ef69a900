"""Online quantization methods, registered by name (``EngineConfig.quantization``)."""

from __future__ import annotations

from collections.abc import Callable

from quant.base import LinearMethod, UnquantizedLinearMethod

LINEAR_METHODS: dict[str | None, Callable[[], LinearMethod]] = {
    None: UnquantizedLinearMethod,
}


def get_linear_method(name: str | None) -> LinearMethod:
    """A fresh method instance for one layer; ValueError naming the known methods."""
    if name not in LINEAR_METHODS:
        known = ", ".join(repr(k) for k in LINEAR_METHODS)
        raise ValueError(f"unknown quantization {name!r} (known: {known})")
    return LINEAR_METHODS[name]()


__all__ = ["LINEAR_METHODS", "LinearMethod", "UnquantizedLinearMethod", "get_linear_method"]
