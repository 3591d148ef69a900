"""How a bucket of source tensors reaches a rank.

* ``FileBucket``: a checkpoint directory every rank can read. The driver sends names only;
  each rank opens the files itself and its loaders read just the rank's windows.
* ``PackedBucket``: in-memory tensors packed once by the driver into one aligned byte buffer,
  ``ray.put`` once, fetched by every rank (zero-copy from the node's object store) and sliced
  locally; the reload engine copies out only the windows the rank keeps.
"""

from __future__ import annotations

import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from actors.checkpoint import CheckpointSlice

ALIGN = 64  # bytes; keeps every packed tensor aligned for any dtype view


@dataclass(frozen=True, slots=True)
class FileBucket:
    entries: tuple[tuple[str, str], ...]
    """(tensor name, safetensors file path) in stream order."""


@dataclass(frozen=True, slots=True)
class PackedEntry:
    name: str
    dtype: str
    """torch dtype name, e.g. ``bfloat16``."""
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class PackedBucket:
    entries: tuple[PackedEntry, ...]
    payload: list[Any]
    """[ObjectRef of the packed uint8 array], nested so Ray hands the ref, not the data,
    to the method and the rank can time the fetch."""


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack_tensors(tensors: list[tuple[str, torch.Tensor]]
                 ) -> tuple[tuple[PackedEntry, ...], np.ndarray]:
    """One contiguous uint8 buffer holding every tensor's bytes, plus where each one is."""
    entries, offset = [], 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(PackedEntry(name, str(tensor.dtype).removeprefix("torch."),
                                   tuple(tensor.shape), offset, nbytes))
        offset = _aligned(offset + nbytes)
    buffer = np.empty(max(offset, 1), dtype=np.uint8)
    flat = torch.from_numpy(buffer)
    for entry, (_, tensor) in zip(entries, tensors, strict=True):
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        flat[entry.offset:entry.offset + entry.nbytes].copy_(raw)
    return tuple(entries), buffer


def unpack_tensors(entries: tuple[PackedEntry, ...], buffer: np.ndarray
                   ) -> list[tuple[str, torch.Tensor]]:
    with warnings.catch_warnings():
        # The object store hands out read-only memory; these views are only ever read.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(buffer)
    return [
        (e.name, flat[e.offset:e.offset + e.nbytes].view(getattr(torch, e.dtype)).reshape(e.shape))
        for e in entries
    ]


class BucketReader:
    """Rank side, one per reload: turns bucket messages into ``(name, weight)`` pairs,
    keeping checkpoint files open until ``close``."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self.fetch_seconds = 0.0

    def items(self, bucket: FileBucket | PackedBucket) -> list[tuple[str, Any]]:
        if isinstance(bucket, FileBucket):
            return [(name, self._slice(name, path)) for name, path in bucket.entries]
        import ray

        begin = time.perf_counter()
        buffer = ray.get(bucket.payload[0])
        self.fetch_seconds += time.perf_counter() - begin
        return unpack_tensors(bucket.entries, buffer)

    def _slice(self, name: str, path: str) -> CheckpointSlice:
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return CheckpointSlice(self._handles[path].get_slice(name), path, name)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()
