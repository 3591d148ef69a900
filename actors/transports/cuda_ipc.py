"""CUDA IPC between processes on one GPU: a sender shares views of its device tensors, a
receiver on the same GPU opens them in place (no copy on either side until the receiver
copies what it needs).

What colocated RL frameworks do between a trainer rank and the engine rank on its GPU:
torch's own sharing (``reduce_tensor``: the storage's ``cudaIpcMemHandle`` and offsets).
Every process of a Ray actor sees its GPUs as ``cuda:0...``: a handle names the sender's
device index, so the receiver opens it on its own device, which is the same GPU (the
driver compares the GPUs' UUIDs before choosing this way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def gpu_uuid(device: torch.device) -> str:
    """The UUID of ``device``'s GPU (the same in every process that sees it); '' off CUDA."""
    if device.type != "cuda":
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)


@dataclass(frozen=True, slots=True)
class SharedPieces:
    """What a sender shares of one bucket: a handle per piece, in the order asked."""

    nbytes: int
    handles: tuple[tuple[Any, ...], ...]


def share(tensors: list[torch.Tensor]) -> SharedPieces:
    """Handles of ``tensors`` (views, any strides) for processes on the same GPU. The sender
    keeps the tensors alive until every receiver is done with them. It waits here for all
    device work, on any stream (a trainer's tensors may come from FSDP's or an optimizer's
    streams): torch records an event per share on the current stream only, and a receiver
    that already opened the same allocation does not wait on the newer events."""
    from torch.multiprocessing.reductions import reduce_tensor

    handles = tuple(reduce_tensor(t.detach())[1] for t in tensors)
    for device in {t.device for t in tensors}:
        torch.cuda.synchronize(device)
    return SharedPieces(sum(t.numel() * t.element_size() for t in tensors), handles)


DEVICE_ARGUMENT = 6
"""Position of the sender's device index in ``rebuild_cuda_tensor``'s arguments."""


def opened(handle: tuple[Any, ...], device: torch.device) -> torch.Tensor:
    """The shared tensor of ``handle`` in this process, on ``device`` (the sender's GPU)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    arguments = list(handle)
    arguments[DEVICE_ARGUMENT] = device.index if device.index is not None else \
        torch.cuda.current_device()
    return rebuild_cuda_tensor(*arguments)
