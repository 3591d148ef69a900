"""Rank-side reading of safetensors checkpoints: lazy slices, so a rank reads only its shard.

The driver resolves which file holds which tensor (``actors.transports.files``) and sends the
names; each rank maps the files itself (``FileBucket.read``, ``files.mapped_tensors``) and
hands ``CheckpointSlice`` objects (``actors.lazy``) to the model's weight loaders, which narrow
them to the rank's shard before any byte is read.
"""

from __future__ import annotations

import torch

from actors.lazy import Bounds, LazyWindow, box_view


class CheckpointSlice(LazyWindow):
    """A window of one safetensors tensor; its bytes are read when a loader uses it."""

    def __init__(self, mapped: torch.Tensor, file: str, name: str) -> None:
        super().__init__(tuple(mapped.shape), mapped.dtype, name)
        self._mapped = mapped
        """The whole tensor, a view of its file mapped read-only."""
        self._file = file

    def narrow(self, dim: int, start: int, length: int) -> LazyWindow:
        try:
            return super().narrow(dim, start, length)
        except ValueError as exc:
            raise ValueError(f"{self._file}: tensor '{self.name}' {exc}") from exc

    def _read(self, bounds: Bounds) -> torch.Tensor:
        return box_view(self._mapped, bounds)
