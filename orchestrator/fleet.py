"""The fleet: every engine (data-parallel replica) and its TP rank actors, placed on Ray,
and the typed calls that reach them.

A call names a ``RankActor`` method by reference (``fleet.call(RankActor.commit, streams)``),
so its arguments are checked against the method and a renamed method fails at import, not
on a rank. Every wait goes through ``wait``: a failed rank raises ``RankError`` naming engine
and rank with its traceback text, never later than the configured timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import ray

from actors.rank_actor import RankActor
from actors.transports.base import BucketMessage, LinkMessage
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
from orchestrator.scratch import local_ray

P = ParamSpec("P")
R = TypeVar("R")
Calls = dict[RankKey, ray.ObjectRef]
# Longest wait at shutdown for the ranks to release their node's shared memory (a rank that
# does not answer is killed anyway; the next start on its node sweeps what it left).
CLOSE_TIMEOUT_S = 10.0


class Fleet:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.plugin = config.plugin
        self.engines: list[Engine] = []
        self.pids: dict[RankKey, int] = {}
        """Process id of every rank when last checked: a changed one is a restarted rank."""
        self._own_ray = contextlib.ExitStack()
        """The local Ray this fleet started, when Ray was not initialized (``release``)."""

    # ---- placement ---------------------------------------------------------------------

    def place(self, dtype: str) -> None:
        """Place every engine, form its process group (as a new engine instance) and note
        each rank's pid."""
        if not ray.is_initialized():
            # Its session files in a directory this process owns, and no dashboard (whose
            # helper processes leave their multiprocessing directories in /tmp when Ray
            # stops them): both go at ``release``, or at the next start after a crash.
            self._own_ray.enter_context(local_ray(include_dashboard=False))
        targets = engine_targets(self.config)
        self.engines = [create_engine(i, self.config, dtype, targets[i])
                        for i in range(self.config.num_engines)]
        connect_engines(self.engines, self.config.timeout_s)
        self.pids = rank_pids(self.engines, self.config.timeout_s)

    def close(self) -> None:
        """Every rank releases what it created on its node, then the actors are killed
        and their placement groups freed."""
        engines, self.engines = self.engines, []
        close_engines(engines, min(CLOSE_TIMEOUT_S, self.config.timeout_s))
        for engine in engines:
            engine.kill()

    def release(self) -> None:
        """Stop the local Ray ``place`` started, if it did (a Ray the caller initialized, or
        a cluster, is left running)."""
        self._own_ray.close()

    def rank_keys(self) -> list[RankKey]:
        return [(e.index, r) for e in self.engines for r in range(len(e.ranks))]

    def engine(self, index: int) -> Engine:
        if not self.engines:
            raise RuntimeError("orchestrator is not started (use it as a context manager)")
        if not 0 <= index < len(self.engines):
            raise ValueError(f"engine={index} out of range (num_engines={len(self.engines)})")
        return self.engines[index]

    # ---- typed calls -------------------------------------------------------------------

    def call(self, method: Callable[Concatenate[RankActor, P], Any], *args: P.args,
             **kwargs: P.kwargs) -> Calls:
        """``method`` on every rank of every engine."""
        return {key: ref for engine in self.engines
                for key, ref in engine.submit(method, *args, **kwargs).items()}

    def call_engine(self, index: int, method: Callable[Concatenate[RankActor, P], Any],
                    *args: P.args, **kwargs: P.kwargs) -> Calls:
        """``method`` on every rank of engine ``index``."""
        return self.engine(index).submit(method, *args, **kwargs)

    def call_rank(self, key: RankKey, method: Callable[Concatenate[RankActor, P], Any],
                  *args: P.args, **kwargs: P.kwargs) -> Calls:
        engine = self.engine(key[0])
        if not 0 <= key[1] < len(engine.ranks):
            raise ValueError(f"rank={key[1]} out of range "
                             f"(tensor_parallel_size={len(engine.ranks)})")
        return engine.submit(method, *args, only_rank=key[1], **kwargs)

    def call_each(self, method: Callable[..., Any], args: dict[RankKey, tuple[Any, ...]]
                  ) -> Calls:
        """``method`` on each rank in ``args`` with its own arguments."""
        return {key: getattr(self.engines[key[0]].ranks[key[1]], method.__name__).remote(*a)
                for key, a in args.items()}

    def wait(self, calls: Calls, timeout_s: float | None = None) -> dict[RankKey, Any]:
        return gather(calls, self.config.timeout_s if timeout_s is None else timeout_s)

    def run(self, method: Callable[Concatenate[RankActor, P], R], *args: P.args,
            **kwargs: P.kwargs) -> dict[RankKey, R]:
        """``call`` and ``wait``."""
        return self.wait(self.call(method, *args, **kwargs))

    # ---- what transports send ----------------------------------------------------------

    def load_bucket(self, message: BucketMessage) -> Calls:
        return self.call(RankActor.load_bucket, message)

    def load_bucket_each(self, messages: dict[RankKey, BucketMessage]) -> Calls:
        return self.call_each(RankActor.load_bucket, {k: (m,) for k, m in messages.items()})

    def open_link(self, links: dict[RankKey, LinkMessage]) -> Calls:
        return self.call_each(RankActor.open_link, {k: (m,) for k, m in links.items()})

    # ---- restarted ranks ---------------------------------------------------------------

    def restarted(self) -> bool:
        """Whether any rank's process changed since the last check."""
        return rank_pids(self.engines, self.config.timeout_s) != self.pids

    def rejoin_restarted(self) -> set[RankKey]:
        """Ranks Ray restarted (a new pid) form a new process group with their engine. A
        rank of an engine with ``rejoin`` joins its live peers; any other engine (vLLM forms
        its group once per process) is restarted whole, which also frees a peer blocked in a
        collective with the dead rank. Returns every rank that is now a fresh process."""
        timeout = self.config.timeout_s
        pids = rank_pids(self.engines, timeout)
        restarted = {key for key, pid in pids.items() if pid != self.pids.get(key)}
        for engine in self.engines:
            ranks = {key for key in pids if key[0] == engine.index}
            if not ranks & restarted:
                continue
            if self.plugin.supports("rejoin"):
                gather(engine.submit(RankActor.reset_distributed), timeout)
            else:
                pids.update(restart_ranks(engine, ranks - restarted, pids, timeout))
                restarted |= ranks
            connect_engines([engine], timeout)
        self.pids = pids
        return restarted


__all__ = ["Calls", "Fleet"]
