"""How a bucket of source tensors reaches a rank.

* ``FileBucket``: a checkpoint directory every rank can read. The driver sends names, files
  and shapes, never data; each rank opens the files itself and its loaders read just the
  rank's windows.
* ``PackedBucket``: in-memory tensors as raw byte views, ``ray.put`` once (one copy into the
  node's object store, no staging buffer), fetched by every rank zero-copy and sliced locally;
  the reload engine copies out only the windows the rank keeps, and only if it must keep
  them past the bucket.
* ``StreamBucket``: this rank's boxes straight from a trainer's ranks (``actors.stream``);
  ``KeptBucket``: the same boxes again, from what the rank kept of a committed stream.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from actors.checkpoint import CheckpointSlice
from actors.dtypes import dtype_name
from actors.lazy import LazyWindow, TensorEntry, TensorWindow
from actors.stream import KeptBucket, LinkAddress, StreamBucket, join, receive_bucket

BucketMessage = Any
"""FileBucket | PackedBucket | StreamBucket | KeptBucket."""
Received = list[list[tuple[str, LazyWindow]]]
"""A stream's received windows, per bucket."""


@dataclass(frozen=True, slots=True)
class FileEntry(TensorEntry):
    file: str
    """Absolute path of the safetensors file holding it."""


@dataclass(frozen=True, slots=True)
class FileBucket:
    entries: tuple[FileEntry, ...]
    """In stream order. Shapes travel too: a rank that cannot read keeps count with them."""


@dataclass(frozen=True, slots=True)
class PackedBucket:
    entries: tuple[TensorEntry, ...]
    payload: list[Any]
    """[ObjectRef of the list of byte arrays], nested so Ray hands the ref, not the data,
    to the method and the rank can time the fetch."""


def pack_tensors(tensors: list[tuple[str, torch.Tensor]]
                 ) -> tuple[tuple[TensorEntry, ...], list[np.ndarray]]:
    """Each tensor as a uint8 numpy view of its own memory (no copy for contiguous CPU
    tensors): Ray serializes such arrays out of band, straight into the object store, and
    any dtype (bf16, fp8) travels as bytes."""
    entries, arrays = [], []
    for name, tensor in tensors:
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        entries.append(TensorEntry(name, dtype_name(tensor.dtype), tuple(tensor.shape)))
        arrays.append(raw.numpy())
    return tuple(entries), arrays


def unpack_tensors(entries: tuple[TensorEntry, ...], arrays: list[np.ndarray]
                   ) -> list[tuple[str, torch.Tensor]]:
    with warnings.catch_warnings():
        # The object store hands out read-only memory; these views are only ever read.
        warnings.simplefilter("ignore", UserWarning)
        raw = [torch.from_numpy(a) for a in arrays]
    return [(e.name, r.view(getattr(torch, e.dtype)).reshape(e.shape))
            for e, r in zip(entries, raw, strict=True)]


class BucketReader:
    """Rank side, one per reload: turns bucket messages into ``(name, weight)`` pairs,
    keeping checkpoint files (or a trainer stream's group) open until ``close``."""

    def __init__(self, kept: dict[int, Received] | None = None) -> None:
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self.fetch_seconds = 0.0
        self._kept = {} if kept is None else kept
        """What the rank kept of committed trainer streams (``KeptBucket``)."""
        self._link: Any = None
        self._link_device = torch.device("cpu")
        self.stream: int | None = None
        """The trainer stream this reload receives, if any."""
        self.received: Received = []

    def join(self, address: LinkAddress, rank: int, stream: int, device: torch.device) -> None:
        """Join the reload's trainer group; StreamBuckets follow."""
        self.stream = stream
        self._link_device = device if address.backend == "nccl" else torch.device("cpu")
        self._link = join(address, rank)

    def items(self, bucket: BucketMessage) -> list[tuple[str, LazyWindow]]:
        if isinstance(bucket, FileBucket):
            return [(e.name, self._slice(e.name, e.file)) for e in bucket.entries]
        if isinstance(bucket, StreamBucket):
            return self._receive(bucket)
        if isinstance(bucket, KeptBucket):
            if bucket.stream not in self._kept:
                raise RuntimeError(
                    f"this rank no longer holds trainer stream {bucket.stream} (it was "
                    "restarted): a committed version that came from a trainer cannot be "
                    "rebuilt; reload from the trainer or a checkpoint")
            return self._kept[bucket.stream][bucket.index]
        import ray

        begin = time.perf_counter()
        arrays = ray.get(bucket.payload[0])
        self.fetch_seconds += time.perf_counter() - begin
        return [(name, TensorWindow(name, tensor))
                for name, tensor in unpack_tensors(bucket.entries, arrays)]

    def _receive(self, bucket: StreamBucket) -> list[tuple[str, LazyWindow]]:
        if self._link is None:
            raise RuntimeError("a stream bucket arrived before the rank joined the stream")
        begin = time.perf_counter()
        items = receive_bucket(self._link, bucket, self._link_device)
        self.fetch_seconds += time.perf_counter() - begin
        self.received.append(items)
        return items

    def _slice(self, name: str, path: str) -> CheckpointSlice:
        if path not in self._handles:
            if not os.path.isfile(path):
                # The driver listed the file; this rank may run on another node.
                raise FileNotFoundError(
                    f"checkpoint file {path} is not readable on node "
                    f"{socket.gethostname()}: checkpoint directories must be at the same path "
                    "on every node (a shared filesystem), or pass the weights in memory")
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return CheckpointSlice(self._handles[path].get_slice(name), path, name)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()
        self._link = None  # the group is per reload
