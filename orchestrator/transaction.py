"""The commit log: how every rank gets back to the last committed version.

A reload commits only when every rank of every engine finished it. Each committed source is
logged with the exact bucket messages the ranks received: the first load (or the last reload
that covered every layer) and the partial reloads since. Replaying the log through the normal
load path rebuilds the committed weights bit for bit, because loading and quantization are
deterministic. It serves two failures:

  * a failed reload: every rank is rolled back by replaying the log;
  * a dead rank: Ray restarts the actor empty, it rejoins a new process group and replays
    the log from its first entry.

Memory cost: in-memory sources stay in the Ray object store (one copy per node, shared by all
ranks and engines) while they are in the log; a trainer stream stays in the engine ranks,
each keeping the boxes it received (its share), and a restarted rank cannot rebuild it;
checkpoint directories cost nothing but must stay unchanged until superseded; replay checks
their files' size and mtime, and refuses to rebuild from a directory that changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from actors.stream import KeptBucket
from actors.transport import BucketMessage
from orchestrator.errors import RecoveryError
from orchestrator.inventory import Source

Fingerprint = tuple[int, int]


@dataclass(frozen=True, slots=True)
class CommittedSource:
    description: str
    messages: tuple[BucketMessage, ...]
    fingerprints: dict[str, Fingerprint]
    """Checkpoint file -> (size, mtime_ns) when it was committed."""

    @property
    def stream(self) -> int | None:
        """The trainer stream whose kept boxes replay this source, if it was one."""
        kept = [m.stream for m in self.messages if isinstance(m, KeptBucket)]
        return kept[0] if kept else None

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


def committed(source: Source, messages: list[BucketMessage]) -> CommittedSource:
    files = {t.file for t in source.tensors if t.file is not None}
    fingerprints = {f: (os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in sorted(files)}
    return CommittedSource(source.description, tuple(messages), fingerprints)


@dataclass(slots=True)
class CommitLog:
    entries: list[CommittedSource] = field(default_factory=list)

    def record(self, entry: CommittedSource, covers_every_layer: bool) -> None:
        """A source that covered every layer makes the older entries unnecessary."""
        self.entries = self._after(entry, covers_every_layer)

    def _after(self, entry: CommittedSource, covers_every_layer: bool) -> list[CommittedSource]:
        return [entry] if covers_every_layer else [*self.entries, entry]

    def streams(self) -> tuple[int, ...]:
        """The trainer streams the log replays from what the engine ranks kept."""
        return _streams(self.entries)

    def streams_after(self, entry: CommittedSource, covers_every_layer: bool
                      ) -> tuple[int, ...]:
        """``streams()`` once ``entry`` is recorded (the ranks learn it at commit)."""
        return _streams(self._after(entry, covers_every_layer))


def _streams(entries: list[CommittedSource]) -> tuple[int, ...]:
    return tuple(e.stream for e in entries if e.stream is not None)
