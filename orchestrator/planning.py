"""From a listed source to a validated plan: routing through the engine's own loaders (on
meta copies in the driver, or on the ranks), validation, scheduling. Used by the
coordinator and by ``tp-reload plan``."""

from __future__ import annotations

from collections.abc import Callable

from actors.dtypes import ENGINE_DTYPES, dtype_name
from actors.reload import ReloadError, Routing, TensorSpec
from orchestrator.errors import CheckpointError, ConfigError
from orchestrator.inventory import Source, TensorInfo
from orchestrator.plan import Order, Plan, PlannedTensor, make_plan
from orchestrator.validate import validate_source


def resolve_dtype(requested: str, infos: list[TensorInfo]) -> str:
    """'auto' -> the dtype the checkpoint stores its embedding in."""
    if requested != "auto":
        return requested
    for info in infos:
        if info.name.endswith("embed_tokens.weight"):
            if info.torch_dtype not in ENGINE_DTYPES:
                raise ConfigError(f"{info.file}: '{info.name}' has dtype {info.dtype}; "
                                  "set EngineConfig.dtype explicitly")
            return dtype_name(info.torch_dtype)
    raise CheckpointError("checkpoint has no '*embed_tokens.weight'; set EngineConfig.dtype")


CachedRouting = tuple[tuple, Routing]
Router = Callable[[list[TensorSpec]], Routing]
"""Dry-runs source tensors through every rank's loaders; ReloadError names a misfit."""


def build_plan(source: Source, *, route: Router, bucket_bytes: int, order: Order,
               cached: CachedRouting | None = None, strict: bool = True,
               require_all: bool = False) -> tuple[Plan, CachedRouting]:
    """Route ``source`` through the model (a dry run of its loaders), validate it and
    schedule it. ``cached`` is reused when the source lists the same names, shapes and
    dtypes, as an RL loop's sources do step after step. CheckpointError names what does not
    fit; ``require_all`` (a first load) also refuses a source that leaves a layer empty."""
    if not source.tensors:
        raise CheckpointError(f"{source.description}: the source has no tensors")
    key = tuple((t.name, t.shape, t.dtype) for t in source.tensors)
    if cached is None or cached[0] != key:
        try:
            routing = route([(t.name, t.shape, t.torch_dtype) for t in source.tensors])
        except ReloadError as exc:
            raise CheckpointError(f"{source.description}: {exc}") from exc
        cached = (key, routing)
    routing = cached[1]
    validate_source(source, routing, strict=strict, require_all=require_all)
    tensors = [
        PlannedTensor(t.name, routing.layer_of[t.name], t.nbytes, routing.rank_bytes[t.name],
                      t.file)
        for t in source.tensors if t.name in routing.layer_of
    ]
    plan = make_plan(tensors, routing.layer_order, bucket_bytes=bucket_bytes, order=order,
                     process_last=routing.process_last)
    return plan, cached
