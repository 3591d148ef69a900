"""Source weights as lazy, tensor-like windows: weight loaders see a tensor, bytes are read late.

A ``LazyWindow`` is a box inside one source tensor (a checkpoint tensor on disk, a dry-run
probe, a prefetched slice). Weight loaders, ours and vLLM's alike, receive it where they
expect a ``torch.Tensor``:

  * shape queries (``shape``, ``size()``, ``dim()``, ``ndim``, ``numel()``, ``dtype``) and the
    window algebra a loader uses to find its shard (``narrow``, ``chunk``, ``unsqueeze``,
    ``squeeze``, ``select``, ``unbind``, integer indexing) are free;
  * anything else (passing it to ``copy_`` or any torch op, or calling another tensor method)
    reads the box once (``materialize``) and acts on that tensor (``__torch_function__``).

So a loader that narrows to its shard before copying reads only its shard. Subclasses say
how a box is read (``_read``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

Bounds = tuple[tuple[int, int], ...]
"""A box inside a tensor: per dim, [start, stop) in the full tensor's coordinates."""


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """A source tensor as it travels to a rank: name, dtype and full shape, no bytes."""

    name: str
    dtype: str
    """torch dtype name, e.g. ``bfloat16``."""
    shape: tuple[int, ...]

    def __reduce__(self) -> tuple[type, tuple]:
        # Entries travel by the hundred in every reload's messages: pickled as their fields
        # (as in __init__, subclasses included), 3x faster than the dataclass's own state.
        return type(self), tuple(getattr(self, name) for name in self.__match_args__)


def narrow_bounds(bounds: Bounds, dim: int, start: int, length: int) -> Bounds:
    """``Tensor.narrow`` on a box; ValueError when the result would leave it."""
    lo, hi = bounds[dim]
    if start < 0 or length < 0 or lo + start + length > hi:
        raise ValueError(f"has {hi - lo} entries along dim {dim}, cannot take "
                         f"[{start}, {start + length})")
    narrowed = list(bounds)
    narrowed[dim] = (lo + start, lo + start + length)
    return tuple(narrowed)


def box_numel(bounds: Bounds) -> int:
    return math.prod(hi - lo for lo, hi in bounds)


def box_shape(box: Bounds) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


