"""The reload engine's records: per call, per layer, per reload."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from actors.lazy import Bounds
from actors.reload.meta import PrefetchedWeight, RecordedCopy
from actors.reload.model import LayerRecord


class DryRun(NamedTuple):
    """What a loader call does, from its run on meta."""

    written: int
    """Elements it writes into the param, capped at the param's size."""
    reads: list[Bounds]
    """The source boxes it reads."""
    result: Any
    """What the loader returns."""
    writes: int
    """Every element write or in-place change in the param's storage, uncapped: a copy and
    then an in-place scale of the same elements count twice."""
    copies: tuple[RecordedCopy, ...] | None = None
    """Those writes as copies of whole boxes read, when that is all they were and the model
    replays copies (``ReloadableModel.replays_copies``); None: replay the loader."""


@dataclass(slots=True)
class BufferedCall:
    param: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    weight: PrefetchedWeight
    source_name: str
    """Checkpoint tensor name, for error messages."""
    copies: tuple[RecordedCopy, ...] | None = None
    """``DryRun.copies`` of this call."""


@dataclass(slots=True)
class LayerLoad:
    """One layer's progress during one reload."""

    record: LayerRecord
    kernel: dict[str, torch.Tensor] | None
    calls: list[BufferedCall] = field(default_factory=list)
    loaded_numel: int = 0
    per_param: dict[str, int] = field(default_factory=dict)
    writes: dict[str, int] = field(default_factory=dict)
    """Per param, every element write its calls make, uncapped (``DryRun.writes``)."""
    shards: dict[str, list[Any]] = field(default_factory=dict)
    settled: bool = False
    """No more work this reload: processed, or skipped after a failure."""
    processed: bool = False
    """Its new weights are in the kernel tensors."""


@dataclass(slots=True)
class RankReloadStats:
    bytes_read: int
    peak_buffered_bytes: int
    stage_seconds: dict[str, float]
    layers_reloaded: list[str]
    layers_kept: list[str]
    warnings: list[str]
    buffered_timeline: list[int]
    layer_seconds: dict[str, float]
    """Per layer: seconds spent reading, buffering and processing it on this rank."""


@dataclass(slots=True)
class PlannedRead:
    """Plan mode: where a source tensor goes on this rank and what it costs."""

    layer: str
    param: str
    """Full name of the param it writes, e.g. ``model.layers.0.self_attn.qkv_proj.weight``."""
    param_dtype: torch.dtype
    written: int
    """Elements of the param it writes."""
    shard: Any
    rank_bytes: int
    boxes: tuple[tuple[tuple[int, int], ...], ...] = ()
    """The boxes of the source tensor it reads (source coordinates)."""
