"""How a complete layer's buffered loader calls become the tensors its engine serves.

When the layer's kernel tensors have its model format (the same names, shapes and dtypes),
the calls are replayed straight into them: no intermediate tensor, and on a CPU rank each
copy screens for NaN/Inf as it moves the bytes (``actors.reload.finite``). Otherwise they
are replayed into fresh model-format tensors (or a pooled scratch, reused from reload to
reload), the model processes them (quantizing straight into the served tensors where it
can), and whatever processing replaced is copied into the kernel tensors, whose objects
stay registered so every ``data_ptr`` the engine serves from survives. On CUDA the replay
and processing run on a side stream and the kernel copy on the current stream after them
(``actors.reload.side_streams``).

``ReloadEngine`` decides when a layer is complete and whether its ranks agree; this module
only writes it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from actors.reload.errors import ReloadError
from actors.reload.finite import CopySums, nonfinite_error, screen_written, screening_copies
from actors.reload.model import LayerRecord, ReloadableModel, is_optional
from actors.reload.params import materialize, param_like
from actors.reload.side_streams import SideStreams
from actors.reload.types import LayerLoad
from quant.sync import DeviceSync


class LayerWriter:
    def __init__(self, model: ReloadableModel, sync: DeviceSync, side_streams: SideStreams,
                 check_finite: bool) -> None:
        self.model = model
        self.sync = sync
        self.side_streams = side_streams
        self.check_finite = check_finite
        # Model-format buffers of converting layers, reused from layer to layer and reload
        # to reload: one per (param name, shape, dtype, slot), so the params of one layer
        # never share storage and the pool holds about one layer of each kind per slot.
        self._scratch: dict[tuple, torch.Tensor] = {}

    def prepare(self, load: LayerLoad) -> None:
        """The rank-local part: the buffered calls replayed (into the kernel tensors when
        they have the model format, else into materialized ones) and screened."""
        if kernel_has_model_format(load):
            self._replay_into_kernel(load)
        else:
            self._materialize(load)

    def convert(self, load: LayerLoad) -> None:
        """The model's processing (may communicate), then the copy into the kernel tensors
        of whatever processing replaced."""
        record = load.record
        current, side = self.sync.current(), self.side_streams.side
        if record.converts:
            with self.sync.on(side):
                # Quantized straight into the served tensors where the model can.
                self.model.process_into(record, load.kernel or {})
                if self.check_finite and record.screened and self.model.has_nonfinite(record):
                    raise nonfinite_error(load, record.screened[0], "NaN or Inf")
        self.sync.order(side, current, *record.current().values())
        if load.kernel is not None:
            copy_into_kernel(record, load.kernel)
        self.side_streams.end_layer()

    def _screening_copies(self, wanted: bool = True, *, into_kernel: bool = False,
                          fused: bool = False) -> AbstractContextManager[CopySums | None]:
        """The replay's copies screened as they go (a CPU rank's screen, without a pass of
        its own; ``actors.reload.finite``). ``into_kernel``: they write the kernel tensors,
        fused and streamed; ``fused``: through the extension (``CopySums.fused``)."""
        return screening_copies(wanted and self.check_finite and not self.sync.cuda,
                                fused=into_kernel or fused, stream=into_kernel)

    def _screen(self, load: LayerLoad, written: dict[str, torch.Tensor],
                skip: tuple[str, ...] = (), copied: CopySums | None = None) -> None:
        if self.check_finite:
            self.side_streams.add_screens(screen_written(load, written, skip, copied))

    @staticmethod
    def _replay(load: LayerLoad, targets: dict[str, torch.Tensor]) -> None:
        """Each buffered call into ``targets``: its recorded copies where it has them and the
        target is laid out as the placeholder was on meta, else its loader again."""
        for call in load.calls:
            target, placeholder = targets[call.param], load.record.placeholders[call.param]
            if call.copies is not None and target.stride() == placeholder.stride():
                for copy in call.copies:
                    copy.replay(target, call.weight)
            else:
                placeholder.weight_loader(target, call.weight, *call.args, **call.kwargs)

    def _replay_into_kernel(self, load: LayerLoad) -> None:
        """The kernel tensors have the model format: the buffered calls write them
        directly, through params of the placeholders' class and attributes (loaders read
        both off the param they write), with no intermediate copy. Processing, if any, then
        runs on the kernel tensors in place (``convert``)."""
        record = load.record
        targets = {n: param_like(p, load.kernel[n].data)
                   for n, p in record.placeholders.items()}
        with self.sync.on(self.side_streams.begin_layer()):
            with self._screening_copies(into_kernel=True) as copied:
                self._replay(load, targets)
            self._screen(load, targets, copied=copied)
        record.unregister(list(record.placeholders))
        record.register(load.kernel)

    def _materialize(self, load: LayerLoad) -> None:
        """Materialize, replay and screen on a side stream; the processing that follows
        runs there too, and the kernel copy on the current stream after it (``convert``).
        No-ops on CPU."""
        record = load.record
        # On the first load the fresh tensors become the kernel tensors: never pooled.
        pooled = load.kernel is not None and self.model.reuses_scratch
        side = self.side_streams.begin_layer(pooled, after_current=record.process_last)
        with self.sync.on(side):
            make = self._from_scratch if pooled else materialize
            fresh = {n: make(n, p, record.restore_device)
                     for n, p in record.placeholders.items()}
            record.register(fresh)
            # A layer whose processing screens its weights needs no sums of them.
            with self._screening_copies(not record.screened,
                                        fused=quantizes(load)) as copied:
                self._replay(load, fresh)
            self._screen(load, fresh, skip=record.screened, copied=copied)

    def _from_scratch(self, name: str, placeholder: nn.Parameter, device: torch.device
                      ) -> nn.Parameter:
        key = (name, tuple(placeholder.shape), placeholder.dtype, device,
               self.side_streams.slot)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(placeholder.shape, dtype=placeholder.dtype,
                                             device=device)
        return param_like(placeholder, self._scratch[key])


def copy_into_kernel(record: LayerRecord, kernel: dict[str, torch.Tensor]) -> None:
    """What processing produced, copied into the kernel tensors it must match exactly;
    the kernel objects are registered again."""
    result = record.current()
    if set(result) != set(kernel):
        raise ReloadError(f"layer {record.name}: processing produced {sorted(result)}, "
                          f"the engine serves {sorted(kernel)}")
    for name, target in kernel.items():
        new = result[name]
        if new.shape != target.shape or new.dtype != target.dtype:
            raise ReloadError(f"layer {record.name}: '{name}' processed to "
                              f"{tuple(new.shape)} {new.dtype}, kernel tensor is "
                              f"{tuple(target.shape)} {target.dtype}")
        if new is not target:
            target.data.copy_(new)
    record.unregister(list(result))
    record.register(kernel)


def kernel_has_model_format(load: LayerLoad) -> bool:
    """True when the layer's kernel tensors are exactly its model format (the same names,
    shapes and dtypes, no optional params): loads can be replayed into them."""
    record, kernel = load.record, load.kernel
    if kernel is None or set(kernel) != set(record.placeholders):
        return False
    return all(kernel[n].shape == p.shape and kernel[n].dtype == p.dtype
               and not is_optional(p) for n, p in record.placeholders.items())


def quantizes(load: LayerLoad) -> bool:
    """The layer's kernel tensors hold narrower elements than its model format (its
    processing quantizes, rather than repacking at the same dtype)."""
    if load.kernel is None:
        return False
    narrowest = min(t.element_size() for t in load.kernel.values())
    return narrowest < min(p.element_size() for p in load.record.placeholders.values())
