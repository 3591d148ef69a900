"""Pinned host copies: the host-to-device half of a CUDA rank's reload; no-ops on CPU.

On a CUDA rank, the windows a loader reads (file bytes, object-store views, a trainer's pieces
received on the CPU) are copied once into page-locked memory as they are buffered
(``PinnedHost.copy``). The loader's replay copy into a device tensor then runs
``non_blocking`` (``PrefetchedWeight``): an asynchronous DMA on the layer's side stream,
straight into the tensor the loader writes (the kernel tensor itself for a layer served in
model format), so no device-side staging copy exists. The host goes on reading and slicing the
next layer while the DMA runs, and the next layer's transfer, on a stream of its own, overlaps
this layer's processing (``ReloadEngine``).

Why pin at all: the CUDA driver bounces pageable memory through pinned buffers of its own,
but synchronously. Pinning ourselves costs the same host copy and buys the overlap.

Pinned blocks come from PyTorch's caching host allocator. It records the stream of a
non-blocking copy on the pinned block it reads and hands the block out again only once that
copy has finished, so a pinned window may be dropped as soon as its copy is queued, and the
pool stays about as large as the reload's buffered bytes.
"""

from __future__ import annotations

import torch


class PinnedHost:
    def __init__(self, device: torch.device) -> None:
        self.pins = torch.device(device).type == "cuda"
        """Whether windows are pinned (CUDA ranks only)."""
        self.pinned_bytes = 0
        """Bytes copied into pinned memory this reload."""

    def reset(self) -> None:
        self.pinned_bytes = 0

    def copy(self, window: torch.Tensor) -> torch.Tensor:
        """``window`` in pinned host memory of its own (a contiguous copy), or unchanged on a
        CPU rank and for windows already on the device or already pinned."""
        if not self.pins or window.device.type != "cpu" or window.is_pinned():
            return window
        pinned = torch.empty(window.shape, dtype=window.dtype, pin_memory=True)
        pinned.copy_(window)
        self.pinned_bytes += pinned.nbytes
        return pinned


def copy_into(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``target.copy_(source)``, asynchronous when it is a DMA from pinned host memory into
    the device (on the current stream; see the module doc for why that is safe)."""
    return target.copy_(source, non_blocking=target.is_cuda and source.is_pinned())
