"""NaN/Inf screening of a reload: a diverged training step must not reach the engines.

The screen of a layer is queued where its bytes were just written (``screen_written``) and its
verdict read later (``PendingScreen.error``): on a CUDA rank, reading it at once would make the
host wait for the layer's transfer, and the next layer's reading could not overlap it. Every
verdict is read before the reload can commit, and before any collective processing (the
failure consensus needs it).

On a CPU rank the screen is one more pass over every byte written, and memory bandwidth is
what that pass costs (a bf16 sum of a 1 MB block already in cache is ~3x faster than of one in
memory). So while a layer is replayed (``screening_copies``), the loaders' copies of their
windows go in blocks that fit in cache, each summed right after it is written
(``screened_copy``); a param whose every written element came through such copies is screened
from those sums, with no pass of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from actors.reload.errors import ReloadError

if TYPE_CHECKING:  # types imports meta, whose copies this module screens
    from actors.reload.types import LayerLoad


@dataclass(frozen=True, slots=True)
class PendingScreen:
    layer: str
    param: str
    sources: str
    """The checkpoint tensors that fed ``param``, quoted, for the error."""
    extremes: torch.Tensor
    """[min, max] of what was written, on the rank's device (NaN propagates into both)."""

    def error(self) -> ReloadError | None:
        """None when every element was finite (reads the device: a host sync on CUDA)."""
        low, high = self.extremes.tolist()
        if math.isfinite(low) and math.isfinite(high):
            return None
        kind = "NaN" if math.isnan(low) or math.isnan(high) else "Inf"
        return _error(self.sources, self.layer, self.param, kind)


def screen_written(load: LayerLoad, written: dict[str, torch.Tensor],
                   skip: tuple[str, ...] = (), copied: CopySums | None = None
                   ) -> list[PendingScreen]:
    """Screens of what the replay just wrote, before any conversion: the bytes are resident
    and hot, where checking the source windows would fault their pages in a second time.
    ``skip``: params the model's processing screens (``has_nonfinite``); ``copied``: the
    sums the replay's copies took (``screening_copies``)."""
    screens = []
    for name in dict.fromkeys(call.param for call in load.calls):
        tensor = written[name]
        if name in skip or not tensor.is_floating_point() or not tensor.numel():
            continue
        total = copied.total(tensor, load.writes.get(name, 0)) if copied else None
        screens.append(PendingScreen(load.record.name, name, _sources(load, name),
                                     extremes(tensor, total)))
    return screens


SUMMED = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_BYTES = 256 << 10
"""A screened copy's block: written, then summed while it is still in the core's cache
(256 KB ran fastest here, between the cost per block and the cache's size)."""


def extremes(tensor: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """Two values, both finite exactly when every element of ``tensor`` is: its min and
    max (one reduction, where a full isfinite mask is ~20x slower on CPU bf16). On a CPU
    rank a sum is cheaper still (~45% less than aminmax on bf16 just written, here) and
    just as exact one way: any NaN or Inf makes it non-finite; a non-finite sum of finite
    values (an overflow) is settled by min and max. ``total``: the sum of every element,
    already taken (``CopySums``). On CUDA the reduction stays on the device unread (no host
    sync per layer), so it is min and max at once."""
    if tensor.device.type == "cpu" and tensor.dtype in SUMMED:
        total = tensor.sum() if total is None else total
        if math.isfinite(total.item()):
            return torch.stack([total, total]).float()
    low, high = torch.aminmax(tensor)
    return torch.stack([low, high]).float()


@dataclass
class CopySums:
    """What the screened copies of one layer's replay wrote, per storage: elements and the
    sums of their blocks."""

    numel: dict[int, int] = field(default_factory=dict)
    sums: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``target.copy_(source)`` in blocks of about ``BLOCK_BYTES`` along dim 0, each
        summed right after it is written."""
        key = target.untyped_storage().data_ptr()
        sums = self.sums.setdefault(key, [])
        step = max(1, BLOCK_BYTES // max(1, target[0].numel() * target.element_size()))
        for start in range(0, target.shape[0], step):
            block = target[start:start + step]
            block.copy_(source[start:start + step])
            sums.append(block.sum())
        self.numel[key] = self.numel.get(key, 0) + target.numel()
        return target

    def total(self, param: torch.Tensor, writes: int) -> torch.Tensor | None:
        """The sum of every element of ``param``, when the screened copies wrote as many
        elements as ``param`` has and every write the layer's loader calls made into it was
        one of them (``writes``: their count on meta, uncapped; a loader that scales what it
        copied, or fills padding, writes more); else None, and the param is screened by a
        pass of its own."""
        key = param.untyped_storage().data_ptr()
        if self.numel.get(key) != writes or writes != param.numel():
            return None
        return torch.stack(self.sums[key]).sum()


_COPY_SUMS: ContextVar[CopySums | None] = ContextVar("copy_sums", default=None)


@contextmanager
def screening_copies(enabled: bool) -> Iterator[CopySums | None]:
    """Within: ``screened_copy`` sums what it writes into the returned ``CopySums``."""
    if not enabled:
        yield None
        return
    sums = CopySums()
    token = _COPY_SUMS.set(sums)
    try:
        yield sums
    finally:
        _COPY_SUMS.reset(token)


def screened_copy(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor | None:
    """``target.copy_(source)`` summed block by block, when a screen is collecting and both
    are CPU tensors of the same shape and a summed dtype; None (nothing done) otherwise."""
    sums = _COPY_SUMS.get()
    if (sums is None or target.device.type != "cpu" or source.device.type != "cpu"
            or target.dtype not in SUMMED or target.shape != source.shape
            or not target.ndim):
        return None
    return sums.copy(target, source)


def nonfinite_error(load: LayerLoad, param: str, kind: str) -> ReloadError:
    """The error naming the checkpoint tensors that fed ``param``."""
    return _error(_sources(load, param), load.record.name, param, kind)


def _sources(load: LayerLoad, param: str) -> str:
    return ", ".join(dict.fromkeys(f"'{c.source_name}'" for c in load.calls if c.param == param))


def _error(sources: str, layer: str, param: str, kind: str) -> ReloadError:
    return ReloadError(f"tensor {sources} contains {kind} values (a diverged step?), found in "
                       f"{layer}.{param}; the reload is refused and the engines keep their "
                       "weights")
