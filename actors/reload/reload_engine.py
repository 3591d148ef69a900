"""The layerwise reload engine of one rank, driving any ``ReloadableModel``.

``start`` arms every layer (a reload: every layer of its plan, and the ``process_last``
layers those reset; the others go on serving untouched): its live kernel tensors are set
aside and meta placeholders put back, each with a wrapped ``weight_loader``. A wrapped call
is dry-run on meta (counting the elements it writes and the source boxes it reads), the
boxes are read into rank memory, and the call is buffered. When a layer's count reaches its
total it is processed at once (``actors.reload.layer_writer``): the calls replayed into the
kernel tensors, or into placeholders materialized on ``restore_device``, the model's
``process`` run, results copied into the original kernel tensors, and those original objects
re-registered, so every ``data_ptr`` the engine serves from survives. ``finish`` processes
``process_last`` (attention) layers, keeps the old tensors of layers that received nothing
and rejects partly loaded ones.

Failure consensus: a layer whose processing communicates with the engine's other ranks
(``collective``, e.g. vLLM's online FP8 reduces amax over the TP group) is processed only
after every rank agreed it is healthy (``consensus``, one tiny all-reduce). A rank that
fails keeps going through the stream without reading or processing (dry accounting only), so
it reaches the same agreement points as its peers; every rank then raises at the end of the
same call, and no rank waits in a collective for a peer that gave up.

The first load is the same path with no kernel tensors yet: the processed tensors become the
kernel tensors. ``mode="plan"`` only dry-runs (``actors.reload.routes``), to tell the planner
which layer each source tensor feeds and how many bytes each rank keeps of it; it leaves the
model as it found it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from typing import Any, Literal

import torch
from torch import nn

from actors.reload.errors import PeerFailedError, ReloadError
from actors.reload.layer_writer import LayerWriter
from actors.reload.meta import (
    PrefetchedWeight,
    ProbeWeight,
    WriteCounter,
    read_window,
    recorded,
)
from actors.reload.model import LayerRecord, ReloadableModel, is_optional
from actors.reload.params import empty_like_on, geometry, mirror, param_like, read_bytes
from actors.reload.pinned_host import PinnedHost
from actors.reload.side_streams import SideStreams
from actors.reload.tracker import BufferTracker
from actors.reload.types import (
    BufferedCall,
    DryRun,
    LayerLoad,
    PlannedRead,
    RankReloadStats,
)
from quant.sync import DeviceSync

Mode = Literal["first", "reload", "plan"]
RANK_STAGES = ("transfer", "load", "process", "finalize")
"""Where a rank's reload seconds go (``RankReloadStats.stage_seconds``)."""


