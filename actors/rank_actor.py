"""One tensor-parallel rank of one engine. The driver wraps this class with ``ray.remote``
(``orchestrator.cluster``); nothing here imports the driver side. The engine itself (native or
vLLM) is a ``RankRuntime`` named by ``EngineOptions.engine``; this actor owns what every
engine shares: the layerwise reload engine, fault drills, failure consensus and reporting.

Lifecycle, each step called on every rank of the engine by the driver:
``store_address`` (rank 0 only) -> ``init_distributed`` (starts the step loop,
``actors.step_loop``) -> ``start_reload(first_load=True)`` (parks the loop) ->
``load_bucket``* -> ``finish_reload`` -> ``commit`` -> ``resume`` -> serve (``submit`` /
``cancel`` / ``events`` on rank 0, ``forward`` / ``inspect`` / ``get_tensors`` on every
rank), and for every plain reload again ``start_reload`` -> ``load_bucket``* ->
``finish_reload`` (or ``abort_reload``) -> ``commit`` -> ``resume``, the three middle ones in
one call (``reload_all``) for a source whose messages name what ranks read; a rollback
``pause``s first; a staged one streams while the loop steps and ends with ``flip_staged`` ->
``commit``; ``close`` before the actor is killed.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import asdict
from typing import Any

import ray
import torch

from actors import node_shm
from actors.engines import EngineOptions, EnginePlugin
from actors.engines.runtime import (
    CalibratesKvScales,
    CapturesCudaGraphs,
    RankContext,
    RankRuntime,
    Rejoins,
    Request,
    ServesLogits,
    ServingLimits,
    check_capabilities,
)
from actors.lazy import TensorEntry
from actors.reload import RankRoute, ReloadEngine, StageableModel, TensorSpec, route_rank
from actors.reload.meta import ProbeWeight
from actors.reload.staging_area import StagingArea
from actors.step_loop import Delta, InFlight, StepLoop
from actors.transports.base import BucketMessage, BucketReader, LinkMessage
from actors.transports.cuda_ipc import gpu_uuid
from actors.transports.object_store import pack_tensors


def process_memory() -> dict[str, int]:
    """{'rss_bytes', 'peak_rss_bytes'} of this process (VmRSS, VmHWM)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) * 1024
    return {"rss_bytes": fields["VmRSS"], "peak_rss_bytes": fields["VmHWM"]}


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux clear_refs '5')."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# How long a rebuilt rank waits for the killed processes of the instance it replaces to exit.
REPLACED_EXIT_S = 10.0
# Calls that must answer while the rank is busy with another call (or stuck in a collective
# whose peer died): Ray runs them on a thread of their own.
CONTROL_GROUP = "control"
# Serving calls run on a thread of their own too, so they go on while a staged reload streams
# into the staging tensors on the main one. The driver's lock keeps them apart from plain
# reloads and from the flip.
SERVE_GROUP = "serve"
# Rank 0 takes requests and hands out what the steps produced on threads of their own: a
# long poll for events must not hold up a submission, nor either wait behind a serving call.
SUBMIT_GROUP = "submit"
EVENTS_GROUP = "events"


class RankLogger(logging.LoggerAdapter):
    def process(self, msg: str, kwargs: Any) -> tuple[str, Any]:
        return f"{self.extra['prefix']} {msg}", kwargs


def probe_items(bucket: BucketMessage) -> list[tuple[str, ProbeWeight]]:
    """A bucket's tensors as shapes only: what a rank that already failed feeds through,
    to keep counting in step with its peers without reading a byte."""
    return [(e.name, ProbeWeight(e.shape, getattr(torch, e.dtype), e.name))
            for e in bucket.entries]



def freeze_long_lived() -> None:
    """Once the rank's first version is committed: everything alive now (the engine, its
    model, Ray's and torch's modules, some 200k objects) lives as long as the process, so
    the collector stops scanning it. Its full collections cost ~14 ms per reload on the
    native 0.5B model here; afterwards ~0.6 ms. Garbage made later is collected as ever."""
    gc.collect()
    gc.freeze()


