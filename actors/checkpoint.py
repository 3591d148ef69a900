"""Rank-side reading of safetensors checkpoints: lazy slices, so a rank reads only its shard.

The driver resolves which file holds which tensor (``orchestrator.inventory``) and sends the
names; each rank opens the files itself (``actors.transport``) and hands ``CheckpointSlice``
objects to the model's weight loaders, which ``narrow`` them to the rank's shard before
``materialize`` reads bytes.
"""

from __future__ import annotations

import torch

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


Bounds = tuple[tuple[int, int], ...]
"""A box inside a tensor: per dim, [start, stop) in the full tensor's coordinates."""


def narrow_bounds(bounds: Bounds, dim: int, start: int, length: int) -> Bounds:
    """``Tensor.narrow`` on a box; ValueError when the result would leave it."""
    dim = dim % len(bounds)
    lo, hi = bounds[dim]
    if start < 0 or length < 0 or lo + start + length > hi:
        raise ValueError(f"has {hi - lo} entries along dim {dim}, cannot take "
                         f"[{start}, {start + length})")
    narrowed = list(bounds)
    narrowed[dim] = (lo + start, lo + start + length)
    return tuple(narrowed)


class CheckpointSlice:
    """A rectangular window of one safetensors tensor; bytes are read on ``materialize``."""

    __slots__ = ("_handle", "_file", "_bounds", "name", "dtype")

    def __init__(self, handle, file: str, name: str,
                 bounds: Bounds | None = None) -> None:
        self._handle = handle
        self._file = file
        self.name = name
        self._bounds = bounds if bounds is not None else tuple((0, n) for n in handle.get_shape())
        self.dtype = SAFETENSORS_DTYPES[handle.get_dtype()]

    @property
    def shape(self) -> torch.Size:
        return torch.Size(stop - start for start, stop in self._bounds)

    def narrow(self, dim: int, start: int, length: int) -> CheckpointSlice:
        try:
            bounds = narrow_bounds(self._bounds, dim, start, length)
        except ValueError as exc:
            raise ValueError(f"{self._file}: tensor '{self.name}' {exc}") from exc
        return CheckpointSlice(self._handle, self._file, self.name, bounds)

    def materialize(self) -> torch.Tensor:
        if not self._bounds:
            tensor = self._handle[...]
        else:
            tensor = self._handle[tuple(slice(lo, hi) for lo, hi in self._bounds)]
        return tensor
