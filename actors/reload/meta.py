"""Dry-running weight loaders on the meta device.

A loader is called with a ``ProbeWeight`` (shape and dtype of the checkpoint tensor, no data)
and the layer's meta placeholder. ``WriteCounter`` counts the elements the call writes into
the placeholder's storage; the probe records which windows of the source the loader reads.
Only those windows are then read (``read_window``) and buffered as a ``PrefetchedWeight``,
which serves exactly those windows when the call is replayed on real tensors.

Loader contract this relies on: a loader touches ``loaded_weight`` only through ``shape``,
``dtype``, ``narrow`` and ``actors.model.parallel.to_tensor``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from actors.checkpoint import Bounds, narrow_bounds

aten = torch.ops.aten


class _Window:
    """Shared narrowing logic of probe and prefetched weights: a box inside the source."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, bounds: Bounds | None) -> None:
        self.dtype = dtype
        self.full_shape = tuple(shape)
        self.bounds: Bounds = bounds if bounds is not None else tuple((0, n) for n in shape)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(hi - lo for lo, hi in self.bounds)

    def _narrowed(self, dim: int, start: int, length: int) -> Bounds:
        return narrow_bounds(self.bounds, dim, start, length)


class ProbeWeight(_Window):
    """Stands in for a source tensor during the dry run; remembers every window read."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, bounds: Bounds | None = None,
                 reads: list[Bounds] | None = None) -> None:
        super().__init__(shape, dtype, bounds)
        self.reads: list[Bounds] = reads if reads is not None else []

    def narrow(self, dim: int, start: int, length: int) -> ProbeWeight:
        return ProbeWeight(self.full_shape, self.dtype, self._narrowed(dim, start, length),
                           self.reads)

    def materialize(self) -> torch.Tensor:
        self.reads.append(self.bounds)
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


class PrefetchedWeight(_Window):
    """The windows a loader reads, already in this rank's memory, or ``borrowed``: views
    into a transfer buffer that must be copied (``own``) before the buffer is released."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype,
                 windows: dict[Bounds, torch.Tensor], bounds: Bounds | None = None,
                 borrowed: bool = False) -> None:
        super().__init__(shape, dtype, bounds)
        self.windows = windows
        self.borrowed = borrowed

    def narrow(self, dim: int, start: int, length: int) -> PrefetchedWeight:
        return PrefetchedWeight(self.full_shape, self.dtype, self.windows,
                                self._narrowed(dim, start, length))

    def own(self) -> None:
        """Copy borrowed windows into memory of their own."""
        if self.borrowed:
            for bounds, window in self.windows.items():
                self.windows[bounds] = window.clone()
            self.borrowed = False

    def materialize(self) -> torch.Tensor:
        # A loader that reads differently on replay than in its dry run breaks the contract.
        assert self.bounds in self.windows, f"window {self.bounds} was not prefetched"
        return self.windows[self.bounds]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.windows.values())


def read_window(source: Any, bounds: Bounds) -> torch.Tensor:
    """One window of a source weight: a view for an in-memory tensor (see
    ``PrefetchedWeight.own``), the bytes read from the file for a checkpoint slice."""
    if isinstance(source, torch.Tensor):
        return source[tuple(slice(lo, hi) for lo, hi in bounds)]
    for dim, (lo, hi) in enumerate(bounds):
        source = source.narrow(dim, lo, hi - lo)
    return source.materialize()


def _index_put_numel(dest: torch.Tensor, indices: list[torch.Tensor | None]) -> int:
    shapes = [i.shape for i in indices if i is not None]
    if any(i is not None and i.dtype == torch.bool for i in indices):
        return dest.numel()  # a mask's count is data-dependent: assume the whole tensor
    rows = math.prod(torch.broadcast_shapes(*shapes)) if shapes else 1
    return rows * math.prod(dest.shape[len(indices):])


class WriteCounter(TorchDispatchMode):
    """Counts elements written into ``target``'s storage by in-place ops (copy_, fill_,
    zero_, index writes, masked fills); writes to other tensors are not counted."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self._storage = target.untyped_storage()._cdata
        self.numel = 0

    def _lands_in_target(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata == self._storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if args and self._lands_in_target(args[0]):
            self.numel += self._written(func, args)
        return out

    @staticmethod
    def _written(func, args) -> int:
        dest = args[0]
        if func in (aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default,
                    aten.masked_fill_.Scalar, aten.masked_fill_.Tensor):
            return dest.numel()
        if func in (aten.index_put_.default, aten._index_put_impl_.default):
            return _index_put_numel(dest, list(args[1]))
        if func is aten.index_copy_.default:
            return args[3].numel()
        if func is aten.index_fill_.int_Scalar or func is aten.index_fill_.int_Tensor:
            return args[2].numel() * dest.numel() // max(1, dest.shape[args[1]])
        return 0