def box_view(tensor: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """``tensor[lo:hi, ...]`` for the box ``bounds`` (inside it): a view, taken by narrowing
    the dims the box cuts (an order of magnitude cheaper than indexing with slices, on a
    path that runs for every window of every reload). Always a view of its own, as indexing
    gives, even of all of ``tensor``."""
    view = tensor.detach()
    for dim, (lo, hi) in enumerate(bounds):
        if lo or hi != view.shape[dim]:
            view = view.narrow(dim, lo, hi - lo)
    return view


def intersect(a: Bounds, b: Bounds) -> Bounds | None:
    box = tuple((max(lo1, lo2), min(hi1, hi2)) for (lo1, hi1), (lo2, hi2) in zip(a, b, strict=True))
    return box if all(lo < hi for lo, hi in box) else None


def cut(box: Bounds, inside: Bounds) -> tuple[slice, ...]:
    """Index of ``box`` within a tensor that holds ``inside`` (both in source coordinates)."""
    return tuple(slice(lo - base, hi - base)
                 for (lo, hi), (base, _) in zip(box, inside, strict=True))


def _materialized(value: Any) -> Any:
    if isinstance(value, LazyWindow):
        return value.materialize()
    if isinstance(value, (list, tuple)):
        return type(value)(_materialized(v) for v in value)
    return value


class LazyWindow:
    """A box of a source tensor with the tensor surface loaders use; see the module doc."""

    borrowed = False
    """Whether windows read from it are views of a transfer buffer (copy before release)."""

    def __init__(self, full_shape: tuple[int, ...], dtype: torch.dtype, name: str = "") -> None:
        self.full_shape = tuple(full_shape)
        self.dtype = dtype
        # The source tensor's checkpoint name (every derived window keeps it), for errors.
        self.name = name
        self.bounds: Bounds = ()
        # Output dims: the source dim each one shows, or None for an inserted unit dim.
        # Source dims left out have extent 1 (squeezed away); order is never permuted.
        self._dims: tuple[int | None, ...] = ()
        self._place(tuple((0, n) for n in full_shape), tuple(range(len(self.full_shape))))

    def _place(self, bounds: Bounds, dims: tuple[int | None, ...]) -> None:
        """Show box ``bounds`` through output ``dims`` (the only way either changes: the
        shape loaders ask for again and again is worked out here, once)."""
        self.bounds, self._dims = bounds, dims
        self._shape = torch.Size([1 if d is None else bounds[d][1] - bounds[d][0]
                                  for d in dims])

    # ---- subclasses ------------------------------------------------------------------------

    def _read(self, bounds: Bounds) -> torch.Tensor:
        """The box ``bounds`` (source coordinates) as a tensor of the box's shape."""
        raise NotImplementedError

    # ---- shape surface ---------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def ndim(self) -> int:
        return len(self._dims)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def dim(self) -> int:
        return self.ndim

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    # ---- window algebra (free) -------------------------------------------------------------

    def _derive(self, bounds: Bounds, dims: tuple[int | None, ...]) -> LazyWindow:
        view = copy.copy(self)
        view._place(bounds, dims)
        return view

    def narrow(self, dim: int, start: int, length: int) -> LazyWindow:
        dim %= self.ndim
        source = self._dims[dim]
        if source is None:
            if (start, length) != (0, 1):
                raise ValueError(f"has 1 entry along dim {dim}, cannot take "
                                 f"[{start}, {start + length})")
            return self._derive(self.bounds, self._dims)
        return self._derive(narrow_bounds(self.bounds, source, start, length), self._dims)

    def unsqueeze(self, dim: int) -> LazyWindow:
        dim = dim % (self.ndim + 1)
        return self._derive(self.bounds, self._dims[:dim] + (None,) + self._dims[dim:])

    def squeeze(self, dim: int) -> LazyWindow:
        dim %= self.ndim
        if self.shape[dim] != 1:
            return self._derive(self.bounds, self._dims)
        return self._derive(self.bounds, self._dims[:dim] + self._dims[dim + 1:])

    def select(self, dim: int, index: int) -> LazyWindow:
        size = self.shape[dim]
        return self.narrow(dim, index % size if index < 0 else index, 1).squeeze(dim)

    def unbind(self, dim: int = 0) -> tuple[LazyWindow, ...]:
        return tuple(self.select(dim, i) for i in range(self.shape[dim]))

    def chunk(self, chunks: int, dim: int = 0) -> tuple[LazyWindow, ...]:
        size = self.shape[dim]
        step = math.ceil(size / chunks)
        return tuple(self.narrow(dim, start, min(step, size - start))
                     for start in range(0, size, step))

    def detach(self) -> LazyWindow:
        return self._derive(self.bounds, self._dims)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int):
            return self.select(0, index)
        return self.materialize()[index]

    # ---- reading -----------------------------------------------------------------------------

    def materialize(self) -> torch.Tensor:
        """Read the window (once per call) as a tensor of ``shape``."""
        tensor = self._read(self.bounds)
        return tensor if tensor.shape == self.shape else tensor.reshape(self.shape)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: Any = None
                           ) -> Any:
        return func(*_materialized(args), **{k: _materialized(v)
                                             for k, v in (kwargs or {}).items()})

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class lacks: any other tensor method reads the window.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype})"


class TensorWindow(LazyWindow):
    """An in-memory source tensor (a trainer's, or a transfer buffer's view): boxes are views,
    so nothing is copied until a buffered call must outlive the buffer."""

    borrowed = True

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        super().__init__(tuple(tensor.shape), tensor.dtype, name)
        self._tensor = tensor

    def _read(self, bounds: Bounds) -> torch.Tensor:
        return box_view(self._tensor, bounds)


class BoxesWindow(LazyWindow):
    """A source tensor of which this rank has some boxes (received, or in a shared region):
    a box inside one of them is a view; one that spans several is put together from them
    (they never overlap)."""

    def __init__(self, entry: TensorEntry, boxes: dict[Bounds, torch.Tensor],
                 borrowed: bool = False) -> None:
        super().__init__(entry.shape, getattr(torch, entry.dtype), entry.name)
        self.boxes = boxes
        self.borrowed = borrowed

    def _read(self, bounds: Bounds) -> torch.Tensor:
        if bounds in self.boxes:
            return self.boxes[bounds]
        for box, window in self.boxes.items():
            if intersect(bounds, box) == bounds:
                return window[cut(bounds, box)]
        device = next((w.device for w in self.boxes.values()), torch.device("cpu"))
        joined = torch.empty(box_shape(bounds), dtype=self.dtype, device=device)
        found = 0
        for box, window in self.boxes.items():
            common = intersect(bounds, box)
            if common is not None:
                joined[cut(common, bounds)] = window[cut(common, box)]
                found += box_numel(common)
        if found != box_numel(bounds):
            # The routing's dry run and this read disagree: a loader broke the read contract.
            raise AssertionError(f"'{self.name}': box {bounds} is not all here")
        return joined
