"""Routing of source tensors, computed by dry-running each rank's loaders on meta models:
which layer every tensor feeds and how many bytes each rank keeps of it. The planner uses
this instead of restating the shard rules, so prediction and execution cannot disagree."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from actors.model import ModelSpec, TPGroup, UnknownTensorError, build_model
from actors.reload.engine import ReloadEngine
from actors.reload.layers import is_optional
from actors.reload.types import PlannedRead
from quant import QuantConfig

log = logging.getLogger("tp_reload.plan")


@dataclass(frozen=True, slots=True)
class Routing:
    layer_order: tuple[str, ...]
    """Every layer of the model in processing order (process_last layers at the end)."""
    process_last: frozenset[str]
    """Attention/KV-scale layers, finalized after all others."""
    layer_of: dict[str, str]
    """Source tensor name -> layer it feeds."""
    rank_bytes: dict[str, tuple[int, ...]]
    """Source tensor name -> bytes of it that each rank reads and buffers."""
    layer_rank_bytes: dict[str, tuple[int, ...]]
    """Layer -> bytes each rank buffers for it when the source carries all of it."""
    skipped: tuple[str, ...]
    """Source tensors the engine does not keep (rotary caches, a tied LM head)."""
    unknown: tuple[str, ...]
    """Source tensors matching no parameter (refused unless strict=False)."""
    reads: dict[str, PlannedRead]
    """Rank 0's view of each kept source tensor: param, elements written, dtype."""
    layer_params: dict[str, dict[str, int]]
    """Layer -> its required params -> elements (rank 0); optional params left out."""
    layer_kinds: dict[str, str]
    """Layer -> its kind (``dense``, ``experts``)."""


def route_tensors(spec: ModelSpec, tp: int, dtype: torch.dtype, quant: QuantConfig,
                  tensors: list[tuple[str, tuple[int, ...], torch.dtype]]) -> Routing:
    """ValueError naming the tensor when a shape does not fit the model; names that match
    nothing are collected in ``unknown`` (the caller decides whether to refuse them)."""
    meta = torch.device("meta")
    engines = []
    for rank in range(tp):
        model = build_model(spec, tp=TPGroup(rank, tp), dtype=dtype, device=meta,
                            quant=quant)
        engine = ReloadEngine(model, meta, log)
        engine.start("plan")
        engines.append(engine)
    layer_of: dict[str, str] = {}
    rank_bytes: dict[str, tuple[int, ...]] = {}
    skipped: list[str] = []
    unknown: list[str] = []
    first: dict[str, PlannedRead] = {}
    for name, shape, tensor_dtype in tensors:
        try:
            reads = [engine.plan_tensor(name, shape, tensor_dtype) for engine in engines]
        except UnknownTensorError:
            unknown.append(name)
            continue
        if reads[0] is None:
            skipped.append(name)
            continue
        first[name] = reads[0]
        layer_of[name] = reads[0].layer
        rank_bytes[name] = tuple(r.rank_bytes for r in reads)
    records = engines[0].records
    layer_bytes: dict[str, list[int]] = {}
    for name, layer in layer_of.items():
        totals = layer_bytes.setdefault(layer, [0] * tp)
        for rank, nbytes in enumerate(rank_bytes[name]):
            totals[rank] += nbytes
    return Routing(
        layer_order=tuple(r.name for r in records),
        process_last=frozenset(r.name for r in records if r.process_last),
        layer_of=layer_of, rank_bytes=rank_bytes,
        layer_rank_bytes={k: tuple(v) for k, v in layer_bytes.items()},
        skipped=tuple(skipped), unknown=tuple(unknown), reads=first,
        layer_params={r.name: {f"{r.name}.{n}": p.numel() for n, p in r.placeholders.items()
                               if not is_optional(p)} for r in records},
        layer_kinds={r.name: r.kind for r in records},
    )
