"""The driver's half of continuous batching: every request in flight on the engines' step
loops (``actors.step_loop``), from submission to its last token.

A request goes to rank 0 of one engine (the one named, or the one with the fewest requests
in flight), which admits it on every rank of that engine at the next step. A pump thread per
engine long-polls rank 0 for what the steps produced and hands each ``Delta`` to its request,
which keeps its tokens, log-probs and per-token version spans and tells whoever waits on it
(a blocking ``sample``, an ``agenerate``, an ``astream``).

No request is lost to a failed engine: once the fleet is recovered (its dead ranks rebuilt,
the committed version restored), each request that was running there is submitted again as
a continuation (its prompt and the tokens it has, for the tokens it has left; the sampling
generator starts again from the request's seed there, so a greedy request goes on exactly).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import ray

from actors.engines.runtime import Request
from actors.step_loop import Delta
from orchestrator.fleet import Fleet

log = logging.getLogger("tp_reload")

# How long one long poll of an engine's rank 0 waits for something to hand out (it returns
# as soon as a step produced anything; this only paces an idle engine's polls).
POLL_S = 2.0
# How long the pump waits before asking again an engine that cannot answer (rebuilding).
RETRY_S = 0.2

Sink = Callable[["Tracked", Delta], None]


@dataclass(slots=True)
class Tracked:
    """One request, driver side."""

    request: Request
    """As first submitted."""
    engine: int
    sink: Sink
    """Told of every delta (on a pump thread), and of the end."""
    submitted_as: str = ""
    """The id of its latest submission (a continuation's differs)."""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[tuple[int, int, int]] = field(default_factory=list)
    """(version, start, end): tokens start:end were drawn from that version's weights."""
    finish_reason: str | None = None
    cached_tokens: int = 0
    error: str | None = None

    def add(self, delta: Delta) -> None:
        start = len(self.token_ids)
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        end = len(self.token_ids)
        if end > start:
            if self.spans and self.spans[-1][0] == delta.version and self.spans[-1][2] == start:
                self.spans[-1] = (delta.version, self.spans[-1][1], end)
            else:
                self.spans.append((delta.version, start, end))
        self.cached_tokens = max(self.cached_tokens, delta.cached_tokens)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.error = delta.error

    def continuation(self, suffix: int) -> Request:
        """What is left of it, with the tokens it has as part of the prompt."""
        sampling = self.request.sampling
        left = sampling.max_new_tokens - len(self.token_ids)
        return replace(self.request, request_id=f"{self.request.request_id}.{suffix}",
                       prompt=self.request.prompt + self.token_ids,
                       sampling=replace(sampling, max_new_tokens=left))


class Dispatcher:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._lock = threading.Lock()
        self._by_id: dict[str, Tracked] = {}
        """Unfinished requests by the id of their latest submission."""
        self._lost: dict[int, str] = {}
        """Engines whose step loop failed: why."""
        self._pumps: list[threading.Thread] = []
        self._closed = threading.Event()
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self.on_lost: Callable[[int, str], None] | None = None
        """Called (on a pump thread) when an engine's step loop failed."""

    def start(self) -> None:
        for engine in self.fleet.engines:
            pump = threading.Thread(target=self._pump, args=(engine.index,), daemon=True,
                                    name=f"tp-reload-pump-{engine.index}")
            pump.start()
            self._pumps.append(pump)

    def stop(self) -> None:
        """The pumps stop at their next answer (the engines closing give them one)."""
        self._closed.set()

    def close(self) -> None:
        """After the engines closed: every request still in flight ends with an error."""
        self._closed.set()
        for pump in self._pumps:
            pump.join(1.0)
        self._pumps = []
        with self._lock:
            pending, self._by_id = list(self._by_id.values()), {}
        for tracked in pending:
            self._end(tracked, "error", "the orchestrator shut down")

    # ---- requests ----------------------------------------------------------------------

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def least_loaded(self) -> int:
        with self._lock:
            counts = {e.index: 0 for e in self.fleet.engines}
            for tracked in self._by_id.values():
                counts[tracked.engine] += 1
        return min(counts, key=lambda e: (counts[e], e))

    def submit(self, requests: list[Request], engine: int, sink: Sink) -> tuple[
            list[Tracked], ray.ObjectRef]:
        """Track ``requests`` and send them to ``engine``; returns them and the submission's
        ref (it raises there if the engine cannot take them)."""
        tracked = [Tracked(r, engine, sink, r.request_id) for r in requests]
        with self._lock:
            self._by_id.update((t.submitted_as, t) for t in tracked)
        ref = self.fleet.engine(engine).ranks[0].submit.remote(requests)
        return tracked, ref

    def forget(self, tracked: list[Tracked]) -> None:
        """A submission that failed: stop tracking it."""
        with self._lock:
            for t in tracked:
                self._by_id.pop(t.submitted_as, None)

    def cancel(self, tracked: Tracked) -> None:
        """Free its slot on its engine (its caller went away)."""
        with self._lock:
            if self._by_id.pop(tracked.submitted_as, None) is None:
                return
        try:
            self.fleet.engine(tracked.engine).ranks[0].cancel.remote([tracked.submitted_as])
        except Exception:  # noqa: BLE001 - an engine being rebuilt has no slot to free
            log.debug("could not cancel %s", tracked.submitted_as, exc_info=True)

    def resubmit(self, engines: set[int]) -> None:
        """After a recovery rebuilt ``engines``: their unfinished requests go on as
        continuations, spread over the engines."""
        with self._lock:
            orphans = [t for t in self._by_id.values() if t.engine in engines]
            for t in orphans:
                del self._by_id[t.submitted_as]
            for index in engines:
                self._lost.pop(index, None)
        for tracked in orphans:
            if tracked.finish_reason is None and len(tracked.token_ids) >= \
                    tracked.request.sampling.max_new_tokens:
                self._end(tracked, "length")
                continue
            request = tracked.continuation(next(self._ids))
            tracked.engine, tracked.submitted_as = self.least_loaded(), request.request_id
            with self._lock:
                self._by_id[tracked.submitted_as] = tracked
            log.warning("request %s goes on as %s on engine %d after %d tokens",
                        tracked.request.request_id, request.request_id, tracked.engine,
                        len(tracked.token_ids))
            try:
                ray.get(self.fleet.engine(tracked.engine).ranks[0].submit.remote([request]))
            except Exception as exc:  # noqa: BLE001 - told to its caller
                self.forget([tracked])
                self._end(tracked, "error", f"could not be submitted again: {exc}")

    def fail_lost(self, engine: int) -> None:
        """An engine whose step loop failed and was not rebuilt: its requests end with the
        error."""
        with self._lock:
            why = self._lost.pop(engine, "its step loop failed")
            lost = [t for t in self._by_id.values() if t.engine == engine]
            for t in lost:
                del self._by_id[t.submitted_as]
        for tracked in lost:
            self._end(tracked, "error", why)

    def _end(self, tracked: Tracked, reason: str, error: str | None = None) -> None:
        delta = Delta(tracked.submitted_as, [], [], -1, reason, 0, error)
        tracked.add(delta)
        tracked.sink(tracked, delta)

    # ---- the pumps ---------------------------------------------------------------------

    def _pump(self, index: int) -> None:
        while not self._closed.is_set():
            try:
                rank0 = self.fleet.engine(index).ranks[0]
                deltas = ray.get(rank0.events.remote(POLL_S),
                                 timeout=POLL_S + self.fleet.config.timeout_s)
            except Exception as exc:  # noqa: BLE001 - a rank being rebuilt, or a failed loop
                if self._closed.is_set():
                    return
                self._engine_lost(index, str(exc).splitlines()[0] if str(exc) else repr(exc))
                time.sleep(RETRY_S)
                continue
            for delta in deltas:
                self._deliver(index, delta)

    def _deliver(self, index: int, delta: Delta) -> None:
        with self._lock:
            tracked = self._by_id.get(delta.request_id)
            if tracked is None:
                return  # cancelled, or a submission a recovery replaced
            if delta.finish_reason == "error":
                lost = True
            else:
                lost = False
                if delta.finish_reason is not None:
                    del self._by_id[delta.request_id]
        if lost:
            self._engine_lost(index, delta.error or "its step loop failed")
            return
        tracked.add(delta)
        tracked.sink(tracked, delta)

    def _engine_lost(self, index: int, why: str) -> None:
        with self._lock:
            if not any(t.engine == index for t in self._by_id.values()):
                return
            first = index not in self._lost
            self._lost.setdefault(index, why)
        if first and self.on_lost is not None:
            self.on_lost(index, why)
