"""Device synchronization for weight processing, one code path for CPU and CUDA.

On CUDA, processing may run on side streams. Two rules keep it correct:
  * work that reads a tensor written in place on another stream waits for an event recorded
    after the write (``order``), and the tensor is marked as used by the reading stream so the
    caching allocator does not hand its memory out early (``record_stream``);
  * results are ordered before whatever the caller's stream does next, such as the copy into
    the kernel tensors (``order(side, current)``).
On the CPU there are no streams: every call is a no-op and the code reads the same.

``enabled=False`` drops the ordering (never the streams): tests use it to show the race the
ordering prevents (seed 004: an in-place int4 conversion read by a reorder on another stream).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

Stream = torch.cuda.Stream | None


class DeviceSync:
    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device = torch.device(device)
        self.enabled = enabled
        self.cuda = self.device.type == "cuda"

    def current(self) -> Stream:
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def new_stream(self) -> Stream:
        return torch.cuda.Stream(self.device) if self.cuda else None

    def on(self, stream: Stream):
        """Context running the block's kernels on ``stream`` (no-op on CPU)."""
        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    def order(self, producer: Stream, consumer: Stream, *tensors: torch.Tensor) -> None:
        """``consumer`` waits for everything queued on ``producer`` so far; ``tensors``
        (written on ``producer``, read on ``consumer``) are marked as used by ``consumer``."""
        if producer is None or consumer is None or producer == consumer:
            return
        for tensor in tensors:
            tensor.record_stream(consumer)
        if self.enabled:
            event = torch.cuda.Event()
            event.record(producer)
            consumer.wait_event(event)

    def record(self, stream: Stream) -> torch.cuda.Event | None:
        """An event marking everything queued on ``stream`` so far (None on CPU)."""
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, consumer: Stream, event: torch.cuda.Event | None) -> None:
        """``consumer`` waits for ``event`` (from ``record``) before its next work."""
        if consumer is not None and event is not None and self.enabled:
            consumer.wait_event(event)

    def synchronize(self) -> None:
        """Host waits for the device (CUDA only)."""
        if self.cuda and self.enabled:
            torch.cuda.synchronize(self.device)
