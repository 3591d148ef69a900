"""ReloadReport: what one load or reload did, as the coordinator hands it back."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.cluster import RankKey

STAGES = ("plan", "transfer", "load", "process", "finalize")


@dataclass(frozen=True, slots=True)
class ReloadReport:
    """What one load or reload did. Times are wall seconds; per-stage times are the slowest
    rank's (ranks work in parallel), plus the driver's own planning and packing."""

    version: int
    """Version now served (0 for the first load)."""
    seconds: float
    stage_seconds: dict[str, float]
    """plan, transfer (reading or fetching bytes), load (dry runs, buffering), process
    (materialize, replay, quantize, copy into kernel tensors), finalize."""
    bytes_read: dict[RankKey, int]
    """Bytes each (engine, rank) read or copied out of the source: about source_bytes / tp."""
    peak_buffered_bytes: int
    """Measured: the most any rank held in buffered loader calls at once."""
    predicted_peak_buffered_bytes: int
    """The planner's prediction for the order used."""
    layers_reloaded: list[str]
    layers_kept: list[str]
    """Layers the source did not touch: they keep serving their previous tensors."""
    warnings: list[str]
    order: str
    source: str
    source_bytes: int
    buckets: int
    buffered_timeline: list[int] = field(default_factory=list)
    """Engine 0 rank 0: buffered bytes after every arrival and release, in stream order."""
