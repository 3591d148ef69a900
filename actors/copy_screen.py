"""Copies by the C extension ``actors._copy_screen`` (``actors/copy_screen.c``), which moves
each element through a register once and, on the way, tests its exponent bits (a float is
NaN or Inf exactly when they are all set). A large copy that nothing reads soon on this
core streams its stores around the cache.

Two users: a CPU rank's NaN/Inf screen (``actors.reload.finite``), which gets the verdict for
free with the loaders' own copies, and the senders that write a source into the node's
shared memory (``actors.transports.regions``), which another process reads next. Each
function returns None (or False) where the extension is missing (a checkout that was not
installed) or the layouts do not fit it; the caller then copies with torch.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.graph import increment_version

try:  # built by `pip install` (pyproject.toml's ext-modules)
    from actors import _copy_screen
except ImportError:  # a checkout that was not installed: callers copy with torch
    _copy_screen = None

EXPONENT_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F800000}
"""A float is NaN or Inf exactly when every one of its exponent bits is set."""


def copy_screened(target: torch.Tensor, source: torch.Tensor, stream: bool = False
                  ) -> bool | None:
    """``target.copy_(source)`` (CPU tensors of one shape and dtype): whether any element
    was NaN or Inf. ``stream``: nothing reads ``target`` soon (a reload's kernel tensors,
    not a scratch that processing reads next), so a large copy goes around the cache. None
    (nothing done) where the extension or the layout does not fit (another dtype, rows that
    are not contiguous, one storage)."""
    if source.dtype != target.dtype or target.dtype not in EXPONENT_BITS:
        return None
    return _copy(target, source, EXPONENT_BITS[target.dtype], stream)


def copy_streamed(target: torch.Tensor, source: torch.Tensor) -> bool:
    """``target.copy_(source)`` (CPU tensors of one shape and dtype, of 2- or 4-byte
    elements) with stores that go around the cache: for a copy that another process reads
    next. False (nothing done) where the extension or the layout does not fit."""
    if source.dtype != target.dtype or target.element_size() not in (2, 4):
        return False
    return _copy(target, source, 0, True) is not None  # exponent 0: no verdict wanted


def _copy(target: torch.Tensor, source: torch.Tensor, exponent: int, stream: bool
          ) -> bool | None:
    if _copy_screen is None or target.device.type != "cpu" or source.device.type != "cpu":
        return None
    into, out_of = _rows(target), _rows(source)
    if into is None or out_of is None or into[:2] != out_of[:2]:
        return None
    if target.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return None
    (rows, cols, target_stride), (_, _, source_stride) = into, out_of
    found = _copy_screen.copy(target.data_ptr(), source.data_ptr(), rows, cols, target_stride,
                              source_stride, target.element_size(), exponent, stream)
    # What torch's copy_ does too: whatever keys on the tensor's version (autograd, caches
    # of converted weights) sees it written.
    increment_version(target)
    return found


def _rows(tensor: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows, columns, row stride in elements) when ``tensor`` is rows of contiguous
    elements a fixed stride apart, else None."""
    dims = [(size, stride) for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
            if size != 1]
    if not dims:
        return 1, 1, 1
    cols, unit = dims[-1]
    if unit != 1:
        return None
    if len(dims) == 1:
        return 1, cols, cols
    for (_, stride), (inner_size, inner_stride) in zip(dims[:-2], dims[1:-1], strict=True):
        if stride != inner_size * inner_stride:
            return None
    rows, row_stride = math.prod(size for size, _ in dims[:-1]), dims[-2][1]
    return (rows, cols, row_stride) if row_stride >= cols else None  # not a broadcast
