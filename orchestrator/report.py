"""What the orchestrator hands back: ``ReloadReport`` (one load or reload) and ``Samples``
(rollouts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from actors.reload import RANK_STAGES

if TYPE_CHECKING:
    from actors.transports.base import Source
    from orchestrator.plan import Plan

RankKey = tuple[int, int]

STAGES = ("plan", *RANK_STAGES)
"""A reload's stages: the driver's planning, then each rank's."""


@dataclass(frozen=True, slots=True)
class ReloadReport:
    """What one load or reload did. Times are wall seconds; per-stage times are the slowest
    rank's (ranks work in parallel), plus the driver's own planning and packing."""

    version: int
    """Version now served (0 for the first load)."""
    seconds: float
    """The whole reload as its caller waits for it, from the plan's start until every rank
    serves the new version (a plain reload: its drain, stream, commit and resume; a staged
    one: through its flip and commit)."""
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
    bytes_sent: dict[int, int] = field(default_factory=dict)
    """Trainer sources: bytes each trainer rank sent, straight to the engine ranks."""
    staged: bool = False
    """Streamed into staging tensors while the engines served (``reload(staged=True)``)."""
    pause_seconds: float = 0.0
    """How long serving calls had to wait: the flip of a staged reload, the whole of a plain
    one."""
    staging_bytes: int = 0
    """Staged reloads: the most staging memory any rank held (one more copy of the layers
    the source touched)."""
    transport: str = ""
    """How the source's bytes travelled (``files``, ``shared_memory``, ``object_store``,
    ``trainer_stream``, or a registered transport's name)."""
    rollback_bytes: int = 0
    """What the commit log keeps in the node's shared memory after this reload to roll back
    from (in-memory sources: one copy per node, not per rank)."""

    @classmethod
    def from_ranks(cls, stats: dict[RankKey, dict[str, Any]], *, version: int, seconds: float,
                   stage_seconds: dict[str, float], plan: Plan, source: Source,
                   bytes_sent: dict[int, int], layer_kinds: dict[str, str],
                   transport: str = "") -> ReloadReport:
        """The report of one load from every rank's ``finish_reload`` statistics."""
        first = stats[min(stats)]
        bytes_by_kind: dict[str, int] = {}
        for tensor in plan.tensors:
            kind = layer_kinds[tensor.layer]
            bytes_by_kind[kind] = bytes_by_kind.get(kind, 0) + tensor.nbytes
        seconds_by_kind: dict[str, float] = {}
        for rank_stats in stats.values():
            for layer, spent in rank_stats["layer_seconds"].items():
                kind = layer_kinds[layer]
                seconds_by_kind[kind] = seconds_by_kind.get(kind, 0.0) + spent
        return cls(
            version=version, seconds=seconds,
            stage_seconds={name: stage_seconds[name] for name in STAGES},
            bytes_read={key: s["bytes_read"] for key, s in sorted(stats.items())},
            peak_buffered_bytes=max(s["peak_buffered_bytes"] for s in stats.values()),
            predicted_peak_buffered_bytes=plan.predicted_peak_buffered_bytes,
            layers_reloaded=first["layers_reloaded"], layers_kept=first["layers_kept"],
            warnings=[f"engine {e} rank {r}: {w}" for (e, r), s in sorted(stats.items())
                      for w in s["warnings"]],
            order=plan.order, source=source.description, source_bytes=source.nbytes,
            buckets=len(plan.buckets), buffered_timeline=first["buffered_timeline"],
            bytes_sent=bytes_sent, bytes_by_kind=bytes_by_kind, seconds_by_kind=seconds_by_kind,
            transport=transport)

    def share(self, kind: str) -> tuple[float, float]:
        """(fraction of source bytes, fraction of rank seconds) spent on layers of ``kind``,
        e.g. ``report.share("experts")``."""
        total_bytes = sum(self.bytes_by_kind.values())
        total_seconds = sum(self.seconds_by_kind.values())
        return (self.bytes_by_kind.get(kind, 0) / total_bytes if total_bytes else 0.0,
                self.seconds_by_kind.get(kind, 0.0) / total_seconds if total_seconds else 0.0)

    def table(self) -> str:
        """The report as an aligned text table (serve logs, the RLHF example)."""
        mb = 1e6
        rows = [
            ("version", str(self.version)),
            ("source", f"{self.source} ({self.source_bytes / mb:.2f} MB, {self.buckets} "
                       f"buckets, {self.order} order)"),
            ("seconds", f"{self.seconds:.3f}  (" + ", ".join(
                f"{k} {v:.3f}" for k, v in self.stage_seconds.items()) + ")"),
            ("bytes read", ", ".join(f"e{e}/r{r} {b / mb:.2f} MB"
                                     for (e, r), b in self.bytes_read.items())),
            ("peak buffered", f"{self.peak_buffered_bytes / mb:.3f} MB per rank (predicted "
                              f"{self.predicted_peak_buffered_bytes / mb:.3f} MB)"),
            ("layers", f"{len(self.layers_reloaded)} reloaded, {len(self.layers_kept)} kept"),
            ("paused", f"{self.pause_seconds:.3f} s serving" + (
                f" (staged, {self.staging_bytes / mb:.2f} MB staging per rank)"
                if self.staged else "")),
        ]
        if self.bytes_sent:
            rows.append(("trainer sent", ", ".join(f"t{t} {b / mb:.2f} MB"
                                                   for t, b in self.bytes_sent.items())))
        if self.bytes_by_kind.get("experts"):
            nbytes, seconds = self.share("experts")
            rows.append(("expert layers", f"{nbytes:.0%} of bytes, {seconds:.0%} of rank time"))
        rows += [("warning", w) for w in self.warnings]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
