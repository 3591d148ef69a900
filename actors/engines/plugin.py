"""The engine interface: everything the driver and the rank actor may ask of an inference
engine, declared in one class.

An engine is one folder under ``actors/engines/`` holding
  * an ``EnginePlugin`` subclass (its driver side): option and model checks, an optional
    router that plans sources in the driver, and the capabilities it declares;
  * a rank runtime (``actors.engines.runtime.RankRuntime``, named by import path so the
    driver never imports it): builds one TP rank, serves it and hands the reload engine its
    model through ``actors.reload.ReloadableModel``.
It takes part once registered (``actors.engines.register_engine``); the built-in engines are
registered by name. The plugin object travels to every rank with the engine's options.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from actors.engines.runtime import RankRuntime
    from actors.reload import Routing, TensorSpec

Capability = Literal["logits", "kv_calibration", "cuda_graphs", "staging", "rejoin"]
CAPABILITIES: tuple[Capability, ...] = ("logits", "kv_calibration", "cuda_graphs", "staging",
                                        "rejoin")
DriverRouter = Callable[["list[TensorSpec]", logging.Logger], "Routing"]
"""Dry-runs source tensors through every rank's loaders in the driver (on meta copies)."""


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """What every rank needs to build its part of an engine (a picklable subset of the
    driver's ``EngineConfig``)."""

    engine: str
    """The registered engine's name."""
    model: str
    """Checkpoint directory with the model's config.json."""
    tensor_parallel_size: int
    dtype: str
    """Resolved engine dtype (``float32``, ``bfloat16``, ``float16``)."""
    quantization: str | None
    kv_cache_dtype: str
    device: str
    """``cpu`` or ``cuda``."""
    num_cpus: float
    """CPU cores the rank may use (its Ray CPU request)."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the engine's constructor (vLLM's ``LLM(...)``)."""


class EnginePlugin:
    """One inference engine as tp-reload drives it. Subclasses set ``name`` and
    ``runtime`` and override the hooks whose defaults do not fit."""

    name: ClassVar[str]
    runtime: ClassVar[str]
    """``module:Class`` of the rank runtime, imported only inside a rank actor."""
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    """What the engine does beyond serving tokens; each is a mixin its runtime implements
    (``actors.engines.runtime``), checked when a rank builds it:
    ``logits`` (raw logits, ``forward``), ``kv_calibration`` (FP8 KV scales from a forward),
    ``cuda_graphs``, ``staging`` (its model builds a twin: staged reloads), ``rejoin`` (a
    restarted rank joins its live peers' new group; otherwise the whole engine restarts)."""

    def check_options(self, options: EngineOptions) -> None:
        """Run when a config is built: ValueError for an option value the engine never
        takes. Pure: no I/O, no engine import. Default: every value is left to the build."""

    def check_model(self, options: EngineOptions) -> None:
        """Run by ``start()``/``plan()`` before anything is placed: ValueError naming what
        the engine cannot run with ``options.model`` on this platform. Default: the ranks'
        build is the check."""

    def driver_router(self, options: EngineOptions) -> DriverRouter | None:
        """A router that plans sources in the driver, or None: the ranks of engine 0 route
        them on their live models (the default; vLLM builds its models only in a rank)."""
        return None

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def runtime_class(self) -> type[RankRuntime]:
        module, _, attribute = self.runtime.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def __repr__(self) -> str:
        return f"<engine {self.name!r}>"
