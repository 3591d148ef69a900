"""Online quantization methods, registered by name.

``EngineConfig.quantization`` picks a linear method (``LINEAR_METHODS``) and the fused-expert
method of the same name (``MOE_METHODS``), ``EngineConfig.kv_cache_dtype`` a KV-cache method
(``KV_CACHE_METHODS``). A new method is a class with ``create_weights`` /
``process_weights_after_loading`` / ``apply`` and the ``LayerPolicy`` the reload engine
treats its layers by, added here; no other package changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from quant.base import LayerPolicy, LinearMethod, UnquantizedLinearMethod
from quant.fp8 import Fp8BlockLinearMethod, Fp8LinearMethod, Fp8PerChannelLinearMethod
from quant.kv_cache import Fp8KVCacheMethod, KVCacheMethod
from quant.moe import (
    Fp8BlockMoEMethod,
    Fp8MoEMethod,
    Fp8PerChannelMoEMethod,
    MoEMethod,
    UnquantizedMoEMethod,
    W4A8MoEMethod,
)
from quant.w4a8 import W4A8LinearMethod

LINEAR_METHODS: dict[str | None, Callable[[], LinearMethod]] = {
    None: UnquantizedLinearMethod,
    "fp8": Fp8LinearMethod,
    "fp8_per_channel": Fp8PerChannelLinearMethod,
    "fp8_block": Fp8BlockLinearMethod,
    "w4a8": W4A8LinearMethod,
}
MOE_METHODS: dict[str | None, Callable[[], MoEMethod]] = {
    None: UnquantizedMoEMethod,
    "fp8": Fp8MoEMethod,
    "fp8_per_channel": Fp8PerChannelMoEMethod,
    "fp8_block": Fp8BlockMoEMethod,
    "w4a8": W4A8MoEMethod,
}
assert set(MOE_METHODS) == set(LINEAR_METHODS), "every quantization covers experts too"
KV_CACHE_METHODS: dict[str, Callable[[], KVCacheMethod]] = {
    "auto": KVCacheMethod,
    "fp8": Fp8KVCacheMethod,
}


@dataclass(frozen=True, slots=True)
class QuantConfig:
    linear: str | None = None
    """Linear method name (None: full precision)."""
    kv_cache: str = "auto"
    """KV-cache method name."""

    def __post_init__(self) -> None:
        if self.linear not in LINEAR_METHODS:
            known = ", ".join(repr(k) for k in LINEAR_METHODS)
            raise ValueError(f"unknown quantization {self.linear!r} (known: {known})")
        if self.kv_cache not in KV_CACHE_METHODS:
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache!r} "
                             f"(known: {', '.join(KV_CACHE_METHODS)})")

    def linear_method(self) -> LinearMethod:
        """A fresh instance for one layer."""
        return LINEAR_METHODS[self.linear]()

    def moe_method(self) -> MoEMethod:
        """A fresh instance for one fused-expert layer."""
        return MOE_METHODS[self.linear]()

    def kv_cache_method(self) -> KVCacheMethod:
        return KV_CACHE_METHODS[self.kv_cache]()


__all__ = ["KV_CACHE_METHODS", "LINEAR_METHODS", "MOE_METHODS", "LayerPolicy", "LinearMethod",
           "MoEMethod", "QuantConfig", "UnquantizedLinearMethod"]
