"""The step loop of one rank: continuous batching, stepped in lockstep on every rank of an
engine.

An engine's ranks are SPMD: each runs the engine's own scheduler, so each must see the same
requests, cancellations and weight flips at the same step, or their batches (and collectives)
diverge. Rank 0 decides: before each step it takes what arrived (requests, cancellations,
jobs that need the model, a flip, a pause) and broadcasts one ``Step`` over a process group
of the loop's own; every rank, rank 0 included, applies that ``Step`` and runs one engine
step. Only the loop's thread touches the model while it runs, so serving calls that compute
(``forward``, KV-scale calibration, CUDA graphs) run as jobs at a step boundary too.

Rank 0 publishes what each step produced (``Delta``s, each tagged with the version of the
weights that produced it); the driver long-polls them (``RankActor.events``).

In-flight modes of a flip (``InFlight``):
  * ``keep``: running requests go on with their KV cache as it is;
  * ``recompute``: running requests keep their tokens, their KV cache is computed again from
    their whole context with the new weights before their next token;
  * ``wait``: requests are held, running ones finish on the old weights, then the flip;
  * ``abort``: running requests end (``finish_reason='abort'``) with the tokens they have.
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

from actors.engines.runtime import RankRuntime, Request, Update

InFlight = Literal["keep", "recompute", "wait", "abort"]
IN_FLIGHT_MODES: tuple[InFlight, ...] = ("keep", "recompute", "wait", "abort")
# An idle rank 0 still broadcasts this often (at most a quarter of the group's timeout),
# so its peers' broadcast never times out.
IDLE_TICK_S = 5.0


@dataclass(frozen=True, slots=True)
class Flip:
    version: int
    """The version the staged weights become."""
    mode: InFlight


@dataclass(frozen=True, slots=True)
class Step:
    """What every rank of an engine does before its next engine step, as rank 0 decided."""

    cancel: tuple[str, ...] = ()
    flip: Flip | None = None
    admit: tuple[Request, ...] = ()
    jobs: int = 0
    """How many queued jobs each rank runs now, in arrival order."""
    park: bool = False
    """Stop stepping until ``resume`` (a plain reload or a rollback writes the weights)."""
    stop: bool = False


def exchange_step(step: Step | None, rank: int, group: Any) -> Step:
    """Rank 0's ``step`` on every rank of ``group`` (the others pass None). Most steps carry
    only counts and flags (a decode step with nothing to admit or cancel, an idle tick, a
    park): those are one broadcast of a 3-int header; a step carrying requests,
    cancellations or a flip is pickled and follows it (``broadcast_object_list`` always made
    it two broadcasts and a pickle: ~0.5 against ~0.2 ms here)."""
    header = torch.zeros(3, dtype=torch.int64)
    payload = b""
    if rank == 0:
        if step.cancel or step.flip is not None or step.admit:
            payload = pickle.dumps(step)
        header[0], header[1], header[2] = step.jobs, step.park | step.stop << 1, len(payload)
    dist.broadcast(header, src=0, group=group)
    jobs, flags, size = header.tolist()
    if size:
        data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if rank == 0
                else torch.empty(size, dtype=torch.uint8))
        dist.broadcast(data, src=0, group=group)
        if rank != 0:
            return pickle.loads(data.numpy().tobytes())
    return step if rank == 0 else Step(jobs=jobs, park=bool(flags & 1), stop=bool(flags & 2))


@dataclass(frozen=True, slots=True)
class Delta:
    """What one step produced for one request, as rank 0 publishes it."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    version: int
    """The weights these tokens were drawn from."""
    finish_reason: str | None
    """None while it runs; 'stop', 'length', 'abort', or 'error' (the engine failed:
    ``error`` says why)."""
    cached_tokens: int = 0
    error: str | None = None


@dataclass(slots=True)
class _Park:
    drain: bool
    """Hold new requests and let running ones finish first (a plain reload); otherwise
    park at the next step boundary (a rollback)."""


@dataclass(slots=True)
class _Job:
    run: Callable[[], Any]
    done: Future = field(default_factory=Future)