class ReloadEngine:
    def __init__(self, model: ReloadableModel, device: torch.device, log: Any,
                 check_finite: bool = True) -> None:
        self.model = model
        self.log = log
        self.records = model.records()
        self.layer_names = [r.name for r in self.records]
        self.sync = DeviceSync(device)
        self.pinned = PinnedHost(device)
        self.check_finite = check_finite
        self.side_streams = SideStreams(self.sync)
        # Called with a stage name ('process', 'quantize') before that work: fault injection.
        self.stage_hook: Any = None
        self.writer = LayerWriter(model, self.sync, self.side_streams, check_finite)
        # A loader's dry run depends only on the call's shape: run it once, reuse it after.
        self._dry_runs: dict[tuple, DryRun] = {}
        # The meta params that stand in for each layer's params during a reload: built once
        # (a few ms for a deep model), their loaders find the reload's LayerLoad by name.
        self._armed_params: dict[str, dict[str, nn.Parameter]] = {}
        self._loads: dict[str, LayerLoad] = {}
        self._unarmed: set[str] = set()
        """Layers this reload leaves as they serve (not in its plan)."""
        self._mode: Mode | None = None
        self._has_kernel = False
        self._planned: list[PlannedRead] = []
        # Agreement of the engine's ranks before collective processing: ok -> all ok.
        self.consensus: Callable[[bool], bool] | None = None
        self._failed: BaseException | None = None

    @property
    def has_kernel(self) -> bool:
        """Whether the layers hold kernel tensors (after a first load, or built loaded)."""
        return self._has_kernel

    def adopt_kernel(self) -> None:
        """The model was built holding kernel tensors (an engine that initializes its own
        weights): every load, the first included, copies into them."""
        self._has_kernel = True

    # ---- arming ---------------------------------------------------------------------------

    def start(self, mode: Mode, layers: Collection[str] | None = None) -> None:
        """Arm the layers this load writes: every layer, or for a reload given ``layers``
        (the plan's) those and the process_last layers they reset. The others are left as
        they serve (a reload of one tensor pays for one layer, not for arming them all)."""
        if self._mode is not None:
            raise RuntimeError("a reload is already in progress on this rank")
        if mode == "reload" and not self._has_kernel:
            raise RuntimeError("reload before the first load")
        self._mode = mode
        self._failed = None
        self.tracker = BufferTracker(self.log)
        self.pinned.reset()
        self.side_streams.start()
        self.seconds = dict.fromkeys(RANK_STAGES, 0.0)
        self.bytes_read = 0
        self.processed: list[str] = []
        self.layer_seconds: dict[str, float] = {}
        self._loads = {}
        armed = self._to_arm(layers) if mode == "reload" else None
        self._unarmed = set() if armed is None else \
            {r.name for r in self.records} - armed
        for record in self.records:
            if record.name in self._unarmed:
                continue
            # Plan mode sets the live tensors aside too: abort() puts them back.
            kernel = record.current() if mode != "first" else None
            # Only the placeholders' names are swapped: other kernel tensors (scales,
            # buffers) stay registered for processing that reads them.
            record.unregister(list(record.placeholders))
            self._loads[record.name] = LayerLoad(record, kernel)
            record.register(self._armed(record))

    def _to_arm(self, layers: Collection[str] | None) -> set[str] | None:
        if layers is None:
            return None
        chosen = set(layers)
        return chosen | {r.name for r in self.records if r.reset_with in chosen}

    def _armed(self, record: LayerRecord) -> dict[str, nn.Parameter]:
        if record.name not in self._armed_params:
            self._armed_params[record.name] = {
                name: self._armed_param(record.name, name, placeholder)
                for name, placeholder in record.placeholders.items()}
        return self._armed_params[record.name]

    def _armed_param(self, layer: str, name: str, placeholder: nn.Parameter) -> nn.Parameter:
        armed = param_like(placeholder, empty_like_on(placeholder, "meta"))

        # The parameter names are the loader convention's: engines pass them by keyword.
        def weight_loader(param: torch.Tensor, loaded_weight: Any, *args: Any, **kwargs: Any
                          ) -> Any:
            return self._on_load(self._loads[layer], name, loaded_weight, args, kwargs)

        armed.weight_loader = weight_loader
        return armed

    # ---- loading --------------------------------------------------------------------------

    def load(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Feed checkpoint-format ``(name, weight)`` pairs through the model's own mapping.
        Raises this rank's first error (or its peers') once every pair went through."""
        self._require_started()
        with torch.no_grad():
            self.model.load_weights(weights)
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise self._failed

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def fail(self, error: BaseException) -> None:
        """Record a failure: from now on this reload only keeps count (see the module doc)."""
        if self._failed is None:
            self._failed = error

    def _on_load(self, load: LayerLoad, name: str, weight: Any, args: tuple, kwargs: dict
                 ) -> Any:
        if self._mode == "plan":
            return self._plan_call(load, name, weight, args, kwargs)
        if self._failed is None:
            try:
                return self._load_call(load, name, weight, args, kwargs)
            except Exception as exc:  # noqa: BLE001 - raised by load() once peers caught up
                self.fail(exc)  # _load_call fails only before it counts the call
        return self._count_only(load, name, weight, args, kwargs)

    def _count_only(self, load: LayerLoad, name: str, weight: Any, args: tuple, kwargs: dict
                    ) -> Any:
        """After a failure: keep the layer counts without reading, so collective layers
        complete at the same points as on the healthy ranks."""
        try:
            run = self._dry_run(load.record, name, weight, args, kwargs)
        except Exception:  # noqa: BLE001 - this rank already failed; nothing more to learn
            return None
        load.loaded_numel += run.written
        self._complete_if_ready(load)
        return run.result

    def _plan_call(self, load: LayerLoad, name: str, weight: Any, args: tuple, kwargs: dict
                   ) -> Any:
        record = load.record
        run = self._dry_run(record, name, weight, args, kwargs)
        self._planned.append(PlannedRead(
            record.name, f"{record.name}.{name}", record.placeholders[name].dtype, run.written,
            _shard_of(args, kwargs), read_bytes(weight.dtype, run.reads),
            tuple(dict.fromkeys(run.reads))))
        return run.result

    def _load_call(self, load: LayerLoad, name: str, weight: Any, args: tuple, kwargs: dict
                   ) -> Any:
        begin = time.perf_counter()
        record = load.record
        if load.settled:
            raise ReloadError(f"layer {record.name} received '{name}' after it was complete "
                              "(a tensor was sent twice?)")
        shard = _shard_of(args, kwargs)
        if shard in load.shards.get(name, []):
            raise ReloadError(f"{record.name}.{name} received shard {shard!r} twice "
                              "(the same tensor appears twice in the source?)")
        run = self._dry_run(record, name, weight, args, kwargs)
        read_begin = time.perf_counter()
        read = {b: read_window(weight, b) for b in dict.fromkeys(run.reads)}
        windows = {b: self.pinned.copy(w) for b, w in read.items()}
        read_seconds = time.perf_counter() - read_begin
        # Plain tensors reaching a loader are views of the source or the transfer buffer;
        # a staged window is a copy of its own.
        borrowed = (getattr(weight, "borrowed", isinstance(weight, torch.Tensor))
                    and all(windows[b] is w for b, w in read.items()))
        buffered = mirror(PrefetchedWeight, weight, windows, borrowed=borrowed)
        self.bytes_read += buffered.nbytes
        self.seconds["transfer"] += read_seconds
        load.calls.append(BufferedCall(name, args, kwargs, buffered,
                                       getattr(weight, "name", "") or "?", run.copies))
        load.loaded_numel += run.written
        load.per_param[name] = load.per_param.get(name, 0) + run.written
        load.writes[name] = load.writes.get(name, 0) + run.writes
        load.shards.setdefault(name, []).append(shard)
        self.tracker.add(record.name, buffered.nbytes)
        self.seconds["load"] += time.perf_counter() - begin - read_seconds
        self._charge(record.name, begin)
        self._complete_if_ready(load)
        return run.result

    def _complete_if_ready(self, load: LayerLoad) -> None:
        if _complete(load) and not load.settled and not load.record.process_last:
            self._process(load)

    def _dry_run(self, record: LayerRecord, name: str, weight: Any, args: tuple,
                 kwargs: dict) -> DryRun:
        """The call run on meta; memoized by the call's shape."""
        key = (record.name, name, args, tuple(sorted(kwargs.items())), geometry(weight),
               weight.dtype)
        if key not in self._dry_runs:
            placeholder = record.placeholders[name]
            probe = mirror(ProbeWeight, weight)
            with WriteCounter(placeholder) as counter:
                result = placeholder.weight_loader(placeholder, probe, *args, **kwargs)
            copies = recorded(counter, probe, placeholder) if self.model.replays_copies else None
            self._dry_runs[key] = DryRun(min(counter.numel, placeholder.numel()), probe.reads,
                                         result, counter.numel + counter.changed, copies)
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
                    ) -> list[PlannedRead]:
        """Plan mode: every loader call ``name`` makes on this rank (none: not kept)."""
        self._planned = []
        self.load([(name, ProbeWeight(shape, dtype, name))])
        return self._planned

    def add_seconds(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    # ---- processing -----------------------------------------------------------------------

    def _process(self, load: LayerLoad) -> None:
        """Process a complete layer; never raises (the error is recorded, see ``fail``)."""
        begin = time.perf_counter()
        error = self._failed
        if error is None:
            try:
                self._at_stage("process")
                self.writer.prepare(load)
                if load.record.converts:
                    self._at_stage("quantize")
            except Exception as exc:  # noqa: BLE001 - agreed on below, raised by load()
                error = exc
            # Verdicts of earlier layers' screens, now that this layer's transfer is queued;
            # all of them before agreeing with the other ranks.
            error = error or self.side_streams.read_screens(lag=not load.record.collective)
        if load.record.collective and self.consensus is not None:
            everyone_ok = self.consensus(error is None)
            if error is None and not everyone_ok:
                error = PeerFailedError("another rank of this engine failed; this rank "
                                        "stops too")
        if error is None:
            try:
                self.writer.convert(load)
            except Exception as exc:  # noqa: BLE001 - raised by load()
                error = exc
        if error is not None:
            self.fail(error)  # abort() puts the layer back (it is not ``processed``)
        else:
            load.processed = True
            self.processed.append(load.record.name)
        load.calls.clear()
        load.settled = True
        self.tracker.release(load.record.name)
        self.seconds["process"] += time.perf_counter() - begin
        self._charge(load.record.name, begin)

    def _at_stage(self, stage: str) -> None:
        if self.stage_hook is not None:
            self.stage_hook(stage)

    def _charge(self, layer: str, begin: float) -> None:
        self.layer_seconds[layer] = (self.layer_seconds.get(layer, 0.0)
                                     + time.perf_counter() - begin)

    # ---- finishing ------------------------------------------------------------------------

    def finish(self) -> RankReloadStats:
        """Process deferred layers, then settle every layer; raises on partial layers."""
        self._require_started()
        begin = time.perf_counter()
        try:
            for load in self._loads.values():
                if load.record.process_last and self._finalize_now(load):
                    self._process(load)
            screened = self.side_streams.read_screens(lag=False)
            if screened is not None:
                self.fail(screened)
            self._raise_if_failed()
            incomplete = [load for load in self._loads.values() if not load.settled]
            self._check_incomplete(incomplete)
        except BaseException:
            self.abort()
            raise
        unsettled = {load.record.name for load in incomplete} | self._unarmed
        kept = [r.name for r in self.records if r.name in unsettled]
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
        self.side_streams.clear()
        self._mode = None

    def _require_started(self) -> None:
        if self._mode is None:
            raise RuntimeError("no reload in progress: call start() first")


def _shard_of(args: tuple, kwargs: dict) -> Any:
    """What tells two calls into one param apart: the shard id (``'q'``, ``0``, an expert's
    ``(3, 'w1')``), or the whole call when a loader takes several arguments by keyword."""
    if not kwargs:
        return args[0] if len(args) == 1 else (args or None)
    return (*args, *(f"{k}={v!r}" for k, v in sorted(kwargs.items())))


def _complete(load: LayerLoad) -> bool:
    return load.loaded_numel >= load.record.total_numel
