"""In-memory sources (a dict name -> tensor, or an iterable of (name, tensor) pairs) through
Ray's object store.

Driver: each bucket's tensors as raw byte views, ``ray.put`` once (one copy into the node's
object store, no staging buffer); at most ``max_in_flight`` buckets are pending, since each
holds object-store memory until the ranks read it. Rank: fetched zero-copy and sliced
locally; the reload engine copies out only the windows the rank keeps, and only if it must
keep them past the bucket. The commit log keeps the object references (one copy per node,
shared by every rank and engine) while it needs them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actors.dtypes import SAFETENSORS_CODES, as_bytes, dtype_name
from actors.lazy import TensorEntry, TensorWindow
from actors.transports.base import (
    BucketMessage,
    BucketReader,
    BucketTransport,
    Items,
    Source,
    TensorInfo,
)
from orchestrator.errors import CheckpointError
from orchestrator.plan import Bucket


def pack_tensors(tensors: list[tuple[str, torch.Tensor]]
                 ) -> tuple[tuple[TensorEntry, ...], list[np.ndarray]]:
    """Each tensor as a uint8 numpy view of its own memory (no copy for contiguous CPU
    tensors): Ray serializes such arrays out of band, straight into the object store, and
    any dtype (bf16, fp8) travels as bytes."""
    entries, arrays = [], []
    for name, tensor in tensors:
        raw = as_bytes(tensor.to("cpu"))
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


@dataclass(frozen=True, slots=True)
class PackedBucket(BucketMessage):
    entries: tuple[TensorEntry, ...]
    payload: list[Any]
    """[ObjectRef of the list of byte arrays], nested so Ray hands the ref, not the data,
    to the method and the rank can time the fetch."""

    def read(self, reader: BucketReader) -> Items:
        import ray

        arrays = reader.timed(lambda: ray.get(self.payload[0]))
        return [(name, TensorWindow(name, tensor))
                for name, tensor in unpack_tensors(self.entries, arrays)]


class ObjectStoreTransport(BucketTransport):
    name = "object_store"
    max_in_flight = 2  # one bucket being read by the ranks, one already on its way

    def accepts(self, source: Any) -> bool:
        return isinstance(source, Mapping) or (isinstance(source, Iterable)
                                               and not isinstance(source, (str, bytes)))

    def open(self, source: Any, timeout_s: float) -> Source:
        pairs = list(source.items()) if isinstance(source, Mapping) else _pairs(source)
        data: dict[str, torch.Tensor] = {}
        for name, tensor in pairs:
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"in-memory source entries must be (str, torch.Tensor), "
                                      f"got ({type(name).__name__}, {type(tensor).__name__})")
            if name in data:
                raise CheckpointError(f"tensor '{name}' appears twice in the in-memory source")
            if tensor.dtype not in SAFETENSORS_CODES:
                raise CheckpointError(f"tensor '{name}' has unsupported dtype {tensor.dtype}")
            data[name] = tensor
        infos = tuple(
            TensorInfo(name, tuple(t.shape), SAFETENSORS_CODES[t.dtype],
                       t.numel() * t.element_size(), None)
            for name, t in data.items()
        )
        kind = "dict" if isinstance(source, Mapping) else "iterable"
        return Source(self, infos, f"in-memory {kind} of {len(infos)} tensors", data)

    def send(self, source: Source, bucket: Bucket) -> PackedBucket:
        import ray

        entries, arrays = pack_tensors([(t.name, source.handle[t.name]) for t in bucket.tensors])
        return PackedBucket(entries, [ray.put(arrays)])


def _pairs(source: Iterable[Any]) -> list[tuple[Any, Any]]:
    pairs = []
    for item in source:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise CheckpointError(f"iterable sources yield (name, tensor) pairs, got {item!r:.80}")
        pairs.append(item)
    return pairs
