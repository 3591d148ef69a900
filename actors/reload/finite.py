"""NaN/Inf screening of a reload: a diverged training step must not reach the engines.

The screen of a layer is queued where its bytes were just written (``screen_written``) and its
verdict read later (``PendingScreen.error``): on a CUDA rank, reading it at once would make the
host wait for the layer's transfer, and the next layer's reading could not overlap it. Every
verdict is read before the reload can commit, and before any collective processing (the
failure consensus needs it).

On a CPU rank a screen of its own would be one more pass over every byte written. So while a
layer is replayed (``screening_copies``), the loaders' copies of their windows screen what they
copy (``screened_copy``): in the same pass, by the exponent bits, where the built extension
takes the layout (``actors.copy_screen``) and the reload engine chose it (``CopySums.fused``);
else in blocks that fit in cache, each summed right after it is written. A param whose every
written element came through such copies is screened from what they found, with no pass of
its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from actors.copy_screen import EXPONENT_BITS, copy_screened
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
    ``skip``: params the model's processing screens (``has_nonfinite``); ``copied``: what
    the replay's copies found (``screening_copies``)."""
    screens = []
    for name in dict.fromkeys(call.param for call in load.calls):
        tensor = written[name]
        if name in skip or not tensor.is_floating_point() or not tensor.numel():
            continue
        found = copied.extremes(tensor, load.writes.get(name, 0)) if copied else None
        if found is ALL_FINITE:
            continue  # the copies saw every element, all finite: no verdict to read later
        screens.append(PendingScreen(load.record.name, name, _sources(load, name),
                                     extremes(tensor) if found is None else found))
    return screens


SUMMED = tuple(EXPONENT_BITS)
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


ALL_FINITE = torch.zeros(2)
"""The extremes of a param whose every element was seen finite as it was copied."""


@dataclass
class CopySums:
    """What the screened copies of one layer's replay found, per storage: elements copied,
    the sums of the blocks copied by torch, and whether a copy that screened by the
    exponent bits met a NaN or an Inf."""

    fused: bool = False
    """The copies go through the extension, screened by the exponent bits; else torch's
    copies with block sums. Chosen by the reload engine where it was measured to pay: the
    kernel tensors, and a scratch that quantization reads next. Not a scratch that
    processing repacks at its own dtype (vLLM's CPU weight packing): through the extension,
    those vLLM ranks peaked ~170 MB higher per rank (anonymous memory, three runs each way;
    the cause is not pinned down) for no time gained."""
    stream: bool = False
    """Nothing reads what the copies write until the engine serves (the kernel tensors):
    large fused copies go around the cache."""
    numel: dict[int, int] = field(default_factory=dict)
    sums: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    nonfinite: set[int] = field(default_factory=set)

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``target.copy_(source)``, screened in the same pass (``copy_screened``), or in
        blocks of about ``BLOCK_BYTES`` along dim 0, each summed right after it is
        written."""
        key = target.untyped_storage().data_ptr()
        found = copy_screened(target, source, self.stream) if self.fused else None
        if found is None:
            sums = self.sums.setdefault(key, [])
            step = max(1, BLOCK_BYTES // max(1, target[0].numel() * target.element_size()))
            for start in range(0, target.shape[0], step):
                block = target[start:start + step]
                block.copy_(source[start:start + step])
                sums.append(block.sum())
        elif found:
            self.nonfinite.add(key)
        self.numel[key] = self.numel.get(key, 0) + target.numel()
        return target

    def extremes(self, param: torch.Tensor, writes: int) -> torch.Tensor | None:
        """``extremes`` of ``param`` from what the screened copies found (``ALL_FINITE``
        when they found every element finite by its bits), when they wrote as many elements
        as ``param`` has and every write the layer's loader calls made into it was one of
        them (``writes``: their count on meta, uncapped; a loader that scales what it
        copied, or fills padding, writes more); else None, and the param is screened by a
        pass of its own."""
        key = param.untyped_storage().data_ptr()
        if self.numel.get(key) != writes or writes != param.numel():
            return None
        if key in self.nonfinite:
            return extremes(param)  # a refused reload: min and max tell NaN from Inf
        sums = self.sums.get(key)
        return extremes(param, torch.stack(sums).sum()) if sums else ALL_FINITE


_COPY_SUMS: ContextVar[CopySums | None] = ContextVar("copy_sums", default=None)


@contextmanager
def screening_copies(enabled: bool, fused: bool = False, stream: bool = False
                     ) -> Iterator[CopySums | None]:
    """Within: ``screened_copy`` screens what it writes into the returned ``CopySums``
    (``fused``, ``stream``: see ``CopySums``)."""
    if not enabled:
        yield None
        return
    sums = CopySums(fused, stream)
    token = _COPY_SUMS.set(sums)
    try:
        yield sums
    finally:
        _COPY_SUMS.reset(token)


def screened_copy(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor | None:
    """``target.copy_(source)`` screened as it goes (``CopySums.copy``), when a screen is
    collecting and both are CPU tensors of the same shape and a screened dtype; None
    (nothing done) otherwise."""
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