class RankActor:
    def __init__(self, *, engine: int, rank: int, plugin: EnginePlugin, options: EngineOptions,
                 timeout_s: float, check_finite: bool = True) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        self.log = RankLogger(logging.getLogger("tp_reload.rank"),
                              {"prefix": f"[engine {engine} rank {rank}]"})
        self.rank = rank
        self.check_finite = check_finite
        context = RankContext(engine, rank, options.tensor_parallel_size, timeout_s, self.log)
        self.plugin = plugin
        self.runtime: RankRuntime = plugin.runtime_class()(options, context)
        check_capabilities(plugin, self.runtime)
        self.reloader: ReloadEngine | None = None
        # The reload in progress: ``reloader``, or the staging area's engine while staged.
        self.active: ReloadEngine | None = None
        self.staging_area: StagingArea | None = None
        self.loaded = False
        self.instance: str | None = None
        """The engine instance this rank joined (``actors.node_shm``)."""
        self._fault: tuple[str, str, str | None] | None = None
        # What transports keep on this rank to replay committed sources the commit log still
        # needs (a trainer stream's received boxes, by id), and this reload's until it commits.
        self._kept: dict[int, Any] = {}
        self._pending: tuple[int, Any] | None = None
        self.loop: StepLoop | None = None
        self._timeout_s = timeout_s
        self._frozen = False
        """Whether what lived at the first commit was frozen out of collection."""

    # ---- distributed set-up -------------------------------------------------------------

    def store_address(self) -> tuple[str, int]:
        """Rank 0 only: where the engine's ranks meet."""
        return self.runtime.rendezvous()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def ping(self) -> int:
        return os.getpid()

    def reset_distributed(self) -> None:
        """Leave the engine's process group (after a peer died) so a new one can form. The
        step loop goes with it: the driver submits its running requests again."""
        self._stop_loop()
        self._capable(Rejoins).leave()

    def _stop_loop(self) -> None:
        if self.loop is not None:
            self.loop.stop()
            self.loop = None

    def init_distributed(self, host: str, port: int, instance: str,
                         replaces: str | None = None) -> list[tuple[str, int]]:
        """Join the engine instance ``instance`` (built the first time). Before anything is
        built, shared memory that dead engine instances left on this node is removed, the
        one this instance ``replaces`` (a rebuild: its processes were just killed) once its
        processes on this node are gone. Returns what was removed (path, bytes)."""
        if replaces is not None and not node_shm.await_owners(replaces, REPLACED_EXIT_S):
            self.log.warning("a process of engine instance %s still runs %.0fs after it was "
                             "killed; its shared memory is left to a later start", replaces,
                             REPLACED_EXIT_S)
        removed = node_shm.sweep(self.log)
        self.instance = instance
        self.runtime.join(host, port, instance)
        if self.reloader is None:
            if self.plugin.supports("staging") != isinstance(self.runtime.reloadable(),
                                                             StageableModel):
                raise TypeError(f"engine {self.plugin.name!r}: its model must be a "
                                "StageableModel exactly when it declares 'staging'")
            self.reloader = ReloadEngine(self.runtime.reloadable(), self.runtime.device,
                                         self.log, self.check_finite)
            self.reloader.stage_hook = self._at_stage
            self.reloader.consensus = self.runtime.consensus
            if self.runtime.builds_loaded:
                self.reloader.adopt_kernel()
        self._start_loop(version=None)
        return removed

    def _start_loop(self, version: int | None) -> None:
        self.loop = StepLoop(self.runtime, self.rank, self.runtime.context.world_size,
                             self._flip_to, self.log, self._timeout_s)
        self.loop.version = version

    @ray.method(concurrency_group=SERVE_GROUP)
    def restart_loop(self) -> None:
        """Every rank of the engine: the step loop failed on some rank while none died. Its
        requests were ended; a new loop starts with an empty batch."""
        version = self.loop.version
        self._stop_loop()
        self.runtime.abort(self.runtime.running())
        self._start_loop(version)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def running_requests(self) -> int:
        """Requests this rank's engine is generating (admitted, unfinished)."""
        return 0 if self.loop is None else self.loop.running_count

    @ray.method(concurrency_group=CONTROL_GROUP)
    def loop_failure(self) -> str | None:
        """Why this rank's step loop failed (None while it runs)."""
        return None if self.loop is None else self.loop.failure

    @ray.method(concurrency_group=CONTROL_GROUP)
    def close(self) -> list[tuple[str, int]]:
        """The orchestrator shuts down (the actor is killed next): remove this rank's share
        of its engine instance's shared memory (all of it, once no owner on this node is
        alive), and what dead instances left on this node. Runs beside a busy or stuck main
        thread: unlinking names frees nothing a live mapping still uses."""
        if self.loop is not None:
            self.loop.stop(timeout_s=1.0)
        removed = node_shm.release(self.instance, self.log) if self.instance else []
        return removed + node_shm.sweep(self.log)

    def route(self, tensors: list[TensorSpec], staged: bool = False) -> RankRoute:
        """Where each source tensor goes on this rank's live model (left as it was), or,
        for a staged reload, on its twin: the live model keeps serving meanwhile."""
        return route_rank(self._staging_area().reloader if staged else self.reloader, tensors)

    # ---- loading: the first load and every reload go through the same engine ---------

    def prepare_staging(self, layers: list[str], place: str) -> int:
        """Before a staged reload moves any byte: staging copies of the layers it touches
        (``actors.reload.staging_area``); ReloadError if they do not fit. Returns their bytes."""
        return self._staging_area().prepare(layers, place)

    def _staging_area(self) -> StagingArea:
        """Built at the first staged reload, then kept (its twin's loaders and dry runs are
        reused like the live model's)."""
        if self.staging_area is None:
            self.staging_area = StagingArea(self.runtime.reloadable(), self.runtime.device,
                                       self.log, self.check_finite)
            self.staging_area.reloader.stage_hook = self._at_stage
        return self.staging_area

    def start_reload(self, first_load: bool, staged: bool = False,
                     layers: list[str] | None = None) -> None:
        """``layers``: those the plan writes (a plain reload arms only them). A plain reload
        writes the kernel tensors in place, so it first parks the step loop, letting running
        requests finish (new ones wait): here rather than in a call of its own, which would
        cost every reload one more round trip to every rank. Every rank parks at the same
        step (rank 0 decides), whichever of them starts first."""
        if not staged:
            self.loop.park(drain=True)
        self.reader = BucketReader(self._kept, self.runtime.device)
        self._pending = None
        self.reload_begin = time.perf_counter()
        if staged:
            self.active = self.staging_area.reloader
            self.active.start("reload")
            return
        self.active = self.reloader
        self.reloader.start("first" if first_load and not self.reloader.has_kernel else "reload",
                            layers)

    def flip_staged(self, version: int, in_flight: InFlight) -> None:
        """Every rank staged everything: at a step boundary, on every rank of the engine at
        once, copy the staging into the kernel tensors (``in_flight``: what running requests
        do, ``actors.step_loop``)."""
        self.loop.flip(version, in_flight)

    def _flip_to(self, version: int) -> None:
        """On the step loop's thread, between two steps."""
        self.staging_area.flip()
        self.runtime.after_commit()

    def pause(self, drain: bool) -> None:
        """Stop the step loop before the weights are written in place (a plain reload, a
        rollback); ``drain``: let the running requests finish first, holding new ones."""
        self.loop.park(drain)

    def resume(self, version: int) -> None:
        """The step loop goes on, serving ``version``."""
        self.loop.resume(version)

    def open_link(self, link: LinkMessage) -> None:
        """Connect this reload to a peer that sends its buckets (a trainer stream), after
        ``start_reload`` and before the buckets. A failure is this reload's failure, raised
        by ``finish_reload``."""
        try:
            link.open(self.reader)
        except Exception as exc:  # noqa: BLE001 - raised by finish() with the failure consensus
            self.active.fail(exc)

    def load_bucket(self, bucket: BucketMessage) -> None:
        """Feed one bucket; complete layers are processed before this returns. After a
        failure on this rank or a peer, it only counts (``ReloadEngine.fail``), but still
        reads a bucket that ``must_read`` (a trainer's sends complete only when received)."""
        engine = self.active
        if not engine.failed or bucket.must_read:
            try:
                if not engine.failed:
                    self._at_stage("transfer")
                fetched = self.reader.fetch_seconds
                items = self.reader.items(bucket)
                engine.add_seconds("transfer", self.reader.fetch_seconds - fetched)
            except Exception as exc:  # noqa: BLE001 - raised by load() once peers caught up
                engine.fail(exc)
        if engine.failed:
            items = probe_items(bucket)
        engine.load(items)
        engine.own_buffers()

    def reload_all(self, first_load: bool, staged: bool, layers: list[str],
                   messages: tuple[BucketMessage, ...]) -> dict[str, Any]:
        """``start_reload``, ``load_bucket`` of each message and ``finish_reload`` in one
        call (``Transport.one_call``)."""
        self.start_reload(first_load, staged, layers)
        for message in messages:
            self.load_bucket(message)
        return self.finish_reload()

    def finish_reload(self) -> dict[str, Any]:
        try:
            stats = self.active.finish()
        finally:
            self.reader.close()
        self._pending = self.reader.to_keep
        self.loaded = True
        self.log.info("reloaded %d layers (%d kept), %.2f MB read, peak buffered %.2f MB in "
                      "%.2fs", len(stats.layers_reloaded), len(stats.layers_kept),
                      stats.bytes_read / 1e6, stats.peak_buffered_bytes / 1e6,
                      time.perf_counter() - self.reload_begin)
        return asdict(stats)

    def abort_reload(self) -> None:
        if self.reloader is not None:
            self.reloader.abort()
        if self.staging_area is not None:
            self.staging_area.reloader.abort()
            self.staging_area.release()
        if hasattr(self, "reader"):
            self.reader.close()
        self._pending = None

    def commit(self, version: int, live_kept: tuple[int, ...] = ()) -> None:
        """Every rank of every engine finished: ``version`` is served from now on.
        ``live_kept``: the ids of what ranks keep that the commit log holds from now on
        (trainer streams); anything else this rank kept is dropped."""
        if self._pending is not None:
            self._kept[self._pending[0]] = self._pending[1]
            self._pending = None
        for stream in [k for k in self._kept if k not in live_kept]:
            del self._kept[stream]
        if self.loop.parked:  # a plain reload; a staged one committed at its flip
            self.runtime.after_commit()
        self.loop.version = version
        if not self._frozen:
            freeze_long_lived()
            self._frozen = True

    # ---- fault injection (tests, chaos drills) ------------------------------------------

    def inject_fault(self, stage: str, action: str, signal_path: str | None = None) -> None:
        """At the next ``stage`` of a reload ('transfer', 'process' or 'quantize'): 'raise'
        an error, 'pause' (touch ``signal_path``, then block) so a drill can kill it there,
        or 'hold' (touch ``signal_path``, then block until the drill deletes it)."""
        self._fault = (stage, action, signal_path)

    def _at_stage(self, stage: str) -> None:
        if self._fault is None or self._fault[0] != stage:
            return
        _, action, signal_path = self._fault
        self._fault = None
        if action == "raise":
            raise RuntimeError(f"injected fault in the {stage} stage")
        if signal_path:
            with open(signal_path, "w") as f:
                f.write(str(os.getpid()))
        if action == "hold":
            while os.path.exists(signal_path):
                time.sleep(0.01)
            return
        time.sleep(3600)

    @ray.method(concurrency_group=SERVE_GROUP)
    def memory(self) -> dict[str, int]:
        """Resident set size of this rank process and its peak since the last
        ``reset_peak_memory``, from /proc (Linux), and the bytes a staged reload holds in
        staging tensors now."""
        staging = self.staging_area.nbytes if self.staging_area is not None else 0
        return {**process_memory(), "staging_bytes": staging}

    def reset_peak_memory(self) -> None:
        reset_peak_rss()

    # ---- serving ------------------------------------------------------------------------

    def _require_loaded(self) -> RankRuntime:
        if not self.loaded:
            raise RuntimeError("no weights loaded on this rank yet")
        return self.runtime

    def _capable(self, mixin: type) -> Any:
        """The runtime as ``mixin`` (the driver only sends calls the engine declares)."""
        if not isinstance(self.runtime, mixin):
            raise TypeError(f"engine {self.plugin.name!r} has no {mixin.__name__} capability")
        return self.runtime

    @ray.method(concurrency_group=SERVE_GROUP)
    def forward(self, token_ids: torch.Tensor) -> torch.Tensor | None:
        """Every rank computes; rank 0 returns float32 CPU logits [B, T, vocab]."""
        runtime = self._require_loaded()
        self._capable(ServesLogits)
        return self.loop.run_job(lambda: runtime.forward(token_ids))

    @ray.method(concurrency_group=SUBMIT_GROUP)
    def submit(self, requests: list[Request]) -> None:
        """Rank 0: requests to generate (admitted on every rank at the next step)."""
        self._require_loaded()
        self.loop.submit(requests)

    @ray.method(concurrency_group=SUBMIT_GROUP)
    def cancel(self, request_ids: list[str]) -> None:
        """Rank 0: end these requests at the next step, freeing their slots."""
        self.loop.cancel(request_ids)

    @ray.method(concurrency_group=EVENTS_GROUP)
    def events(self, timeout_s: float) -> list[Delta]:
        """Rank 0: what the steps produced since the last call; waits up to ``timeout_s``
        for something. Raises once the step loop failed and everything was handed out."""
        deltas = self.loop.events(timeout_s)
        if not deltas and self.loop.failure is not None:
            raise RuntimeError(self.loop.failure)
        return deltas

    @ray.method(concurrency_group=SERVE_GROUP)
    def limits(self) -> ServingLimits:
        """What a rollout must respect: vocabulary, context length, EOS ids."""
        return self._require_loaded().limits()

    @ray.method(concurrency_group=SERVE_GROUP)
    def calibrate_kv_scales(self, token_ids: torch.Tensor) -> list[list[float]]:
        runtime = self._require_loaded()
        self._capable(CalibratesKvScales)
        return self.loop.run_job(lambda: runtime.calibrate_kv_scales(token_ids))

    @ray.method(concurrency_group=SERVE_GROUP)
    def capture_cuda_graph(self, token_ids: torch.Tensor) -> None:
        runtime = self._require_loaded()
        self._capable(CapturesCudaGraphs)
        self.loop.run_job(lambda: runtime.capture_cuda_graph(token_ids))

    @ray.method(concurrency_group=SERVE_GROUP)
    def replay_cuda_graph(self) -> torch.Tensor | None:
        runtime = self._require_loaded()
        self._capable(CapturesCudaGraphs)
        return self.loop.run_job(runtime.replay_cuda_graph)

    @ray.method(concurrency_group=SERVE_GROUP)
    def inspect(self) -> dict[str, dict[str, Any]]:
        """name -> identity facts of every kernel tensor this rank serves from."""
        return {
            name: {"data_ptr": t.data_ptr(), "shape": tuple(t.shape), "dtype": str(t.dtype),
                   "device": str(t.device)}
            for name, t in self._require_loaded().kernel_tensors().items()
        }

    @ray.method(concurrency_group=SERVE_GROUP)
    def get_tensors(self, names: list[str] | None) -> tuple[tuple[TensorEntry, ...], Any]:
        """The named kernel tensors (all of them for None), packed as raw bytes: Ray's own
        tensor serialization does not carry every dtype (float8)."""
        tensors = self._require_loaded().kernel_tensors()
        unknown = sorted(set(names or ()) - set(tensors))
        if unknown:
            raise KeyError(f"rank {self.rank} has no kernel tensor(s) {unknown}")
        return pack_tensors([(n, tensors[n]) for n in (names or tensors)])

    def placement(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(),
                "gpu_ids": ray.get_gpu_ids(), "device": str(self.runtime.device),
                "gpu_uuid": gpu_uuid(self.runtime.device)}

