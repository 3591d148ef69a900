"""Bytes a rank holds in buffered loader calls: current, peak, and how many layers were
partly buffered at once (more than one means the weights did not arrive in layer order)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field


@dataclass(slots=True)
class BufferTracker:
    log: logging.LoggerAdapter
    current: int = 0
    peak: int = 0
    max_partial_layers: int = 0
    bytes_at_max_partial: int = 0
    partial: dict[str, int] = field(default_factory=dict)
    timeline: list[int] = field(default_factory=list)
    """Buffered bytes after every arrival and every release, in order."""

    def add(self, layer: str, nbytes: int) -> None:
        self.partial[layer] = self.partial.get(layer, 0) + nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        self.timeline.append(self.current)
        if len(self.partial) >= 2 and len(self.partial) > self.max_partial_layers:
            if self.max_partial_layers < 2:
                self.log.warning("%d layers partly buffered at once (%.1f MB): %s; stream "
                                 "weights in parent-layer order to buffer one at a time",
                                 len(self.partial), self.current / 1e6, ", ".join(self.partial))
            self.max_partial_layers = len(self.partial)
            self.bytes_at_max_partial = self.current

    def release(self, layer: str) -> None:
        self.current -= self.partial.pop(layer, 0)
        self.timeline.append(self.current)

    def warnings(self) -> list[str]:
        if self.max_partial_layers < 2:
            return []
        return [f"up to {self.max_partial_layers} layers were partly buffered at once "
                f"({self.bytes_at_max_partial / 1e6:.1f} MB; peak {self.peak / 1e6:.1f} MB): "
                "weights did not arrive in parent-layer order"]
