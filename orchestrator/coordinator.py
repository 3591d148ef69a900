"""ReloadOrchestrator: the driver-side handle on a fleet of TP engines.

Usage::

    with ReloadOrchestrator(EngineConfig(model="ckpt/step0", tensor_parallel_size=2)) as orch:
        tokens = orch.generate([[1, 2, 3]], max_new_tokens=8)
        rollout = orch.sample([[1, 2, 3]], max_new_tokens=64, temperature=1.0)
        report = orch.reload("ckpt/step1")          # or a dict / iterable of (name, tensor)

Ordering invariants:
  * ``start`` (or entering the context) must be called before any other method; it places
    the engines, forms each engine's process group and performs the first load (version 0).
  * every call reaches all ranks of one engine, because forward passes use collectives; a
    rank that fails raises ``RankError`` naming engine and rank with its traceback text.
  * ``reload`` reaches every rank of every engine: start -> buckets in plan order (at most
    BUCKETS_IN_FLIGHT at once) -> finish -> commit; a layer is processed on each rank the
    moment its last tensor arrives, so a rank buffers about one layer. The version increments
    only when every rank finished; then every rank drops what it computed with the old
    weights (vLLM's prefix cache).
  * ``shutdown`` (or leaving the context) has every rank release its node's shared memory,
    kills the rank actors and frees their placement groups; the orchestrator cannot be
    restarted afterwards.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import ray
import torch

from actors.engines import engine_kind, load_object
from actors.model import ModelSpec
from actors.model.reloadable import route_on_meta
from actors.reload import RANK_STAGES, Routing, TensorSpec, merge_routes
from actors.reload.staged import STAGING_PLACES
from actors.stream import LinkAddress
from actors.transport import BucketMessage, FileBucket, PackedBucket, pack_tensors
from orchestrator.cluster import (
    Engine,
    RankKey,
    close_engines,
    connect_engines,
    create_engine,
    engine_targets,
    gather,
    rank_pids,
    restart_ranks,
)
from orchestrator.config import EngineConfig
from orchestrator.errors import ConfigError, RankError, RecoveryError, ReloadInProgressError
from orchestrator.inventory import Source, TensorInfo, open_source
from orchestrator.plan import ORDERS, Bucket, Order, Plan
from orchestrator.planning import CachedRouting, build_plan, resolve_dtype
from orchestrator.progress import Progress
from orchestrator.report import STAGES, ReloadReport
from orchestrator.serving import EngineCalls
from orchestrator.trainer import TrainerSource, launch, list_trainer
from orchestrator.transaction import CommitLog, committed

log = logging.getLogger("tp_reload")
# Buckets in flight at once: one being consumed by the ranks, one already on its way.
BUCKETS_IN_FLIGHT = 2
# Longest wait at shutdown for the ranks to release their node's shared memory (a rank that
# does not answer is killed anyway; the next start on its node sweeps what it left).
CLOSE_TIMEOUT_S = 10.0


class ReloadOrchestrator(EngineCalls):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.kind = engine_kind(config.engine)
        self.engines: list[Engine] = []
        self.dtype = ""
        self.model_spec: ModelSpec | None = None
        """Parsed config.json of ``config.model`` for engines routed in the driver (native);
        set by ``start()`` or a first ``plan()``."""
        self.load_report: ReloadReport | None = None
        self._version: int | None = None
        self._route: CachedRouting | None = None
        self._log = CommitLog()
        self._pids: dict[RankKey, int] = {}
        # One lock orders reloads and serving calls: a forward never sees a half-applied
        # version, and every rank of an engine receives calls in the same order.
        self._lock = threading.RLock()
        # One reload at a time; a staged reload holds ``_lock`` only for its flip.
        self._reloads = threading.Lock()
        self._routing = threading.Lock()
        self._reloading = False
        self._broken: str | None = None
        # Trainer streams: the driver's rendezvous store (made on the first one) and ids.
        self._link_store: Any = None
        self._stream_ids = itertools.count()

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any) -> ReloadOrchestrator:
        """An orchestrator (not yet started) from the ``engine`` section of a YAML config;
        ``overrides`` replace engine fields (e.g. ``model=``)."""
        from orchestrator.yaml_config import load_engine_config

        return cls(load_engine_config(path, **overrides))

    # ---- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> ReloadOrchestrator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def start(self) -> ReloadOrchestrator:
        """Read ``config.model``, place the engines, form their process groups and load it
        (version 0). A checkpoint the engine cannot run is refused before anything is placed."""
        cfg = self.config
        if self.engines:
            raise RuntimeError("orchestrator is already started")
        first = self._prepare()
        begin = time.perf_counter()
        # Engines that plan in the driver validate the first source before anything is
        # placed; the others as soon as their ranks are up, before any byte moves.
        plan = self._plan(first, "plan", require_all=True) if self.kind.routes_on_driver \
            else None
        plan_seconds = time.perf_counter() - begin
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)
        try:
            targets = engine_targets(cfg)
            self.engines = [create_engine(i, cfg, self.dtype, targets[i])
                            for i in range(cfg.num_engines)]
            connect_engines(self.engines, cfg.timeout_s)
            self._pids = rank_pids(self.engines, cfg.timeout_s)
            if plan is None:
                begin = time.perf_counter()
                plan = self._plan(first, "plan", require_all=True)
                plan_seconds = time.perf_counter() - begin
            self.load_report, messages = self._stream(first, plan, plan_seconds,
                                                      first_load=True, version=0)
            entry = committed(first, messages)
            self._commit(self._log.streams_after(entry, covers_every_layer=True))
        except BaseException:
            self.shutdown()
            raise
        self._log.record(entry, covers_every_layer=True)
        self._version = 0
        log.info("%d engine(s) x TP=%d serving %s (%s) as version 0", cfg.num_engines,
                 cfg.tensor_parallel_size, cfg.model, self.dtype)
        return self

    def shutdown(self) -> None:
        """Every rank releases what it created on its node (vLLM's shared memory), then
        the rank actors are killed and their placement groups freed."""
        engines, self.engines = self.engines, []
        close_engines(engines, min(CLOSE_TIMEOUT_S, self.config.timeout_s))
        for engine in engines:
            engine.kill()
        self._version = None

    # ---- reloading ----------------------------------------------------------------------

    def reload(self, source: Any, order: Order = "plan", strict: bool = True,
               staged: bool = False, staging: str = "device") -> ReloadReport:
        """Stream new weights into every rank of every engine, in place, all or nothing.

        ``source``: a checkpoint directory, a dict name -> tensor, an iterable of
        (name, tensor) in checkpoint format (full, unsharded), or a ``TrainerSource``
        (the trainer's Ray actors stream their shards straight to the engine ranks).
        ``order="plan"`` streams in parent-layer order (one layer buffered at a time);
        ``"source"`` keeps the source's own order. Layers the source does not touch keep
        their weights (``layers_kept``); ``strict=False`` ignores names that match no
        parameter. The version increments only
        when every rank finished; on any failure every rank is rolled back to the last
        committed version before the error is raised. Serving calls wait meanwhile.

        ``staged=True``: serving goes on at the committed version while every rank streams
        and processes the new one into staging tensors (``staging``: 'device', or 'host' for
        pinned host memory on CUDA; one more copy of the layers the source touches, refused
        before any byte moves if it does not fit). Once all ranks staged everything, the
        flip waits for the serving call in flight, copies the staging into the kernel
        tensors in place and commits: serving waits only for the flip
        (``report.pause_seconds``). A failure before the flip drops the staging; the
        engines never stopped serving and were never touched."""
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if staged:
            return self._reload_staged(source, order, strict, staging)
        with self._reloads, self._exclusive(reloading=True):
            begin = time.perf_counter()
            src = self._open(source)
            plan = self._plan(src, order, strict=strict)
            plan_seconds = time.perf_counter() - begin
            version = self.version + 1
            try:
                report, messages = self._stream(src, plan, plan_seconds, first_load=False,
                                                 version=version)
                entry, covers = committed(src, messages), not report.layers_kept
                self._commit(self._log.streams_after(entry, covers))
            except BaseException as error:
                self._recover(error)
                raise
            self._log.record(entry, covers)
            self._version = version
            return replace(report, pause_seconds=report.seconds)

    def _reload_staged(self, source: Any, order: Order, strict: bool, place: str
                       ) -> ReloadReport:
        if place not in STAGING_PLACES:
            raise ValueError(f"staging must be one of {STAGING_PLACES}, got {place!r}")
        if not self.kind.stages:
            raise ConfigError(f"engine={self.config.engine!r} cannot stage reloads yet (its "
                              "model has no twin to stage into): reload unstaged")
        timeout = self.config.timeout_s
        with self._reloads:
            begin = time.perf_counter()
            # Routed in the driver, or on the ranks' twins: planning never stops serving.
            src = self._open(source)
            plan = self._plan(src, order, strict=strict, staged=True)
            plan_seconds = time.perf_counter() - begin
            version = self.version + 1
            try:
                staged = gather(self._submit_all("prepare_staging", list(plan.layers), place),
                                timeout)
                report, messages = self._stream(src, plan, plan_seconds, first_load=False,
                                                version=version, staged=True)
            except BaseException as error:
                self._drop_staging(error)
                raise
            with self._exclusive(reloading=True):  # waits for the serving call in flight
                flip_begin = time.perf_counter()
                try:
                    gather(self._submit_all("flip_staged"), timeout)
                    entry, covers = committed(src, messages), not report.layers_kept
                    self._commit(self._log.streams_after(entry, covers))
                    if self.config.kv_scales == "calibrate":
                        self._calibrate(self.calibration_tokens())
                except BaseException as error:
                    self._recover(error)
                    raise
                self._log.record(entry, covers)
                self._version = version
                pause = time.perf_counter() - flip_begin
        return replace(report, seconds=time.perf_counter() - begin, staged=True,
                       pause_seconds=pause, staging_bytes=max(staged.values()))

    def _drop_staging(self, error: BaseException) -> None:
        """A staged reload failed before its flip: every rank drops its staging. Only a
        rank that died (and was restarted) makes its engine wait, for its rebuild."""
        try:
            if rank_pids(self.engines, self.config.timeout_s) == self._pids:
                gather(self._submit_all("abort_reload"), self.config.timeout_s)
                return
        except RankError:
            pass
        with self._exclusive(reloading=True):
            self._recover(error)

    def plan(self, source: Any, order: Order = "plan", strict: bool = True) -> Plan:
        """The schedule a reload of ``source`` would follow (validated; nothing is sent).
        Engines routed in the driver (native) plan before ``start()`` too, without Ray."""
        with self._exclusive():
            if not self.engines:
                if not self.kind.routes_on_driver:
                    raise RuntimeError(f"engine={self.config.engine!r} plans on its ranks: "
                                       "start() the orchestrator first")
                if not self.dtype:
                    self._prepare()
            return self._plan(self._open(source), order, strict=strict)

    def _open(self, source: Any) -> Source:
        if isinstance(source, TrainerSource):
            return list_trainer(source, self.config.timeout_s)
        return open_source(source)

    def _prepare(self) -> Source:
        """List ``config.model``, resolve the dtype from it and let the engine check it
        against the model's config.json; ConfigError names the path."""
        cfg = self.config
        first = open_source(cfg.model)
        self.dtype = resolve_dtype(cfg.dtype, list(first.tensors))
        try:
            self.model_spec = load_object(self.kind.check_model)(cfg.options(self.dtype))
        except ValueError as exc:
            where = "" if cfg.model in str(exc) else f"{cfg.model}/config.json: "
            raise ConfigError(f"{where}{exc}") from exc
        return first

    def _plan(self, source: Source, order: Order, *, strict: bool = True,
              require_all: bool = False, staged: bool = False) -> Plan:
        with self._routing:  # plan() may run beside a staged reload's planning
            plan, self._route = build_plan(
                source, route=partial(self._route_tensors, staged=staged),
                bucket_bytes=self.config.bucket_bytes,
                order=order, cached=self._route, strict=strict, require_all=require_all)
        return plan

    def _route_tensors(self, tensors: list[TensorSpec], staged: bool = False) -> Routing:
        """Dry-run ``tensors`` through every rank's loaders: on meta copies here, or on the
        ranks of engine 0 (every engine is the same) for engines that build their models
        only in a rank (on their twins when ``staged``, as the live models serve)."""
        cfg = self.config
        if self.kind.routes_on_driver:
            return route_on_meta(self.model_spec, cfg.tensor_parallel_size,
                                 getattr(torch, self.dtype), cfg.quant, tensors, log)
        routes = gather(self.engines[0].submit("route", tensors, staged), cfg.timeout_s)
        return merge_routes([routes[key] for key in sorted(routes)], tensors)

    def _commit(self, live_streams: tuple[int, ...]) -> None:
        """Every rank finished: each drops what it computed with the old weights, and what
        it kept of trainer streams the commit log no longer holds."""
        gather(self._submit_all("commit", live_streams), self.config.timeout_s)

    def _stream(self, source: Source, plan: Plan, plan_seconds: float, *, first_load: bool,
                version: int, staged: bool = False
                ) -> tuple[ReloadReport, list[FileBucket | PackedBucket]]:
        begin = time.perf_counter() - plan_seconds
        # A rank runs its calls in submission order: start, buckets and finish are queued
        # back to back and awaited together, so no round trip waits on another.
        progress = Progress(f"load v{version}", sum(b.nbytes for b in plan.buckets),
                            len(plan.buckets), enabled=self.config.progress)
        started = self._submit_all("start_reload", first_load, staged)
        loading, messages, pack_seconds = self._send(source, plan, progress)
        finishing = self._submit_all("finish_reload")
        try:
            gather(started, self.config.timeout_s)
            for calls, nbytes in loading:
                gather(calls, self.config.timeout_s)
                progress.advance(nbytes)
            stats = gather(finishing, self.config.timeout_s)
            sent = source.stream.wait(self.config.timeout_s) if source.stream else []
        except BaseException as error:
            if source.stream is None:
                raise
            blamed = source.stream.blame(error, self.config.timeout_s)
            if blamed is error:
                raise
            raise blamed from error
        finally:
            progress.close()
        stage = {name: max(s["stage_seconds"][name] for s in stats.values())
                 for name in RANK_STAGES}
        stage["plan"] = plan_seconds
        stage["transfer"] += pack_seconds
        if self.config.kv_scales == "calibrate" and not staged:  # staged: after the flip
            calibrate_begin = time.perf_counter()
            self._calibrate(self.calibration_tokens())
            stage["finalize"] += time.perf_counter() - calibrate_begin
        first = stats[min(stats)]
        report = ReloadReport(
            version=version, seconds=time.perf_counter() - begin,
            stage_seconds={name: stage[name] for name in STAGES},
            bytes_read={key: s["bytes_read"] for key, s in sorted(stats.items())},
            peak_buffered_bytes=max(s["peak_buffered_bytes"] for s in stats.values()),
            predicted_peak_buffered_bytes=plan.predicted_peak_buffered_bytes,
            layers_reloaded=first["layers_reloaded"], layers_kept=first["layers_kept"],
            warnings=[f"engine {e} rank {r}: {w}" for (e, r), s in sorted(stats.items())
                      for w in s["warnings"]],
            order=plan.order, source=source.description, source_bytes=source.nbytes,
            buckets=len(plan.buckets), buffered_timeline=first["buffered_timeline"],
            bytes_sent=dict(enumerate(sent)), **self._by_kind(plan, stats),
        )
        for warning in report.warnings:
            log.warning(warning)
        return report, messages

    def _by_kind(self, plan: Plan, stats: dict[RankKey, dict]) -> dict[str, dict]:
        kinds = self._route[1].layer_kinds
        nbytes: dict[str, int] = {}
        for tensor in plan.tensors:
            kind = kinds[tensor.layer]
            nbytes[kind] = nbytes.get(kind, 0) + tensor.nbytes
        seconds: dict[str, float] = {}
        for rank_stats in stats.values():
            for layer, spent in rank_stats["layer_seconds"].items():
                seconds[kinds[layer]] = seconds.get(kinds[layer], 0.0) + spent
        return {"bytes_by_kind": nbytes, "seconds_by_kind": seconds}

    def _send(self, source: Source, plan: Plan, progress: Progress) -> tuple[
            deque[tuple[dict[RankKey, ray.ObjectRef], int]], list[BucketMessage], float]:
        """Queue the plan's buckets on every rank of every engine. Packed (in-memory)
        buckets hold object-store memory, so at most BUCKETS_IN_FLIGHT of them are pending;
        a directory bucket is only names; a trainer stream's buckets are per-rank piece
        lists (the trainer's ranks send the bytes). Returns the pending calls with their
        bucket's bytes, the messages (for the commit log) and the packing seconds."""
        if source.kind == "trainer":
            steps, replay = launch(source.stream, plan, source, self._route[1], self.engines,
                                   self._link_address(source), next(self._stream_ids))
            return deque(steps), replay, 0.0
        in_flight: deque[tuple[dict[RankKey, ray.ObjectRef], int]] = deque()
        messages: list[FileBucket | PackedBucket] = []
        pack_seconds = 0.0
        infos = {t.name: t for t in source.tensors}
        for bucket in plan.buckets:
            start = time.perf_counter()
            messages.append(self._message(source, infos, bucket))
            pack_seconds += time.perf_counter() - start
            in_flight.append((self._submit_all("load_bucket", messages[-1]), bucket.nbytes))
            if source.kind == "memory" and len(in_flight) >= BUCKETS_IN_FLIGHT:
                calls, nbytes = in_flight.popleft()
                gather(calls, self.config.timeout_s)
                progress.advance(nbytes)
        return in_flight, messages, pack_seconds

    def _link_address(self, source: Source) -> LinkAddress:
        """Where this reload's trainer stream meets: the driver's store, a fresh prefix."""
        import torch.distributed as dist

        if self._link_store is None:
            self._link_store = dist.TCPStore(ray.util.get_node_ip_address(), 0,
                                             is_master=True, wait_for_workers=False)
        world = len(source.stream.source.actors) + sum(len(e.ranks) for e in self.engines)
        backend = "nccl" if self.config.device == "cuda" and source.stream.on_cuda else "gloo"
        return LinkAddress(ray.util.get_node_ip_address(), self._link_store.port,
                           f"tp-reload/stream/{id(self)}/{time.monotonic_ns()}/", world,
                           backend, self.config.timeout_s)

    @staticmethod
    def _message(source: Source, infos: dict[str, TensorInfo], bucket: Bucket
                 ) -> FileBucket | PackedBucket:
        if source.kind == "dir":
            return FileBucket(tuple(infos[t.name].file_entry() for t in bucket.tensors))
        entries, arrays = pack_tensors([(t.name, source.data[t.name]) for t in bucket.tensors])
        return PackedBucket(entries, [ray.put(arrays)])

    # ---- recovery -----------------------------------------------------------------------

    def _recover(self, error: BaseException) -> None:
        """After a failed reload: restarted ranks rejoin their engine, and every rank
        replays the commit log back to the last committed version."""
        timeout = self.config.timeout_s
        try:
            restarted = self._rejoin_restarted(timeout)
            gather(self._submit_all("abort_reload"), timeout)
            self._replay(restarted)
            self._commit(self._log.streams())
        except BaseException as exc:
            self._broken = (f"a failed reload ({error}) could not be rolled back ({exc}); "
                            "restart the orchestrator")
            raise RecoveryError(self._broken) from exc
        if restarted:
            error.add_note(f"restarted rank(s) {sorted(restarted)} were rebuilt")
        error.add_note(f"every rank of every engine is back on version {self._version}")
        log.warning("reload failed (%s); restored version %s on every rank", error, self._version)

    def _rejoin_restarted(self, timeout: float) -> set[RankKey]:
        """Ranks Ray restarted (a new pid) form a new process group with their engine. A
        native rank joins its live peers; an engine that forms its group once per process
        (vLLM) is restarted whole, which also frees a peer blocked in a collective with the
        dead rank. Returns every rank that is now a fresh process."""
        pids = rank_pids(self.engines, timeout)
        restarted = {key for key, pid in pids.items() if pid != self._pids.get(key)}
        for engine in self.engines:
            ranks = {key for key in pids if key[0] == engine.index}
            if not ranks & restarted:
                continue
            if self.kind.rejoins:
                gather(engine.submit("reset_distributed"), timeout)
            else:
                pids.update(restart_ranks(engine, ranks - restarted, pids, timeout))
                restarted |= ranks
            connect_engines([engine], timeout)
        self._pids = pids
        return restarted

    def _replay(self, restarted: set[RankKey]) -> None:
        timeout = self.config.timeout_s
        for index, entry in enumerate(self._log.entries):
            entry.check_unchanged()
            started = {
                (e.index, r): actor.start_reload.remote(index == 0 and (e.index, r) in restarted)
                for e in self.engines for r, actor in enumerate(e.ranks)
            }
            loading = [self._submit_all("load_bucket", message) for message in entry.messages]
            finishing = self._submit_all("finish_reload")
            for calls in (started, *loading, finishing):
                gather(calls, timeout)
        if self.config.kv_scales == "calibrate":
            self._calibrate(self.calibration_tokens())

    # ---- serving ------------------------------------------------------------------------

    @contextmanager
    def _exclusive(self, reloading: bool = False) -> Iterator[None]:
        """Hold the engines: serving calls wait for a running reload (or, with
        serve_during_reload='fail', raise at once) and a reload waits for them."""
        if self._broken is not None:
            raise RecoveryError(self._broken)
        if (not reloading and self._reloading
                and self.config.serve_during_reload == "fail"):
            raise ReloadInProgressError("a reload is running (serve_during_reload='fail')")
        with self._lock:
            if self._broken is not None:
                raise RecoveryError(self._broken)
            self._reloading = reloading or self._reloading
            try:
                yield
            finally:
                if reloading:
                    self._reloading = False

    @property
    def version(self) -> int:
        """0 after the first load; each committed reload adds one."""
        if self._version is None:
            raise RuntimeError("orchestrator is not started")
        return self._version

    def _engine(self, engine: int) -> Engine:
        if not self.engines:
            raise RuntimeError("orchestrator is not started (use it as a context manager)")
        if not 0 <= engine < len(self.engines):
            raise ValueError(f"engine={engine} out of range (num_engines={len(self.engines)})")
        return self.engines[engine]

    def _submit_all(self, method: str, *args: Any) -> dict[RankKey, ray.ObjectRef]:
        calls: dict[RankKey, ray.ObjectRef] = {}
        for engine in self.engines:
            calls.update(engine.submit(method, *args))
        return calls

    def _on_engine(self, engine: int, method: str, *args: Any) -> dict[int, Any]:
        with self._exclusive():
            try:
                results = gather(self._engine(engine).submit(method, *args),
                                 self.config.timeout_s)
            except RankError as error:
                self._rebuild_if_restarted(error)
                raise
        return {rank: value for (_, rank), value in sorted(results.items())}

    def _rebuild_if_restarted(self, error: RankError) -> None:
        """A rank that died while serving comes back empty: rebuild it before the error
        reaches the caller, so the next call is served at the committed version."""
        if rank_pids(self.engines, self.config.timeout_s) != self._pids:
            self._recover(error)
