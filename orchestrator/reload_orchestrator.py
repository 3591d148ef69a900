"""ReloadOrchestrator: the driver-side handle on a fleet of TP engines.

Usage::

    with ReloadOrchestrator(EngineConfig(model="ckpt/step0", tensor_parallel_size=2)) as orch:
        out = orch.sample([[1, 2, 3], [4, 5]], max_new_tokens=64, n=4, temperature=1.0)
        report = orch.reload("ckpt/step1")          # or a dict / iterable of (name, tensor)

It composes parts with one job each: the fleet (``orchestrator.fleet``: engines, ranks and
typed calls to them), the router (``orchestrator.router``: plans), the transaction
(``orchestrator.transaction``: stream, commit, roll back, stage, flip), the gate
(``orchestrator.gate``) and the serving calls it inherits (``orchestrator.serving``).

Ordering invariants:
  * ``start`` (or entering the context) must be called before any other method; it places
    the engines, forms each engine's process group and performs the first load (version 0).
  * a request goes to rank 0 of one engine, which admits it on every rank at one step; a
    call that computes reaches all ranks of one engine; a failed rank raises ``RankError``.
  * ``reload`` reaches every rank of every engine; the version increments only when every
    rank finished, and on any failure every rank is rolled back first.
  * ``shutdown`` has every rank release its node's shared memory, then kills them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from actors.reload.staging_area import STAGING_PLACES
from actors.step_loop import IN_FLIGHT_MODES, InFlight
from orchestrator.config import EngineConfig
from orchestrator.errors import ConfigError
from orchestrator.fleet import Fleet
from orchestrator.gate import Gate
from orchestrator.metrics import Metrics
from orchestrator.plan import ORDERS, Order, Plan
from orchestrator.report import ReloadReport
from orchestrator.router import Router
from orchestrator.serving import EngineServing
from orchestrator.transaction import Transaction

log = logging.getLogger("tp_reload")


class ReloadOrchestrator(EngineServing):
    def __init__(self, config: EngineConfig, metrics: Metrics | None = None) -> None:
        """``metrics``: where reloads and rollouts are exported (``orchestrator.metrics``;
        tagged ``server="driver"`` unless given)."""
        fleet, gate = Fleet(config), Gate(config.serve_during_reload)
        self.router = Router(config, fleet)
        super().__init__(config, fleet, gate, Transaction(config, fleet, self.router, gate),
                         metrics or Metrics())
        self.load_report: ReloadReport | None = None
        self.last_report: ReloadReport | None = None
        self._reloads = threading.Lock()  # one at a time; staged: the gate only to flip

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any) -> ReloadOrchestrator:
        """An orchestrator (not yet started) from the ``engine`` section of a YAML config;
        ``overrides`` replace engine fields (e.g. ``model=``)."""
        from orchestrator.yaml_config import load_engine_config

        return cls(load_engine_config(path, **overrides))

    @property
    def dtype(self) -> str:
        """The engine dtype, resolved from ``config.model`` (empty before it is read)."""
        return self.router.dtype

    @property
    def engines(self) -> list[Any]:
        return self.fleet.engines

    def __enter__(self) -> ReloadOrchestrator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def start(self) -> ReloadOrchestrator:
        """Read ``config.model``, place the engines, form their process groups and load it
        (version 0). A checkpoint the engine cannot run is refused before anything is placed."""
        cfg = self.config
        if self.fleet.engines:
            raise RuntimeError("orchestrator is already started")
        first = self.router.prepare()
        # Engines routed in the driver validate the first source before anything is placed;
        # the others as soon as their ranks are up, before any byte moves.
        begin = time.perf_counter()
        plan = self.router.plan(first, "plan", require_all=True) if self.router.on_driver \
            else None
        plan_seconds = time.perf_counter() - begin
        try:
            self.fleet.place(self.router.dtype)
            if plan is None:
                begin = time.perf_counter()
                plan = self.router.plan(first, "plan", require_all=True)
                plan_seconds = time.perf_counter() - begin
            with self.gate.hold(reloading=True):
                self.load_report = self.transaction.load(first, plan, plan_seconds, first=True)
            self.dispatcher.start()
        except BaseException:
            self.shutdown()
            raise
        self.last_report = self.load_report
        self.metrics.loaded(self.load_report, first=True)
        log.info("%d engine(s) x TP=%d serving %s (%s) as version 0", cfg.num_engines,
                 cfg.tensor_parallel_size, cfg.model, self.dtype)
        return self

    def shutdown(self) -> None:
        """Ranks release what they made on their node, then are killed with their groups;
        a local Ray that ``start`` started goes last."""
        self.dispatcher.stop()
        self.fleet.close()
        self.dispatcher.close()
        self.transaction.close()
        self.fleet.release()

    def reload(self, source: Any, order: Order = "plan", strict: bool = True,
               staged: bool | None = None, staging: str | None = None,
               in_flight: InFlight | None = None) -> ReloadReport:
        """Stream new weights into every rank of every engine, in place, all or nothing.

        ``source``: a checkpoint directory, a dict name -> tensor, an iterable of
        (name, tensor) in checkpoint format (full, unsharded), a ``TrainerSource`` (the
        trainer's Ray actors stream their shards straight to the engine ranks), or anything
        a registered transport accepts (``actors.transports``). ``order="plan"`` streams in
        parent-layer order (one layer buffered at a time); ``"source"`` keeps the source's
        own order. Layers the source does not touch keep their weights (``layers_kept``);
        ``strict=False`` ignores names that match no parameter. The version increments only
        when every rank finished; on any failure every rank is rolled back to the last
        committed version before the error is raised. Running requests finish first; new
        ones wait.

        ``staged=True``: serving goes on while every rank streams and processes the new
        version into staging tensors (``staging``: 'device', or 'host' for pinned host
        memory on CUDA; refused before any byte moves if it does not fit). Each engine then
        flips the staging into its kernel tensors between two decode steps, on all its ranks
        at once, and the fleet commits: serving waits only for the flip
        (``report.pause_seconds``). Running requests do what ``in_flight`` says ('keep',
        'recompute', 'wait', 'abort': ``actors.step_loop``). A failure before the flip
        drops the staging; the engines never stopped serving and were never touched."""
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        place, in_flight = staging or "device", in_flight or "wait"
        if in_flight not in IN_FLIGHT_MODES:
            raise ValueError(f"in_flight must be one of {IN_FLIGHT_MODES}, got {in_flight!r}")
        if staged and place not in STAGING_PLACES:
            raise ValueError(f"staging must be one of {STAGING_PLACES}, got {place!r}")
        if staged and not self.config.plugin.supports("staging"):
            raise ConfigError(f"engine={self.config.engine!r} cannot stage reloads (its model "
                              "has no twin to stage into): reload unstaged")
        with self._reloads:
            try:
                if staged:  # routed in the driver, or on the ranks' twins: serving goes on
                    source, plan, seconds = self._plan(source, order, strict, staged=True)
                    report = self.transaction.load_staged(source, plan, seconds, place,
                                                          in_flight)
                else:
                    with self.gate.hold(reloading=True):
                        source, plan, seconds = self._plan(source, order, strict)
                        report = self.transaction.load(source, plan, seconds)
            except BaseException:
                self.metrics.failed()
                raise
        self.last_report = report
        self.metrics.loaded(report)
        return report

    def _plan(self, source: Any, order: Order, strict: bool, staged: bool = False
              ) -> tuple[Any, Plan, float]:
        begin = time.perf_counter()
        opened = self.router.open(source)
        plan = self.router.plan(opened, order, strict=strict, staged=staged)
        return opened, plan, time.perf_counter() - begin

    def plan(self, source: Any, order: Order = "plan", strict: bool = True) -> Plan:
        """The schedule a reload of ``source`` would follow (validated; nothing is sent).
        Engines routed in the driver (native) plan before ``start()`` too, without Ray."""
        with self.gate.hold():
            if not self.fleet.engines:
                if not self.router.dtype:
                    self.router.prepare()
                if not self.router.on_driver:
                    raise RuntimeError(f"engine={self.config.engine!r} plans on its ranks: "
                                       "start() the orchestrator first")
            return self._plan(source, order, strict)[1]

    def status(self) -> dict[str, Any]:
        cfg, report = self.config, self.last_report
        return {
            "version": self.transaction.version, "model": cfg.model, "engine": cfg.engine,
            "tensor_parallel_size": cfg.tensor_parallel_size, "num_engines": cfg.num_engines,
            "quantization": cfg.quantization, "dtype": self.dtype,
            "last_reload": None if report is None else {
                "version": report.version, "seconds": report.seconds,
                "source": report.source, "peak_buffered_bytes": report.peak_buffered_bytes,
                "staged": report.staged, "pause_seconds": report.pause_seconds},
        }
