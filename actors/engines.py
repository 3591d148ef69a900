"""The inference engines a rank actor can host, and what the driver must know about each.

An engine is one folder under ``actors/`` with
  * a rank runtime (``actors.runtime.RankRuntime``): builds one TP rank, serves it and hands
    the reload engine its model through ``actors.reload.ReloadableModel``;
  * ``check_options(options)``, run when a config is built: refuses option values the
    engine never takes. Pure: it reads no file and imports no engine;
  * ``check_model(options)``, run by ``start()``/``plan()`` before anything is placed: reads
    the checkpoint's config.json, refuses what the engine cannot run with it on this platform
    (naming what it can) and returns the parsed model spec when the driver routes sources.
All are named here as import paths, so the driver never imports an engine it does not use.
Adding an engine is its folder plus one entry in ``ENGINES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """What every rank needs to build its part of an engine (a picklable subset of the
    driver's ``EngineConfig``)."""

    engine: str
    """Key in ``ENGINES``."""
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


@dataclass(frozen=True, slots=True)
class EngineKind:
    name: str
    runtime: str
    """``module:Class`` of the rank runtime."""
    check_options: str
    """``module:function(options) -> None``: ValueError for an option value the engine
    never takes (no I/O)."""
    check_model: str
    """``module:function(options) -> ModelSpec | None``: ValueError naming what the engine
    cannot run with ``options.model`` here; the spec when ``routes_on_driver``."""
    routes_on_driver: bool
    """The driver can route sources on meta copies of every rank (native). Otherwise the
    ranks route them on their live models (vLLM builds its models only inside a rank)."""
    rejoins: bool
    """A restarted rank can join its live peers' new process group. Otherwise every rank of
    the engine is restarted with it (vLLM forms its group once per process)."""
    serves_logits: bool
    """``forward`` returns raw logits (vLLM serves tokens and log-probs)."""
    stages: bool
    """Its model has a ``twin`` (``ReloadableModel.twin``), so it can stage reloads while
    it serves (``reload(staged=True)``)."""


ENGINES: dict[str, EngineKind] = {
    "native": EngineKind("native", "actors.model.runtime:NativeRuntime",
                         "actors.model.runtime:check_options",
                         "actors.model.runtime:check_model", routes_on_driver=True,
                         rejoins=True, serves_logits=True, stages=True),
    "vllm": EngineKind("vllm", "actors.vllm.runtime:VllmRuntime",
                       "actors.vllm.platform:check_options",
                       "actors.vllm.platform:check_model", routes_on_driver=False,
                       rejoins=False, serves_logits=False, stages=True),
}


def engine_kind(name: str) -> EngineKind:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r} (known: {', '.join(ENGINES)})")
    return ENGINES[name]


def load_object(path: str) -> Any:
    """``module:attribute`` -> the attribute (imports the module)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)
