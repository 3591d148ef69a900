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
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    """Source bytes per layer kind (``dense``; ``experts`` for fused MoE expert layers)."""
    seconds_by_kind: dict[str, float] = field(default_factory=dict)
    """Rank seconds (reading, buffering, processing) per layer kind, summed over ranks."""

    def share(self, kind: str) -> tuple[float, float]:
        """(fraction of source bytes, fraction of rank seconds) spent on layers of ``kind``,
        e.g. ``report.share("experts")``."""
        total_bytes = sum(self.bytes_by_kind.values())
        total_seconds = sum(self.seconds_by_kind.values())
        return (self.bytes_by_kind.get(kind, 0) / total_bytes if total_bytes else 0.0,
                self.seconds_by_kind.get(kind, 0.0) / total_seconds if total_seconds else 0.0)
