"""Dry-running weight loaders on the meta device.

A loader is called with a ``ProbeWeight`` (a lazy window with the shape and dtype of the
checkpoint tensor, no data) and the layer's meta placeholder. ``WriteCounter`` counts the
elements the call writes into the placeholder's storage; the probe records which boxes of the
source the loader reads. Only those boxes are then read (``read_window``) and buffered as a
``PrefetchedWeight``, which serves exactly those boxes when the call is replayed on real
tensors.

Loader contract this relies on: a loader finds its shard with the free window algebra of
``actors.lazy.LazyWindow`` (narrow, chunk, unsqueeze, select, ...) and reads it the same way
on every call with the same shapes (it may not branch on the values it reads).

When every write a call makes into its param is a copy of a whole box it read, the dry run
also records those copies (``RecordedCopy``): a model whose loaders do nothing else
(``ReloadableModel.replays_copies``) has such calls replayed from them, without the
loader's Python, on every reload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# Private torch API, kept on purpose: TorchDispatchMode is how one sees every in-place write
# a loader makes, whatever view it writes through.
from torch.utils._python_dispatch import TorchDispatchMode

from actors.lazy import Bounds, LazyWindow, box_numel, box_view
from actors.reload.finite import screened_copy
from actors.reload.pinned_host import copy_into

aten = torch.ops.aten


class ProbeWeight(LazyWindow):
    """Stands in for a source tensor during the dry run; remembers every box read."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, name: str = "") -> None:
        super().__init__(shape, dtype, name)
        self.reads: list[Bounds] = []
        self.boxes: dict[int, Bounds] = {}
        """Storage identity -> box, of every meta tensor a read returned (``recorded``)."""
        self._keep: list[torch.Tensor] = []  # alive, so no later tensor reuses an identity

    def _read(self, bounds: Bounds) -> torch.Tensor:
        self.reads.append(bounds)
        box = torch.empty([hi - lo for lo, hi in bounds], dtype=self.dtype, device="meta")
        self.boxes[_identity(box)] = bounds
        self._keep.append(box)
        return box


@dataclass(frozen=True, slots=True)
class RecordedCopy:
    """One copy a loader made into its param: the param's view ``(size, stride, offset)``
    took the whole box ``bounds`` of the source, in row-major order."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    """Storage offset from the param's own."""
    bounds: Bounds

    def replay(self, target: torch.Tensor, weight: PrefetchedWeight) -> None:
        """The copy again, into ``target`` (laid out as the param was on meta)."""
        dest = target.as_strided(self.size, self.stride, target.storage_offset() + self.offset)
        window = weight.windows[self.bounds]
        copy_window(dest, window if window.shape == dest.shape else window.reshape(self.size))


def recorded(counter: WriteCounter, probe: ProbeWeight, param: torch.Tensor
             ) -> tuple[RecordedCopy, ...] | None:
    """The writes a dry run saw into ``param`` as copies of whole boxes the probe read, when
    that is all of them (no fill, no scale, no copy of a transformed or partial box); else
    None, and the call is replayed through its loader."""
    copies = []
    for dest, source in counter.copies:
        bounds = probe.boxes.get(_identity(source)) if isinstance(source, torch.Tensor) else None
        if (bounds is None or not source.is_contiguous() or source.storage_offset()
                or source.numel() != box_numel(bounds) or source.shape != dest.shape):
            return None
        copies.append(RecordedCopy(tuple(dest.shape), tuple(dest.stride()),
                                   dest.storage_offset() - param.storage_offset(), bounds))
    written = sum(math.prod(c.size) for c in copies)
    if not copies or counter.changed or written != counter.numel:
        return None
    return tuple(copies)


def _identity(tensor: torch.Tensor) -> int:
    # Private: the storage's C++ identity, the one key that is the same for every view of
    # a meta tensor (meta storages have no data pointer to compare).
    return tensor.untyped_storage()._cdata


class PrefetchedWeight(LazyWindow):
    """The boxes a loader reads, already in this rank's memory, or ``borrowed``: views into
    a transfer buffer that must be copied (``own``) before the buffer is released."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype,
                 windows: dict[Bounds, torch.Tensor], borrowed: bool = False) -> None:
        super().__init__(shape, dtype)
        self.windows = windows
        self.borrowed = borrowed

    def own(self) -> None:
        """Copy borrowed windows into memory of their own."""
        if self.borrowed:
            for bounds, window in self.windows.items():
                self.windows[bounds] = window.clone()
            self.borrowed = False

    def _read(self, bounds: Bounds) -> torch.Tensor:
        # A loader that reads differently on replay than in its dry run breaks the contract.
        assert bounds in self.windows, f"window {bounds} was not prefetched"
        return self.windows[bounds]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.windows.values())

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: Any = None
                           ) -> Any:
        # The loader's copy of a window: on a CPU rank screened as it goes
        # (actors.reload.finite), from a staged (pinned) window into a device tensor an
        # asynchronous DMA (actors.reload.pinned_host). Any other use reads the window as usual.
        if (func is torch.Tensor.copy_ and not kwargs and len(args) == 2
                and isinstance(args[1], PrefetchedWeight)
                and isinstance(args[0], torch.Tensor)):
            return copy_window(args[0], args[1].materialize())
        return super().__torch_function__(func, types, args, kwargs)


def copy_window(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """A loader's copy of a window into its param: screened as it goes on a CPU rank
    (``actors.reload.finite``), a DMA from a pinned window (``actors.reload.pinned_host``),
    else a plain copy."""
    screened = screened_copy(target, source)
    return copy_into(target, source) if screened is None else screened


def read_window(source: Any, bounds: Bounds) -> torch.Tensor:
    """One box of a source weight: a view for an in-memory tensor (see
    ``PrefetchedWeight.own``), the bytes read from the file for a lazy checkpoint slice."""
    if isinstance(source, LazyWindow):
        return source._read(bounds)
    return box_view(source, bounds)


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
        self._storage = _identity(target)
        self.copies: list[tuple[torch.Tensor, Any]] = []
        """(destination, source) of every ``copy_`` into ``target``, in order."""
        self.numel = 0
        self.changed = 0
        """Elements other in-place ops changed there (a scale of what was just copied, an
        ``out=``): not writes that complete a param, but what a screen of the copies alone
        would miss."""

    def _lands_in_target(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and _identity(tensor) == self._storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if args and self._lands_in_target(args[0]):
            if func is aten.copy_.default:
                self.copies.append((args[0], args[1]))
            written = self._written(func, args)
            self.numel += written
            alias = func._schema.arguments[0].alias_info
            if not written and alias is not None and alias.is_write:
                self.changed += args[0].numel()
        if self._lands_in_target((kwargs or {}).get("out")):
            self.changed += kwargs["out"].numel()
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


def _skip_dynamo_import(mode: type[TorchDispatchMode]) -> None:
    """torch wraps every dispatch mode's ``__torch_dispatch__`` so that it is never traced by
    torch.compile, and that wrapper imports torch._dynamo on its first call: about a second
    per rank process, on the first load. A dry run never runs under torch.compile, so the
    method is its own untraced version; this fills the wrapper's cache with it (a private
    torch detail: should it change, the first call just pays the import again)."""
    raw = getattr(mode.__dict__["__torch_dispatch__"], "__wrapped__", None)
    if raw is not None:
        raw.__dynamo_disable = raw


_skip_dynamo_import(WriteCounter)
