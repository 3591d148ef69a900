"""The layerwise reload engine of one rank.

``start`` arms every layer: its live kernel tensors are set aside and meta placeholders put
back, each with a wrapped ``weight_loader``. A wrapped call is dry-run on meta (counting the
elements it writes and the source windows it reads), the windows are read into rank memory,
and the call is buffered. When a layer's count reaches its total it is processed at once:
placeholders materialized on ``restore_device``, calls replayed, the quant method's
``process_weights_after_loading`` run, results copied into the original kernel tensors, and
those original objects re-registered, so every ``data_ptr`` the engine serves from survives.
``finish`` processes ``process_last`` (attention) layers, keeps the old tensors of layers that
received nothing and rejects partly loaded ones.

The first load is the same path with no kernel tensors yet: the processed tensors become the
kernel tensors. ``mode="plan"`` only dry-runs, to tell the planner which layer each source
tensor feeds and how many bytes each rank keeps of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from actors.reload.layers import LayerRecord, is_optional, record_layers
from actors.reload.meta import Bounds, PrefetchedWeight, ProbeWeight, WriteCounter, read_window
from actors.reload.tracker import BufferTracker
from actors.reload.types import BufferedCall, LayerLoad, PlannedRead, RankReloadStats, ReloadError
from quant.sync import DeviceSync

Mode = Literal["first", "reload", "plan"]
STAGES = ("transfer", "load", "process", "finalize")


class ReloadEngine:
    def __init__(self, model: nn.Module, device: torch.device, log: Any,
                 check_finite: bool = True) -> None:
        self.model = model
        self.log = log
        self.records = record_layers(model, device)
        self.layer_names = [r.name for r in self.records]
        self.sync = DeviceSync(device)
        self.check_finite = check_finite
        # Called with a stage name ('process', 'quantize') before that work: fault injection.
        self.stage_hook: Any = None
        # A loader's dry run depends only on the call's shape: run it once, reuse it after.
        self._dry_runs: dict[tuple, tuple[int, list[Bounds]]] = {}
        # Model-format buffers of converting layers, reused from layer to layer and reload
        # to reload: one per (param name, shape, dtype), so the params of one layer never
        # share storage and the pool holds about one layer of each kind.
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._loads: dict[str, LayerLoad] = {}
        self._mode: Mode | None = None
        self._has_kernel = False

    # ---- arming ---------------------------------------------------------------------------

    def start(self, mode: Mode) -> None:
        if self._mode is not None:
            raise RuntimeError("a reload is already in progress on this rank")
        if mode == "reload" and not self._has_kernel:
            raise RuntimeError("reload before the first load")
        self._mode = mode
        self.tracker = BufferTracker(self.log)
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.bytes_read = 0
        self.processed: list[str] = []
        self.layer_seconds: dict[str, float] = {}
        self._loads = {}
        for record in self.records:
            kernel = record.current() if mode == "reload" else None
            if kernel is not None:
                record.unregister(list(kernel))
            load = LayerLoad(record, kernel)
            record.register({n: self._armed(load, n, p) for n, p in record.placeholders.items()})
            self._loads[record.name] = load

    def _armed(self, load: LayerLoad, name: str, placeholder: nn.Parameter) -> nn.Parameter:
        armed = nn.Parameter(torch.empty_like(placeholder, device="meta"), requires_grad=False)
        armed.__dict__.update(placeholder.__dict__)

        def weight_loader(_param: torch.Tensor, loaded_weight: Any, *args: Any, **kwargs: Any
                          ) -> None:
            self._on_load(load, name, loaded_weight, args, kwargs)

        armed.weight_loader = weight_loader
        return armed

    # ---- loading --------------------------------------------------------------------------

    def load(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Feed checkpoint-format ``(name, weight)`` pairs through the model's own mapping."""
        self._require_started()
        with torch.no_grad():
            self.model.load_weights(self._named(weights))

    def _named(self, weights: Iterable[tuple[str, Any]]) -> Iterable[tuple[str, Any]]:
        """Remember which checkpoint tensor is being loaded, for error messages."""
        for name, weight in weights:
            self._current_name = name
            yield name, weight

    def _on_load(self, load: LayerLoad, name: str, weight: Any, args: tuple, kwargs: dict
                 ) -> None:
        begin = time.perf_counter()
        record = load.record
        if load.processed:
            raise ReloadError(f"layer {record.name} received '{name}' after it was complete "
                              "(a tensor was sent twice?)")
        shard = args[0] if args else kwargs.get("shard_id")
        if shard in load.shards.get(name, []):
            raise ReloadError(f"{record.name}.{name} received shard {shard!r} twice "
                              "(the same tensor appears twice in the source?)")
        written, reads = self._dry_run(record, name, weight, args, kwargs)
        if self._mode == "plan":
            placeholder = record.placeholders[name]
            self._planned_last = PlannedRead(
                record.name, f"{record.name}.{name}", placeholder.dtype, written, shard,
                _read_bytes(weight, reads))
            return
        read_begin = time.perf_counter()
        windows = {b: read_window(weight, b) for b in dict.fromkeys(reads)}
        read_seconds = time.perf_counter() - read_begin
        buffered = PrefetchedWeight(tuple(weight.shape), weight.dtype, windows,
                                    borrowed=isinstance(weight, torch.Tensor))
        self.bytes_read += buffered.nbytes
        self.seconds["transfer"] += read_seconds
        load.calls.append(BufferedCall(name, args, kwargs, buffered, self._current_name))
        load.loaded_numel += written
        load.per_param[name] = load.per_param.get(name, 0) + written
        load.shards.setdefault(name, []).append(shard)
        self.tracker.add(record.name, buffered.nbytes)
        self.seconds["load"] += time.perf_counter() - begin - read_seconds
        self._charge(record.name, begin)
        if load.loaded_numel >= record.total_numel and not record.process_last:
            self._process(load)

    def _dry_run(self, record: LayerRecord, name: str, weight: Any, args: tuple,
                 kwargs: dict) -> tuple[int, list[Bounds]]:
        """Elements the call writes into the param (capped at its size) and the source
        windows it reads, from a run on meta; memoized by the call's shape."""
        key = (record.name, name, args, tuple(sorted(kwargs.items())), tuple(weight.shape),
               weight.dtype)
        if key not in self._dry_runs:
            placeholder = record.placeholders[name]
            probe = ProbeWeight(tuple(weight.shape), weight.dtype)
            with WriteCounter(placeholder) as counter:
                placeholder.weight_loader(placeholder, probe, *args, **kwargs)
            self._dry_runs[key] = (min(counter.numel, placeholder.numel()), probe.reads)
        return self._dry_runs[key]

    def own_buffers(self) -> None:
        """Before a transfer buffer is released: copy out the windows still buffered for
        incomplete layers (in plan order there are few or none)."""
        begin = time.perf_counter()
        for load in self._loads.values():
            for call in load.calls:
                call.weight.own()
        self.seconds["transfer"] += time.perf_counter() - begin

    def plan_tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype
                    ) -> PlannedRead | None:
        """Plan mode: the layer ``name`` feeds and this rank's bytes of it (None: not kept)."""
        self._planned_last: PlannedRead | None = None
        self.load([(name, ProbeWeight(shape, dtype))])
        return self._planned_last

    def add_seconds(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    # ---- processing -----------------------------------------------------------------------

    def _process(self, load: LayerLoad) -> None:
        begin = time.perf_counter()
        if self.stage_hook is not None:
            self.stage_hook("process")
        if _writes_kernel_directly(load):
            self._replay_into_kernel(load)
        else:
            self._materialize_and_process(load)
        load.calls.clear()
        load.processed = True
        self.processed.append(load.record.name)
        self.tracker.release(load.record.name)
        self.seconds["process"] += time.perf_counter() - begin
        self._charge(load.record.name, begin)

    def _charge(self, layer: str, begin: float) -> None:
        self.layer_seconds[layer] = (self.layer_seconds.get(layer, 0.0)
                                     + time.perf_counter() - begin)

    def _replay_into_kernel(self, load: LayerLoad) -> None:
        """Model format is kernel format (no quant method): the buffered calls write the
        kernel tensors themselves, with no intermediate copy."""
        record = load.record
        for call in load.calls:
            record.placeholders[call.param].weight_loader(load.kernel[call.param], call.weight,
                                                          *call.args, **call.kwargs)
        self._check(load, load.kernel)
        record.unregister(list(record.placeholders))
        record.register(load.kernel)

    def _materialize_and_process(self, load: LayerLoad) -> None:
        """Materialize, replay and quantize on a side stream; the kernel copy runs on the
        current stream, ordered after the side stream's results (no-ops on CPU)."""
        record = load.record
        current, side = self.sync.current(), self.sync.new_stream()
        self.sync.order(current, side)
        with self.sync.on(side):
            # On the first load the fresh tensors become the kernel tensors: never pooled.
            materialize = _materialize if load.kernel is None else self._from_scratch
            fresh = {n: materialize(n, p, record.restore_device)
                     for n, p in record.placeholders.items()}
            record.register(fresh)
            for call in load.calls:
                record.placeholders[call.param].weight_loader(fresh[call.param], call.weight,
                                                              *call.args, **call.kwargs)
            method = getattr(record.module, "quant_method", None)
            screened = getattr(method, "screened_params", ())
            self._check(load, fresh, skip=screened)
            if method is not None:
                if self.stage_hook is not None:
                    self.stage_hook("quantize")
                method.process_weights_after_loading(record.module)
                if self.check_finite and screened and method.has_nonfinite(record.module):
                    raise _nonfinite_error(load, screened[0], "NaN or Inf")
        self.sync.order(side, current, *record.current().values())
        if load.kernel is not None:
            self._copy_into_kernel(record, load.kernel)

    def _check(self, load: LayerLoad, written: dict[str, torch.Tensor],
               skip: tuple[str, ...] = ()) -> None:
        """NaN/Inf check of what the replay just wrote, before any conversion: the bytes
        are resident and hot, where checking the source windows would fault their pages in
        a second time. A failure is rolled back like any other failure before commit."""
        if not self.check_finite:
            return
        for name in dict.fromkeys(call.param for call in load.calls):
            if name in skip:
                continue  # the quant method's scales reveal it (has_nonfinite)
            tensor = written[name]
            if tensor.is_floating_point() and tensor.numel():
                # min and max are finite exactly when every element is: one fast reduction
                # instead of a full isfinite mask (~20x slower on CPU bf16).
                low, high = torch.aminmax(tensor)
                if not bool(torch.isfinite(low) & torch.isfinite(high)):
                    kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
                    raise _nonfinite_error(load, name, kind)

    def _from_scratch(self, name: str, placeholder: nn.Parameter, device: torch.device
                      ) -> nn.Parameter:
        key = (name, tuple(placeholder.shape), placeholder.dtype, device)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(placeholder.shape, dtype=placeholder.dtype,
                                             device=device)
        return _param_like(placeholder, self._scratch[key])

    @staticmethod
    def _copy_into_kernel(record: LayerRecord, kernel: dict[str, torch.Tensor]) -> None:
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
            target.data.copy_(new)
        record.unregister(list(result))
        record.register(kernel)

    # ---- finishing ------------------------------------------------------------------------

    def finish(self) -> RankReloadStats:
        """Process deferred layers, then settle every layer; raises on partial layers."""
        self._require_started()
        begin = time.perf_counter()
        try:
            for load in self._loads.values():
                if load.record.process_last and self._finalize_now(load):
                    self._process(load)
            incomplete = [load for load in self._loads.values() if not load.processed]
            self._check_incomplete(incomplete)
        except BaseException:
            self.abort()
            raise
        kept = [load.record.name for load in incomplete]
        for load in incomplete:
            self._restore(load)
        self.seconds["finalize"] += time.perf_counter() - begin
        stats = RankReloadStats(
            bytes_read=self.bytes_read, peak_buffered_bytes=self.tracker.peak,
            stage_seconds=dict(self.seconds),
            layers_reloaded=list(self.processed),
            layers_kept=kept, warnings=self.tracker.warnings(),
            buffered_timeline=list(self.tracker.timeline),
            layer_seconds=dict(self.layer_seconds),
        )
        self._has_kernel = self._has_kernel or self._mode == "first"
        self._end()
        return stats

    def _finalize_now(self, load: LayerLoad) -> bool:
        """A process_last layer is processed when complete, on the first load (defaults
        fill what is missing), or when the layer it resets with was reloaded."""
        record = load.record
        if not _complete(load):
            return False
        if load.calls or self._mode == "first":
            return True
        dependency = self._loads.get(record.reset_with) if record.reset_with else None
        return dependency is not None and dependency.processed

    def _check_incomplete(self, incomplete: list[LayerLoad]) -> None:
        partial = [ld for ld in incomplete if ld.loaded_numel > 0 or self._mode == "first"]
        if not partial:
            return
        lines = []
        for load in partial:
            for name, param in load.record.placeholders.items():
                got = load.per_param.get(name, 0)
                if got < param.numel() and not is_optional(param):
                    shards = [s for s in load.shards.get(name, []) if s is not None]
                    seen = f", received shards {shards}" if shards else ""
                    lines.append(f"{load.record.name}.{name} ({got} of {param.numel()} "
                                 f"elements{seen})")
        raise ReloadError("source is missing tensors for: " + "; ".join(lines))

    def abort(self) -> None:
        """Put every not-yet-processed layer back on its kernel tensors and disarm."""
        if self._mode is None:
            return
        for load in self._loads.values():
            if not load.processed:
                self._restore(load)
        self._end()

    def _restore(self, load: LayerLoad) -> None:
        record = load.record
        record.unregister(list(record.placeholders))
        if load.kernel is not None:
            record.register(load.kernel)
        else:
            # First load never completed: leave meta placeholders (nothing to serve yet).
            record.register(dict(record.placeholders))
        load.calls.clear()
        self.tracker.release(record.name)

    def _end(self) -> None:
        self._loads = {}
        self._mode = None

    def _require_started(self) -> None:
        if self._mode is None:
            raise RuntimeError("no reload in progress: call start() first")


def _read_bytes(weight: Any, reads: list[Bounds]) -> int:
    itemsize = torch.empty(0, dtype=weight.dtype).element_size()
    return sum(_numel(b) * itemsize for b in dict.fromkeys(reads))


def _nonfinite_error(load: LayerLoad, param: str, kind: str) -> ReloadError:
    """The error naming the checkpoint tensors that fed ``param``."""
    names = ", ".join(f"'{c.source_name}'" for c in load.calls if c.param == param)
    return ReloadError(f"tensor {names} contains {kind} values (a diverged step?), found in "
                       f"{load.record.name}.{param}; the reload is refused and the engines "
                       "keep their weights")


def _writes_kernel_directly(load: LayerLoad) -> bool:
    """True when the layer has kernel tensors of exactly its model format (no quant method,
    same names, shapes and dtypes) and every param is rewritten or optional-free."""
    record, kernel = load.record, load.kernel
    method = getattr(record.module, "quant_method", None)
    if kernel is None or getattr(method, "converts_weights", False):
        return False
    if set(kernel) != set(record.placeholders):
        return False
    return all(kernel[n].shape == p.shape and kernel[n].dtype == p.dtype
               and not is_optional(p) for n, p in record.placeholders.items())


def _complete(load: LayerLoad) -> bool:
    return load.loaded_numel >= load.record.total_numel


def _numel(bounds: Bounds) -> int:
    return math.prod(hi - lo for lo, hi in bounds)


def _materialize(_name: str, placeholder: nn.Parameter, device: torch.device) -> nn.Parameter:
    return _param_like(placeholder, torch.empty_like(placeholder, device=device))


def _param_like(placeholder: nn.Parameter, storage: torch.Tensor) -> nn.Parameter:
    """``storage`` as a param with the placeholder's attributes (weight_loader, dims),
    optional params filled with their ``fill_value``."""
    param = nn.Parameter(storage, requires_grad=False)
    param.__dict__.update(placeholder.__dict__)
    if is_optional(placeholder):
        param.data.fill_(placeholder.fill_value)
    return param
