"""Routing of source tensors, found by dry-running each rank's own loaders: which layer every
tensor feeds and how many bytes each rank keeps of it. The planner uses this instead of
restating the shard rules, so prediction and execution cannot disagree.

``route_rank`` runs where a rank's model is: on meta copies in the driver (native engine) or
on the live model inside the rank (vLLM), which it leaves as it found it. ``merge_routes``
combines the ranks' answers into the ``Routing`` the planner reads.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from actors.lazy import Bounds
from actors.reload.errors import ReloadError, UnknownTensorError
from actors.reload.model import is_optional
from actors.reload.reload_engine import ReloadEngine
from actors.reload.types import PlannedRead

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]
"""(name, shape, dtype) of one source tensor."""


@dataclass(frozen=True, slots=True)
class LayerSummary:
    name: str
    process_last: bool
    kind: str
    params: dict[str, int]
    """Full name of each required (non-optional) param -> its elements on this rank."""


@dataclass(frozen=True, slots=True)
class RankRoute:
    """One rank's answer: the loader calls each source tensor makes there."""

    reads: dict[str, tuple[PlannedRead, ...]]
    """Kept tensors -> the calls they make (a tensor may feed several shards)."""
    skipped: tuple[str, ...]
    unknown: tuple[str, ...]
    layers: tuple[LayerSummary, ...]
    """Every layer of the model in processing order."""


def route_rank(engine: ReloadEngine, tensors: list[TensorSpec]) -> RankRoute:
    """Dry-run every tensor through the rank's model in plan mode; ReloadError naming the
    tensor when its shape does not fit."""
    reads: dict[str, tuple[PlannedRead, ...]] = {}
    skipped: list[str] = []
    unknown: list[str] = []
    engine.start("plan")
    try:
        for name, shape, dtype in tensors:
            try:
                calls = engine.plan_tensor(name, shape, dtype)
            except UnknownTensorError:
                unknown.append(name)
                continue
            if calls:
                reads[name] = tuple(calls)
            else:
                skipped.append(name)
    finally:
        engine.abort()
    layers = tuple(
        LayerSummary(r.name, r.process_last, r.kind,
                     {f"{r.name}.{n}": p.numel() for n, p in r.placeholders.items()
                      if not is_optional(p)})
        for r in engine.records)
    return RankRoute(reads, tuple(skipped), tuple(unknown), layers)


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
    skipped: tuple[str, ...]
    """Source tensors the engine does not keep (rotary caches, a tied LM head)."""
    unknown: tuple[str, ...]
    """Source tensors matching no parameter (refused unless strict=False)."""
    reads: dict[str, tuple[PlannedRead, ...]]
    """Rank 0's view of each kept source tensor: params, elements written, dtypes."""
    layer_params: dict[str, dict[str, int]]
    """Layer -> its required params -> elements (rank 0); optional params left out."""
    layer_kinds: dict[str, str]
    """Layer -> its kind (``dense``, ``experts``)."""
    rank_boxes: tuple[dict[str, tuple[Bounds, ...]], ...] = ()
    """Per rank: kept source tensor -> the distinct boxes of it the rank reads."""


def covers(shape: tuple[int, ...], boxes: list[Bounds]) -> bool:
    """Whether the union of ``boxes`` is the whole tensor (checked cell by cell on the grid
    their edges cut: a handful of cells for TP slabs)."""
    edges = [sorted({0, n, *(b[d][0] for b in boxes), *(b[d][1] for b in boxes)})
             for d, n in enumerate(shape)]
    cells = itertools.product(*(zip(e[:-1], e[1:], strict=True) for e in edges))
    return bool(boxes) and all(
        any(all(lo <= c_lo and c_hi <= hi for (lo, hi), (c_lo, c_hi) in zip(box, cell,
                                                                           strict=True))
            for box in boxes)
        for cell in cells)


def merge_routes(routes: list[RankRoute], tensors: list[TensorSpec]) -> Routing:
    """One routing from every rank's route (rank order). Layers come from rank 0: every
    rank of an engine has the same layers, only the bytes differ. ReloadError when the ranks
    together leave part of a tensor unread: it is larger than the model's (a loader that
    narrows without checking the full extent would silently cut it)."""
    first = routes[0]
    for name, shape, _ in tensors:
        boxes = [box for route in routes for call in route.reads.get(name, ())
                 for box in call.boxes]
        if name in first.reads and not covers(shape, boxes):
            raise ReloadError(f"checkpoint tensor '{name}' has shape {shape}, larger than the "
                              "model reads of it on any rank (shape mismatch)")
    layer_of: dict[str, str] = {}
    for name, calls in first.reads.items():
        layers = {c.layer for c in calls}
        if len(layers) != 1:
            raise ReloadError(f"checkpoint tensor '{name}' feeds several layers "
                              f"{sorted(layers)}")
        layer_of[name] = calls[0].layer
    rank_bytes = {name: tuple(sum(c.rank_bytes for c in route.reads.get(name, ()))
                              for route in routes)
                  for name in layer_of}
    return Routing(
        layer_order=tuple(s.name for s in first.layers),
        process_last=frozenset(s.name for s in first.layers if s.process_last),
        layer_of=layer_of, rank_bytes=rank_bytes, skipped=first.skipped,
        unknown=first.unknown, reads=first.reads,
        layer_params={s.name: s.params for s in first.layers},
        layer_kinds={s.name: s.kind for s in first.layers},
        rank_boxes=tuple({name: tuple(dict.fromkeys(b for c in calls for b in c.boxes))
                          for name, calls in route.reads.items()} for route in routes),
    )
