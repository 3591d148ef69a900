"""Rank-side reading of safetensors checkpoints: lazy slices, so a rank reads only its shard.

The driver resolves which file holds which tensor (``orchestrator.inventory``) and sends the
names; each rank opens the files itself and hands ``CheckpointSlice`` objects to the model's
weight loaders, which ``narrow`` them to the rank's shard before ``materialize`` reads bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from safetensors import safe_open

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


@dataclass(slots=True)
class ReadCounter:
    """Bytes this rank actually requested from checkpoint files."""

    bytes_read: int = 0
    tensors_read: int = 0


class CheckpointSlice:
    """A rectangular window of one safetensors tensor; bytes are read on ``materialize``."""

    __slots__ = ("_handle", "_file", "_bounds", "_counter", "name", "dtype")

    def __init__(self, handle, file: str, name: str, counter: ReadCounter,
                 bounds: tuple[tuple[int, int], ...] | None = None) -> None:
        self._handle = handle
        self._file = file
        self._counter = counter
        self.name = name
        self._bounds = bounds if bounds is not None else tuple((0, n) for n in handle.get_shape())
        self.dtype = SAFETENSORS_DTYPES[handle.get_dtype()]

    @property
    def shape(self) -> torch.Size:
        return torch.Size(stop - start for start, stop in self._bounds)

    def narrow(self, dim: int, start: int, length: int) -> CheckpointSlice:
        dim = dim % len(self._bounds)
        lo, hi = self._bounds[dim]
        if start < 0 or length < 0 or lo + start + length > hi:
            raise ValueError(
                f"{self._file}: tensor '{self.name}' has {hi - lo} entries along dim {dim}, "
                f"cannot take [{start}, {start + length})"
            )
        bounds = list(self._bounds)
        bounds[dim] = (lo + start, lo + start + length)
        return CheckpointSlice(self._handle, self._file, self.name, self._counter, tuple(bounds))

    def materialize(self) -> torch.Tensor:
        if not self._bounds:
            tensor = self._handle[...]
        else:
            tensor = self._handle[tuple(slice(lo, hi) for lo, hi in self._bounds)]
        self._counter.bytes_read += tensor.numel() * tensor.element_size()
        self._counter.tensors_read += 1
        return tensor


def iter_checkpoint_slices(
    files: Mapping[str, Sequence[str]], counter: ReadCounter, stack: ExitStack
) -> Iterator[tuple[str, CheckpointSlice]]:
    """Yield ``(name, lazy slice)`` for each name of each file; files stay open in ``stack``."""
    for path, names in files.items():
        handle = stack.enter_context(safe_open(path, framework="pt"))
        for name in names:
            yield name, CheckpointSlice(handle.get_slice(name), path, name, counter)
