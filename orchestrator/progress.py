"""Driver-side progress of a load: bucket count, bytes and rate on stderr, shown only once a
load has run longer than PROGRESS_AFTER_S (short reloads stay silent). On a terminal the line
is redrawn in place; elsewhere (Ray job logs, CI) a line is printed at most every
LINE_EVERY_S seconds, plus the final one."""

from __future__ import annotations

import bisect
import itertools
import math
import sys
import time
from typing import TextIO

PROGRESS_AFTER_S = 2.0
LINE_EVERY_S = 5.0


class Progress:
    def __init__(self, label: str, bucket_bytes: list[int], *, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.label = label
        # Buckets are counted by bytes: a step that carries several (a transport that joins
        # them into one message) counts all of them.
        self._bucket_ends = list(itertools.accumulate(bucket_bytes))
        self.total_bytes = sum(bucket_bytes)
        self.total_buckets = len(bucket_bytes)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.begin = time.perf_counter()
        self.done_bytes = 0
        self.done_buckets = 0
        # No line yet: the first one is always due (perf_counter starts at boot, not 0).
        self._last_line = -math.inf
        self._shown_buckets: int | None = None

    def advance(self, nbytes: int) -> None:
        """One more step (a bucket, or consecutive buckets) reached every rank."""
        self.done_bytes += nbytes
        self.done_buckets = bisect.bisect_right(self._bucket_ends, self.done_bytes)
        self._show(final=False)

    def close(self) -> None:
        """The final line, if progress was shown and it is not already on screen."""
        if self._shown_buckets is not None and (self._shown_buckets != self.done_buckets
                                                or self.stream.isatty()):
            self._show(final=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.begin
        rate = self.done_bytes / elapsed / 1e6 if elapsed > 0 else 0.0
        return (f"{self.label}: bucket {self.done_buckets}/{self.total_buckets}, "
                f"{self.done_bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB, "
                f"{rate:.1f} MB/s, {elapsed:.1f}s")

    def _show(self, final: bool) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.begin < PROGRESS_AFTER_S:
            return
        tty = self.stream.isatty()
        if not tty and not final and now - self._last_line < LINE_EVERY_S:
            return
        self._last_line = now
        self._shown_buckets = self.done_buckets
        end = "\n" if final or not tty else ""
        self.stream.write(("\r" if tty else "") + self.line() + end)
        self.stream.flush()
