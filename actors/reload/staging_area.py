"""Staged reloads, rank side: the new version is streamed and processed while the engine keeps
serving the committed one; the flip then copies it into the kernel tensors in one pass.

The reload engine arms a model by swapping its layers' registered tensors, which a forward
running at the same time would see. A staged reload therefore drives a second reload engine
over the model's ``twin`` (``StageableModel.twin``): the same layers, loaders and quant
methods, built on meta and sharing nothing with the live model. Before any byte moves,
``prepare`` registers on each twin layer the reload touches staging tensors shaped like the
live layer's kernel tensors; the twin's reload then writes those, with the same quantization
and checks as a plain reload. A processed layer's tensors named like its placeholders are
always written whole (replayed, or copied from processing's results), so they start empty;
the others (scales, buffers) start as copies of the live ones, as processing may read them
without rewriting. ``flip`` copies the layers the twin processed into the live kernel
tensors in place (every ``data_ptr`` kept) and ``release`` drops the staging. A failure
before the flip only drops the staging: the live model was never touched.

Staging memory is one more copy of the touched layers' kernel tensors per rank, on the
device (fastest flip) or, on CUDA, in pinned host memory (the flip is one H2D copy), plus
what processing keeps outside them until the flip (vLLM's CPU kernels: prepacked weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from actors.reload.errors import ReloadError
from actors.reload.model import LayerRecord, StageableModel
from actors.reload.reload_engine import ReloadEngine

STAGING_PLACES = ("device", "host")


def available_bytes(device: torch.device, place: str) -> int:
    """Memory a staging copy may take: free device memory (CUDA, ``device``), else the
    host's MemAvailable."""
    if device.type == "cuda" and place == "device":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def check_fits(nbytes: int, available: int, place: str) -> None:
    """MemoryError (not the source's fault: the driver reports it as a rank error, with
    this text) when the staging copy would not fit."""
    if nbytes > available:
        raise MemoryError(f"staging this reload needs {nbytes / 2**20:.1f} MiB of {place} "
                          f"memory per rank and {available / 2**20:.1f} MiB are free: reload "
                          "fewer layers at a time, stage on the host, or reload unstaged")


class StagingArea:
    def __init__(self, live: StageableModel, device: torch.device, log: Any,
                 check_finite: bool) -> None:
        self.device = device
        self._model = live.twin()
        self._live = {r.name: r for r in live.records()}
        self._twin = {r.name: r for r in self._model.records()}
        self.reloader = ReloadEngine(self._model, device, log, check_finite)
        self.reloader.adopt_kernel()  # its kernel tensors are the staging copies
        self.staged: dict[str, dict[str, torch.Tensor]] = {}
        """Layer -> its staging tensors, while a staged reload holds them."""
        self.nbytes = 0
        """Their bytes (read by ``memory()`` on the serving thread: set, never summed)."""

    def touched(self, layers: list[str]) -> list[str]:
        """``layers`` and the last-processed layers they re-process (attention scales reset
        with their qkv_proj): everything the twin's reload may write."""
        unknown = sorted(set(layers) - set(self._live))
        if unknown:
            raise ReloadError(f"layers {unknown} are not in this rank's model")
        chosen = set(layers)
        return [n for n, r in self._twin.items() if n in chosen or r.reset_with in chosen]

    def prepare(self, layers: list[str], place: str) -> int:
        """Register staging copies for the layers a reload touches, after checking they fit;
        returns their bytes."""
        if self.staged:
            raise RuntimeError("a staged reload already holds staging tensors on this rank")
        names = self.touched(layers)
        collective = [n for n in names if self._twin[n].collective]
        if collective:
            raise RuntimeError(f"layers {collective[:3]} are processed together with the "
                               "other ranks (collective), which a staged reload cannot do "
                               "while the engine serves: reload them unstaged")
        nbytes = sum(self._held_bytes(n) for n in names)
        check_fits(nbytes, available_bytes(self.device, place), place)
        pin = place == "host" and self.device.type == "cuda"
        for name in names:
            live = self._live[name]
            self.staged[name] = {k: _staging_tensor(t, pin, copy=k not in live.placeholders)
                                 for k, t in live.current().items()}
            _swap(self._twin[name], self.staged[name])
        self.nbytes = nbytes
        return nbytes

    def _held_bytes(self, name: str) -> int:
        """What staging a layer holds until the flip: a copy of its kernel tensors and,
        when processing may keep the model-format tensors it is handed
        (``ReloadableModel.reuses_scratch`` False: vLLM's CPU kernels prepack them into
        closures), those too."""
        record = self._live[name]
        kernel = sum(t.nbytes for t in record.current().values())
        if self._model.reuses_scratch or not record.converts:
            return kernel
        return kernel + sum(p.numel() * p.element_size() for p in record.placeholders.values())

    def flip(self) -> None:
        """Copy every tensor of the layers the twin processed into the live kernel tensor
        of the same name, in place. (A touched layer the source left alone, kept by the
        twin's reload, holds nothing new.)"""
        processed = set(self.reloader.processed)
        for name, staged in self.staged.items():
            if name not in processed:
                continue
            kernel = self._live[name].current()
            for key, tensor in staged.items():
                kernel[key].data.copy_(tensor, non_blocking=tensor.is_pinned())
            self._model.hand_over(self._twin[name], self._live[name])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the staging is dropped next
        self.release()

    def release(self) -> None:
        """Drop the staging; the twin's layers go back to their meta placeholders."""
        for name in self.staged:
            _swap(self._twin[name], dict(self._twin[name].placeholders))
        self.staged, self.nbytes = {}, 0


def _staging_tensor(tensor: torch.Tensor, pin: bool, copy: bool) -> torch.Tensor:
    """An empty tensor like ``tensor`` (pinned host memory when ``pin``), a copy of it when
    ``copy``, of its class (parameter or buffer)."""
    staged = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin,
                         device="cpu" if pin else tensor.device)
    if copy:
        staged.copy_(tensor)
    return (nn.Parameter(staged, requires_grad=False) if isinstance(tensor, nn.Parameter)
            else staged)


def _swap(record: LayerRecord, tensors: dict[str, torch.Tensor]) -> None:
    record.unregister(list(record.current()))
    record.register(tensors)