class StepLoop:
    def __init__(self, runtime: RankRuntime, rank: int, world_size: int,
                 on_flip: Callable[[int], None], log: logging.LoggerAdapter,
                 timeout_s: float) -> None:
        """``on_flip(version)``: copy the staged weights into the kernel tensors."""
        self.runtime = runtime
        self.rank = rank
        self.on_flip = on_flip
        self.log = log
        self.timeout_s = timeout_s
        self.version: int | None = None
        """The weights served now (set at every commit and flip)."""
        self.failure: str | None = None
        # Every collective of the loop goes over a group of its own: reloads run their own
        # collectives on the main thread meanwhile.
        self.group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                      if world_size > 1 else None)
        self._cond = threading.Condition()
        self._inbox: list[Any] = []          # rank 0: Requests, cancelled ids, markers
        self._held: list[Request] = []       # rank 0: requests not admitted yet
        self._flip: Flip | None = None       # rank 0: a flip waiting for its moment
        self._park: _Park | None = None      # rank 0: a pause waiting for its moment
        self._outbox: list[Delta] = []       # rank 0: what the driver has not fetched yet
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._flips: dict[int, Future] = {}
        self._parked = threading.Event()
        self._resume = threading.Event()
        self._stopping = False
        self.running_count = 0
        """Requests admitted and unfinished after the last step (for reports)."""
        self._thread = threading.Thread(target=self._run, name=f"step-loop-{rank}", daemon=True)
        self._thread.start()

    # ---- calls from the rank actor (any thread) -----------------------------------------

    def submit(self, requests: list[Request]) -> None:
        """Rank 0: requests to admit at the next step (held while a flip waits or a plain
        reload runs)."""
        self._check()
        self._post(*requests)

    def cancel(self, request_ids: list[str]) -> None:
        """Rank 0: end these requests at the next step, freeing their slots."""
        self._post(*[("cancel", r) for r in request_ids])

    def events(self, timeout_s: float) -> list[Delta]:
        """Rank 0: what the steps produced since the last call (waits up to ``timeout_s``
        for something)."""
        with self._cond:
            if not self._outbox:
                self._cond.wait(timeout_s)
            out, self._outbox = self._outbox, []
        return out

    def run_job(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` (model work with collectives) on the loop's thread at a step boundary,
        in the same order on every rank; directly while the loop is parked."""
        self._check()
        if self._parked.is_set():
            return job()
        pending = _Job(job)
        self._jobs.put(pending)
        if self.rank == 0:
            self._post(("job",))
        return pending.done.result()

    def flip(self, version: int, mode: InFlight) -> None:
        """Every rank: returns once this rank flipped to ``version`` at a step boundary (with
        ``wait``, once the running requests finished)."""
        self._check()
        if self.rank == 0:
            self._post(Flip(version, mode))
        try:
            self._flip_future(version).result()
        finally:
            with self._cond:  # a version that did not commit may be flipped to again
                self._flips.pop(version, None)

    def park(self, drain: bool) -> None:
        """Every rank: returns once this rank's loop stopped stepping (or failed)."""
        if self._parked.is_set() or self.failure is not None:
            return
        if self.rank == 0:
            self._post(_Park(drain))
        self._parked.wait()

    @property
    def parked(self) -> bool:
        """Not stepping: parked, or failed."""
        return self._parked.is_set()

    def resume(self, version: int) -> None:
        """Every rank: step again, serving ``version``."""
        self.version = version
        if self._parked.is_set() and self.failure is None:
            self._parked.clear()
            self._resume.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the loop (the engine leaves its group or closes)."""
        if self._thread.is_alive():
            if self._parked.is_set():
                self._stopping = True
                self._resume.set()
            elif self.rank == 0:
                self._post(("stop",))
            self._thread.join(timeout_s)
        self.failure = self.failure or "the engine's step loop stopped"

    # ---- the loop's thread -------------------------------------------------------------

    def _post(self, *items: Any) -> None:
        with self._cond:
            self._inbox.extend(items)
            self._cond.notify_all()

    def _check(self) -> None:
        if self.failure is not None:
            raise RuntimeError(f"rank {self.rank}: {self.failure}")

    def _flip_future(self, version: int) -> Future:
        with self._cond:
            return self._flips.setdefault(version, Future())

    def _run(self) -> None:
        try:
            while not self._stopping:
                step = self._exchange(self._decide() if self.rank == 0 else None)
                self._apply(step)
                if step.stop:
                    return
                if self.runtime.has_work():
                    self._publish(self.runtime.step())
                self.running_count = len(self.runtime.running())
        except BaseException as exc:  # noqa: BLE001 - reported to every waiter and the driver
            self._fail(exc)

    def _exchange(self, step: Step | None) -> Step:
        return step if self.group is None else exchange_step(step, self.rank, self.group)

    def _decide(self) -> Step:
        """Rank 0: what every rank does before the next step."""
        with self._cond:
            if not (self._inbox or self.runtime.has_work() or self._flip or self._park):
                self._cond.wait(min(IDLE_TICK_S, self.timeout_s / 4))
            inbox, self._inbox = self._inbox, []
        cancel, jobs, stop = [], 0, False
        for item in inbox:
            if isinstance(item, Request):
                self._held.append(item)
            elif isinstance(item, Flip):
                self._flip = item
            elif isinstance(item, _Park):
                self._park = item
            elif item[0] == "cancel":
                cancel.append(item[1])
            elif item[0] == "job":
                jobs += 1
            else:
                stop = True
        cancelled = set(cancel)
        self._held = [r for r in self._held if r.request_id not in cancelled]
        idle = not set(self.runtime.running()) - cancelled
        flip, self._flip = self._ready(self._flip, idle)
        park, self._park = self._ready(self._park, idle)
        # Held: while a 'wait' flip or a draining pause waits for the running requests, and
        # across a pause (admitted after it, on the weights it leaves).
        hold = park is not None or self._park is not None or self._flip is not None
        admit: tuple[Request, ...] = ()
        if not hold:
            admit, self._held = tuple(self._held), []
        return Step(tuple(cancel), flip, admit, jobs, park is not None, stop)

    @staticmethod
    def _ready(pending: Any, idle: bool) -> tuple[Any, Any]:
        """(what happens at this step, what still waits) for a pending flip or pause: one
        that waits for the running requests happens once none runs."""
        if pending is None:
            return None, None
        waits = pending.mode == "wait" if isinstance(pending, Flip) else pending.drain
        return (pending, None) if idle or not waits else (None, pending)

    def _apply(self, step: Step) -> None:
        """Every rank, in the same order: cancel, flip, admit, jobs, park."""
        if step.cancel:
            self.runtime.abort(list(step.cancel))
            self._publish_ended(step.cancel, "abort")
        if step.flip is not None:
            self._flip_now(step.flip)
        for request in step.admit:
            self.runtime.admit(request, self.version)
        for _ in range(step.jobs):
            job = self._jobs.get(timeout=self.timeout_s)
            try:
                job.done.set_result(job.run())
            except BaseException as exc:  # noqa: BLE001 - the caller raises it
                job.done.set_exception(exc)
        if step.park:
            self._parked.set()
            self._resume.wait()
            self._resume.clear()

    def _flip_now(self, flip: Flip) -> None:
        future = self._flip_future(flip.version)
        try:
            if flip.mode == "abort":
                running = self.runtime.running()
                self.runtime.abort(running)
                self._publish_ended(running, "abort")
            self.on_flip(flip.version)
            if flip.mode == "recompute":
                self.runtime.recompute()
            self.version = flip.version
            self.log.info("flipped to version %d between two steps (in_flight=%s)",
                          flip.version, flip.mode)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        future.set_result(None)

    def _publish(self, updates: list[Update]) -> None:
        if self.rank != 0 or not updates:
            return
        deltas = [Delta(u.request_id, u.token_ids, u.logprobs, self.version, u.finish_reason,
                        u.cached_tokens) for u in updates]
        with self._cond:
            self._outbox.extend(deltas)
            self._cond.notify_all()

    def _publish_ended(self, request_ids: Any, reason: str, error: str | None = None) -> None:
        if self.rank != 0 or not request_ids:
            return
        with self._cond:
            self._outbox.extend(Delta(r, [], [], self.version, reason, 0, error)
                                for r in request_ids)
            self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        self.failure = (f"the engine's step loop failed: {type(exc).__name__}: {exc}\n"
                        + "".join(traceback.format_exception(exc)[-6:]))
        self.log.error("%s", self.failure)
        error = RuntimeError(f"rank {self.rank}: {self.failure}")
        try:
            running = self.runtime.running() if self.rank == 0 else []
        except Exception:  # noqa: BLE001 - the engine may be what failed
            running = []
        held = [r.request_id for r in self._held] + [
            i.request_id for i in self._inbox if isinstance(i, Request)]
        self._publish_ended(running + held, "error", self.failure)
        while not self._jobs.empty():
            self._jobs.get_nowait().done.set_exception(error)
        with self._cond:
            for future in self._flips.values():
                if not future.done():
                    future.set_exception(error)
        self._parked.set()
