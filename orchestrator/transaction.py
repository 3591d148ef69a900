"""The transaction: how the fleet goes from one committed version to the next, all or
nothing.

A load streams a plan's buckets to every rank of every engine (start -> buckets -> finish),
each layer processed on a rank the moment its last tensor arrives; it commits only when every
rank finished, and then every rank drops what it computed with the old weights. A failure
rolls every rank back by replaying the commit log (``orchestrator.commit_log``), rebuilding
ranks that died first. A staged load streams into staging tensors while the engines serve,
then flips them into the kernel tensors under the gate.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from actors.rank_actor import RankActor
from actors.reload import RANK_STAGES
from actors.step_loop import InFlight
from actors.transports.base import Delivery, DeliveryContext, Source, TransportState
from orchestrator.commit_log import CommitLog, CommittedSource, committed
from orchestrator.config import EngineConfig
from orchestrator.errors import RankError, RecoveryError
from orchestrator.fleet import Calls, Fleet, RankKey
from orchestrator.gate import Gate
from orchestrator.plan import Plan
from orchestrator.progress import Progress
from orchestrator.report import ReloadReport
from orchestrator.router import Router

log = logging.getLogger("tp_reload")


class Transaction:
    def __init__(self, config: EngineConfig, fleet: Fleet, router: Router, gate: Gate) -> None:
        self.config = config
        self.fleet = fleet
        self.router = router
        self.gate = gate
        self.log = CommitLog()
        self.version: int | None = None
        """The committed version every rank serves (None before the first load)."""
        self.on_recovered: Callable[[set[int]], None] | None = None
        """Called with the engines a recovery rebuilt (their running requests were lost)."""
        self.transports = TransportState()

    def close(self) -> None:
        """The fleet is gone: nothing is committed, and what transports kept for replay (the
        log's messages) and for reuse goes."""
        self.version = None
        self.log = CommitLog()
        self.transports.close()

    # ---- loading -----------------------------------------------------------------------

    def load(self, source: Source, plan: Plan, plan_seconds: float, *, first: bool = False
             ) -> ReloadReport:
        """Stream ``source`` into the kernel tensors and commit it (version 0 when
        ``first``). Requests running on the engines finish first (new ones wait), as with
        an in-flight 'wait' flip. The caller holds the gate; a failed reload is rolled back
        before the error is raised (a failed first load is the caller's to clean up)."""
        version = 0 if first else self.current + 1
        begin = time.perf_counter() - plan_seconds
        try:  # every rank parks its step loop as it starts (RankActor.start_reload)
            report, delivery = self.transfer(source, plan, plan_seconds, version, first=first)
            entry, covers = committed(source, delivery), first or not report.layers_kept
            self.commit(entry, covers, version)
        except BaseException as error:
            if not first:
                self.recover(error)
            raise
        self.log.record(entry, covers)
        self.version = version
        self.fleet.run(RankActor.resume, version)
        # The whole call, as the caller waits for it: the plan, the drain, the stream, the
        # commit and the resume. Serving waited for all of it.
        seconds = time.perf_counter() - begin
        return replace(report, seconds=seconds, pause_seconds=seconds,
                       rollback_bytes=self.log.node_bytes())

    def load_staged(self, source: Source, plan: Plan, plan_seconds: float, place: str,
                    in_flight: InFlight = "wait") -> ReloadReport:
        """Stream ``source`` into staging tensors while the engines serve, then flip them in
        between two steps of every engine (``in_flight``: what running requests do,
        ``actors.step_loop``): serving waits only for the flip (``pause_seconds``)."""
        begin = time.perf_counter() - plan_seconds
        version = self.current + 1
        try:
            staged = self.fleet.run(RankActor.prepare_staging, list(plan.layers), place)
            report, delivery = self.transfer(source, plan, plan_seconds, version, staged=True)
        except BaseException as error:
            self._drop_staging(error)
            raise
        with self.gate.hold(reloading=True):  # waits for the serving call in flight
            flip_begin = time.perf_counter()
            try:
                self.fleet.run(RankActor.flip_staged, version, in_flight)
                entry, covers = committed(source, delivery), not report.layers_kept
                self.commit(entry, covers, version)
                if self.config.kv_scales == "calibrate":
                    self.calibrate(calibration_tokens(self.config))
            except BaseException as error:
                self.recover(error)
                raise
            self.log.record(entry, covers)
            self.version = version
            pause = time.perf_counter() - flip_begin
        return replace(report, seconds=time.perf_counter() - begin, staged=True,
                       pause_seconds=pause, staging_bytes=max(staged.values()),
                       rollback_bytes=self.log.node_bytes())

    @property
    def current(self) -> int:
        if self.version is None:
            raise RuntimeError("orchestrator is not started")
        return self.version

    def transfer(self, source: Source, plan: Plan, plan_seconds: float, version: int, *,
               first: bool = False, staged: bool = False) -> tuple[ReloadReport, Delivery]:
        """Every rank: start, the plan's buckets as the source's transport delivers them,
        finish (``_in_steps``, or ``_in_one_call``)."""
        begin = time.perf_counter() - plan_seconds
        progress = Progress(f"load v{version}", [b.nbytes for b in plan.buckets],
                            enabled=self.config.progress)
        context = DeliveryContext(self.fleet, self.router.routing, self.config.device,
                                  self.config.timeout_s, self.transports,
                                  self.config.shared_memory)
        arguments = (first, staged, list(plan.layers))
        if source.transport.one_call:  # everything up front: one call per rank
            delivery = source.transport.deliver(source, plan, context)
            stream = partial(self._in_one_call, arguments, delivery, progress,
                             sum(b.nbytes for b in plan.buckets))
        else:
            started = self.fleet.call(RankActor.start_reload, *arguments)
            delivery = source.transport.deliver(source, plan, context)
            stream = partial(self._in_steps, started, delivery,
                             delivery.max_in_flight or source.transport.max_in_flight, progress)
        try:
            stats, send_seconds = stream()
            sent = delivery.finish(self.config.timeout_s)
        except BaseException as error:
            blamed = delivery.blame(error, self.config.timeout_s)
            delivery.drop()
            if blamed is error:
                raise
            raise blamed from error
        finally:
            progress.close()
        stage = {name: max(s["stage_seconds"][name] for s in stats.values())
                 for name in RANK_STAGES}
        stage["plan"] = plan_seconds
        stage["transfer"] += send_seconds
        if self.config.kv_scales == "calibrate" and not staged:  # staged: after the flip
            calibrate_begin = time.perf_counter()
            self.calibrate(calibration_tokens(self.config))
            stage["finalize"] += time.perf_counter() - calibrate_begin
        report = ReloadReport.from_ranks(
            stats, version=version, seconds=time.perf_counter() - begin, stage_seconds=stage,
            plan=plan, source=source, bytes_sent=dict(enumerate(sent)),
            layer_kinds=self.router.routing.layer_kinds,
            transport=delivery.carrier or source.transport.name)
        for warning in report.warnings:
            log.warning(warning)
        return report, delivery

    def _in_one_call(self, arguments: tuple[Any, ...], delivery: Delivery,
                     progress: Progress, nbytes: int) -> tuple[dict[RankKey, Any], float]:
        """Every message in one call per rank, which starts, reads and finishes (a transport
        whose messages name what ranks read: ``Transport.one_call``). Returns every rank's
        statistics and the seconds spent producing the messages (none: they came made)."""
        assert delivery.messages is not None, "a one_call transport delivers its messages"
        stats = self.fleet.run(RankActor.reload_all, *arguments, delivery.messages)
        progress.advance(nbytes)
        return stats, 0.0

    def _in_steps(self, started: Calls, delivery: Delivery, max_in_flight: int | None,
                  progress: Progress) -> tuple[dict[RankKey, Any], float]:
        """Start (already queued), the delivery's steps as they are produced, finish: a rank
        runs its calls in submission order, so they are queued back to back and awaited
        together. Returns every rank's statistics and the seconds spent producing the
        steps."""
        pending, send_seconds = self._queue(delivery, max_in_flight, progress)
        finishing = self.fleet.call(RankActor.finish_reload)
        self.fleet.wait(started)
        for calls, nbytes in pending:
            self.fleet.wait(calls)
            if nbytes is not None:  # a bucket, not a link
                progress.advance(nbytes)
        return self.fleet.wait(finishing), send_seconds

    def _queue(self, delivery: Delivery, max_in_flight: int | None, progress: Progress
               ) -> tuple[deque[tuple[Calls, int | None]], float]:
        """Queue every step; a transport whose steps hold memory has at most
        ``max_in_flight`` pending. Returns the pending steps and the seconds spent
        producing them (packing, ``ray.put``)."""
        pending: deque[tuple[Calls, int | None]] = deque()
        seconds = 0.0
        while True:
            begin = time.perf_counter()
            step = next(delivery.steps, None)
            seconds += time.perf_counter() - begin
            if step is None:
                return pending, seconds
            pending.append(step)
            if max_in_flight is not None and len(pending) >= max_in_flight:
                calls, nbytes = pending.popleft()
                self.fleet.wait(calls)
                if nbytes is not None:
                    progress.advance(nbytes)

    def commit(self, entry: CommittedSource, covers_every_layer: bool, version: int) -> None:
        """Every rank finished: each drops what it computed with the old weights, and what
        it kept for sources the commit log will no longer hold (the caller records ``entry``
        once nothing else can fail)."""
        self.fleet.run(RankActor.commit, version,
                       self.log.rank_kept_after(entry, covers_every_layer))

    def calibrate(self, token_ids: torch.Tensor) -> list[list[list[float]]]:
        """FP8 KV scales of every engine from a forward of ``token_ids``; per engine
        [[k, v], ...]."""
        results = self.fleet.run(RankActor.calibrate_kv_scales, token_ids)
        return [results[(e.index, 0)] for e in self.fleet.engines]

    # ---- rolling back ------------------------------------------------------------------

    def recover(self, error: BaseException) -> None:
        """After a failed reload: restarted ranks rejoin their engine, and every rank
        replays the commit log back to the last committed version."""
        try:
            restarted = self.fleet.rejoin_restarted()
            # The replay writes the kernel tensors in place: no engine steps meanwhile (its
            # running requests wait, on weights the replay leaves bit-identical unless a
            # flip already happened).
            self.fleet.run(RankActor.pause, False)
            self.fleet.run(RankActor.abort_reload)
            self._replay(restarted)
            self.fleet.run(RankActor.commit, self.version, self.log.rank_kept())
            self.fleet.run(RankActor.resume, self.version)
        except BaseException as exc:
            self.gate.broken = (f"a failed reload ({error}) could not be rolled back ({exc}); "
                                "restart the orchestrator")
            raise RecoveryError(self.gate.broken) from exc
        if restarted:
            error.add_note(f"restarted rank(s) {sorted(restarted)} were rebuilt")
            if self.on_recovered is not None:
                self.on_recovered({engine for engine, _ in restarted})
        error.add_note(f"every rank of every engine is back on version {self.version}")
        # The text, not the error: a handler that keeps records (pytest's, a memory handler)
        # would keep its traceback's frames, and with them the failed reload's source.
        log.warning("recovered from %s: every rank serves version %s", str(error), self.version)

    def recover_if_restarted(self, error: RankError) -> None:
        """A rank that died while serving comes back empty: rebuild it before the error
        reaches the caller, so the next call is served at the committed version."""
        if self.fleet.restarted():
            self.recover(error)

    def _replay(self, restarted: set[tuple[int, int]]) -> None:
        for index, entry in enumerate(self.log.entries):
            entry.check_unchanged()
            started = self.fleet.call_each(RankActor.start_reload, {
                key: (index == 0 and key in restarted,) for key in self.fleet.rank_keys()})
            loading = [self.fleet.load_bucket(message) for message in entry.messages]
            finishing = self.fleet.call(RankActor.finish_reload)
            for calls in (started, *loading, finishing):
                self.fleet.wait(calls)
        if self.config.kv_scales == "calibrate":
            self.calibrate(calibration_tokens(self.config))

    def _drop_staging(self, error: BaseException) -> None:
        """A staged reload failed before its flip: every rank drops its staging. Only a
        rank that died (and was restarted) makes its engine wait, for its rebuild."""
        try:
            if not self.fleet.restarted():
                self.fleet.run(RankActor.abort_reload)
                return
        except RankError:
            pass
        with self.gate.hold(reloading=True):
            self.recover(error)


def calibration_tokens(config: EngineConfig) -> torch.Tensor:
    """``kv_calibration_tokens``, or a fixed seeded random 4 x 64 batch over the vocab."""
    from orchestrator.serving import as_token_tensor

    if config.kv_calibration_tokens is not None:
        return as_token_tensor(config.kv_calibration_tokens)
    vocab = json.loads((Path(config.model) / "config.json").read_text())["vocab_size"]
    return torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
