"""The commit log: how every rank gets back to the last committed version.

A reload commits only when every rank of every engine finished it. Each committed source is
logged with the exact bucket messages the ranks received: the first load (or the last reload
that covered every layer) and the partial reloads since. Replaying the log through the normal
load path rebuilds the committed weights bit for bit, because loading and quantization are
deterministic. It serves two failures:

  * a failed reload: every rank is rolled back by replaying the log;
  * a dead rank: Ray restarts the actor empty, it rejoins a new process group and replays
    the log from its first entry.

Memory cost: in-memory sources stay in the node's shared memory (tp-reload's regions, or the
Ray object store: one copy per node, shared by all ranks and engines) while they are in the
log (``node_bytes``, reported after every reload as ``ReloadReport.rollback_bytes``); a
trainer stream stays in the engine ranks, each keeping the boxes it received (its share),
and a restarted rank cannot rebuild it;
checkpoint directories cost nothing but must stay unchanged until superseded; replay checks
their files' size and mtime, and refuses to rebuild from a directory that changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from actors.transports.base import BucketMessage, Delivery, Fingerprint, Source
from orchestrator.errors import RecoveryError


@dataclass(frozen=True, slots=True)
class CommittedSource:
    description: str
    messages: tuple[BucketMessage, ...]
    fingerprints: dict[str, Fingerprint]
    """Checkpoint file -> (size, mtime_ns) when it was committed."""
    rank_kept: int | None = None
    """Id of what every rank keeps to replay this source (a trainer stream), if anything."""
    node_bytes: int = 0
    """Bytes its messages keep in the node's shared memory while it is logged."""

    def check_unchanged(self) -> None:
        for path, expected in self.fingerprints.items():
            try:
                stat = os.stat(path)
            except FileNotFoundError as exc:
                raise RecoveryError(f"cannot restore {self.description}: {path} was deleted "
                                    "after it was committed") from exc
            if (stat.st_size, stat.st_mtime_ns) != expected:
                raise RecoveryError(f"cannot restore {self.description}: {path} changed on "
                                    "disk after it was committed")


def committed(source: Source, delivery: Delivery) -> CommittedSource:
    """What the log keeps of ``source``, as its transport delivered it."""
    return CommittedSource(source.description, tuple(delivery.replay),
                           source.transport.fingerprints(source), delivery.rank_kept,
                           delivery.node_bytes)


@dataclass(slots=True)
class CommitLog:
    entries: list[CommittedSource] = field(default_factory=list)

    def record(self, entry: CommittedSource, covers_every_layer: bool) -> None:
        """A source that covered every layer makes the older entries unnecessary."""
        self.entries = self._after(entry, covers_every_layer)

    def _after(self, entry: CommittedSource, covers_every_layer: bool) -> list[CommittedSource]:
        return [entry] if covers_every_layer else [*self.entries, entry]

    def node_bytes(self) -> int:
        """What the log keeps in the node's shared memory now."""
        return sum(e.node_bytes for e in self.entries)

    def rank_kept(self) -> tuple[int, ...]:
        """Ids of what the log replays from what the engine ranks kept."""
        return _kept(self.entries)

    def rank_kept_after(self, entry: CommittedSource, covers_every_layer: bool
                        ) -> tuple[int, ...]:
        """``rank_kept()`` once ``entry`` is recorded (the ranks learn it at commit)."""
        return _kept(self._after(entry, covers_every_layer))


def _kept(entries: list[CommittedSource]) -> tuple[int, ...]:
    return tuple(e.rank_kept for e in entries if e.rank_kept is not None)
