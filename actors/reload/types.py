"""The reload engine's records: per call, per layer, per reload."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from actors.reload.meta import PrefetchedWeight
from actors.reload.model import LayerRecord


@dataclass(slots=True)
class BufferedCall:
    param: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    weight: PrefetchedWeight
    source_name: str
    """Checkpoint tensor name, for error messages."""


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
