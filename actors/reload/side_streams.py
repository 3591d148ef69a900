"""Where each layer's device work runs during one reload, and when its NaN/Inf verdicts are
read. On CUDA:

* every layer's transfer and processing run on a side stream of their own, which waits for
  the work queued on the current stream before the reload started (forwards reading the
  kernel tensors) and for nothing later, so one layer's transfer overlaps the previous
  layer's processing; a last-processed layer waits for everything queued so far (it may read
  kernel tensors other layers' copies just wrote);
* pooled scratch alternates between two slots from layer to layer, so a layer's transfer need
  not wait for the previous layer's kernel copy; a slot is free again once the kernel copy out
  of it (on the current stream) has run;
* a layer's verdicts are read once the next layer's transfer is queued, so the host never
  waits for the transfer it just queued (``actors.reload.finite``).

On CPU there are no streams, one slot, and verdicts are read at once: the same calls.
"""

from __future__ import annotations

from typing import Any

from actors.reload.errors import ReloadError
from actors.reload.finite import PendingScreen
from quant.sync import DeviceSync


class SideStreams:
    def __init__(self, sync: DeviceSync) -> None:
        self.sync = sync
        self.side: Any = None
        """The stream of the layer being processed (None on CPU)."""
        self.slot: int | None = None
        """The scratch slot of the layer being processed (None: not pooled)."""
        self._slots = 2 if sync.cuda else 1
        self._next_slot = 0
        self._slot_free: dict[int, Any] = {}
        self._before_reload: Any = None
        self._screens: list[list[PendingScreen]] = []
        self._screen_lag = 1 if sync.cuda else 0

    def start(self) -> None:
        """A reload starts: mark the work queued before it; no screens pending."""
        self._before_reload = self.sync.record(self.sync.current())
        self._screens = []

    def begin_layer(self, pooled: bool = False, after_current: bool = False) -> Any:
        """The side stream for the next layer's transfer and processing (``pooled``: it
        writes pooled scratch and takes the next slot)."""
        self.side = self.sync.new_stream()
        if after_current:
            self.sync.order(self.sync.current(), self.side)
        else:
            self.sync.wait(self.side, self._before_reload)
        self.slot = None
        if pooled:
            self.slot, self._next_slot = self._next_slot, (self._next_slot + 1) % self._slots
            self.sync.wait(self.side, self._slot_free.get(self.slot))
        return self.side

    def end_layer(self) -> None:
        """After the layer's kernel copy was queued on the current stream."""
        if self.slot is not None:
            self._slot_free[self.slot] = self.sync.record(self.sync.current())

    def add_screens(self, screens: list[PendingScreen]) -> None:
        self._screens.append(screens)

    def read_screens(self, lag: bool = True) -> ReloadError | None:
        """Read the verdicts of earlier layers' screens (``lag=False``: of all of them);
        the first failure, if any."""
        keep = self._screen_lag if lag else 0
        error = None
        while len(self._screens) > keep:
            for screen in self._screens.pop(0):
                error = error or screen.error()
        return error

    def clear(self) -> None:
        self._screens = []
