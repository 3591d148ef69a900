"""From a listed source to a validated plan: routing through the model's own loaders on
meta (no Ray), validation, scheduling. Used by the coordinator and by ``tp-reload plan``."""

from __future__ import annotations

import torch

from actors.model import ModelSpec
from actors.reload import Routing, route_tensors
from orchestrator.errors import CheckpointError, ConfigError
from orchestrator.inventory import Source, TensorInfo
from orchestrator.plan import Order, Plan, PlannedTensor, make_plan
from orchestrator.validate import validate_source
from quant import QuantConfig

CHECKPOINT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def resolve_dtype(requested: str, infos: list[TensorInfo]) -> str:
    """'auto' -> the dtype the checkpoint stores its embedding in."""
    if requested != "auto":
        return requested
    for info in infos:
        if info.name.endswith("embed_tokens.weight"):
            if info.dtype not in CHECKPOINT_DTYPES:
                raise ConfigError(f"{info.file}: '{info.name}' has dtype {info.dtype}; "
                                  "set EngineConfig.dtype explicitly")
            return CHECKPOINT_DTYPES[info.dtype]
    raise CheckpointError("checkpoint has no '*embed_tokens.weight'; set EngineConfig.dtype")


CachedRouting = tuple[tuple, Routing]


def build_plan(source: Source, *, spec: ModelSpec, tp: int, dtype: str,
               quant: QuantConfig, bucket_bytes: int, order: Order,
               cached: CachedRouting | None = None, strict: bool = True,
               require_all: bool = False) -> tuple[Plan, CachedRouting]:
    """Route ``source`` through the model (dry run on meta, no Ray), validate it and
    schedule it. ``cached`` is reused when the source lists the same names, shapes and
    dtypes, as an RL loop's sources do step after step. CheckpointError names what does not
    fit; ``require_all`` (a first load) also refuses a source that leaves a layer empty."""
    if not source.tensors:
        raise CheckpointError(f"{source.description}: the source has no tensors")
    key = tuple((t.name, t.shape, t.dtype) for t in source.tensors)
    if cached is None or cached[0] != key:
        tensors = [(t.name, t.shape, t.torch_dtype) for t in source.tensors]
        try:
            routing = route_tensors(spec, tp, getattr(torch, dtype), quant, tensors)
        except ValueError as exc:
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
