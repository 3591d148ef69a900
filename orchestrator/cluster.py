"""Ray placement: one placement group per engine, one rank actor per bundle, and the one
helper every driver call goes through (``gather``), which turns a failed rank into a
``RankError`` naming engine and rank, with the rank's traceback text, and never waits
longer than the configured timeout. A node's shared memory that cannot take an engine is a
``SharedMemoryError`` of one line instead."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.node_shm import SharedMemoryUnavailable, describe, new_instance
from actors.rank_actor import CONTROL_GROUP, EVENTS_GROUP, SERVE_GROUP, SUBMIT_GROUP, RankActor
from actors.reload import PeerFailedError, ReloadError
from orchestrator.config import EngineConfig
from orchestrator.errors import CheckpointError, RankError, SharedMemoryError

log = logging.getLogger("tp_reload")
RankKey = tuple[int, int]  # (engine, rank)
# Ray labels every node with its id; a placement group's bundle_label_selector can require it.
NODE_LABEL = "ray.io/node-id"
# How long an engine waits for its target node before Ray may place it elsewhere.
TARGET_GRACE_S = 10.0
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def gather(calls: Mapping[RankKey, ray.ObjectRef], timeout_s: float) -> dict[RankKey, Any]:
    """Wait for every call; the first failure raises at once (other ranks may be blocked in
    a collective that can no longer complete, so waiting for them would hang). A rank that
    only stopped because a peer failed (failure consensus) is not the news: its peers answer
    the same call, and the one that failed is reported."""
    pending = {ref: key for key, ref in calls.items()}
    results: dict[RankKey, Any] = {}
    deferred: BaseException | None = None
    deadline = time.monotonic() + timeout_s
    while pending:
        remaining = deadline - time.monotonic()
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, remaining))
        if not ready:
            if deferred is not None:
                raise deferred
            engine, rank = sorted(pending.values())[0]
            raise RankError(engine, rank, f"no answer within {timeout_s:.0f}s "
                            f"(still waiting on {sorted(pending.values())})")
        for ref in ready:
            key = pending.pop(ref)
            try:
                results[key] = _result(key, ref)
            except RankError as exc:
                if not isinstance(getattr(exc.__cause__, "cause", None), PeerFailedError):
                    raise
                deferred = deferred or exc
    if deferred is not None:
        raise deferred
    return results


def _result(key: RankKey, ref: ray.ObjectRef) -> Any:
    try:
        return ray.get(ref)
    except RayTaskError as exc:
        if isinstance(exc.cause, ReloadError):
            # Bad data found on a rank (NaN, Inf, a tensor that does not fit): the source's
            # fault. Any other exception is the rank's, reported with its traceback.
            raise CheckpointError(f"engine {key[0]} rank {key[1]}: {exc.cause}") from exc
        if isinstance(exc.cause, SharedMemoryUnavailable):  # the node's: one line, no traceback
            raise SharedMemoryError(f"engine {key[0]} rank {key[1]}: {exc.cause}") from None
        # Ray colours the remote traceback; keep the text plain for logs and messages.
        raise RankError(*key, ANSI_ESCAPE.sub("", str(exc))) from exc
    except RayActorError as exc:
        raise RankError(*key, f"rank actor died: {exc}") from exc


@dataclass
class Engine:
    """One data-parallel replica: a placement group and its TP rank actors."""

    index: int
    group: PlacementGroup
    ranks: list[Any]
    instance: str | None = None
    """Name of the engine's current formation (``actors.node_shm``), set when its ranks
    connect: what they create in the node's shared memory carries it."""

    def submit(self, method: Callable[..., Any], *args: Any, only_rank: int | None = None,
               **kwargs: Any) -> dict[RankKey, ray.ObjectRef]:
        """``method`` (a ``RankActor`` method, named by reference) on every rank, or one."""
        return {
            (self.index, r): getattr(actor, method.__name__).remote(*args, **kwargs)
            for r, actor in enumerate(self.ranks)
            if only_rank is None or r == only_rank
        }

    def kill(self) -> None:
        for actor in self.ranks:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.group)


def _bundle(cfg: EngineConfig) -> dict[str, float]:
    bundle = {"CPU": float(cfg.num_cpus_per_rank)}
    if cfg.device == "cuda":
        bundle["GPU"] = float(cfg.num_gpus_per_rank)
    return bundle


def _fits(node_resources: Mapping[str, float], bundle: dict[str, float], tp: int) -> bool:
    return all(node_resources.get(k, 0.0) >= v * tp for k, v in bundle.items())


def engine_targets(cfg: EngineConfig) -> list[str | None]:
    """Per engine, the node id it is aimed at (None: Ray chooses). With SPREAD and a
    STRICT_PACK engine, engines go round-robin over the alive nodes able to hold a whole
    engine, largest first, so replicas land on different nodes while there are nodes."""
    if cfg.engine_placement != "SPREAD" or cfg.placement_strategy != "STRICT_PACK":
        return [None] * cfg.num_engines
    bundle = _bundle(cfg)
    nodes = [n for n in ray.nodes()
             if n.get("Alive") and _fits(n.get("Resources", {}), bundle,
                                         cfg.tensor_parallel_size)]
    if not nodes:
        return [None] * cfg.num_engines
    nodes.sort(key=lambda n: (-n["Resources"].get("CPU", 0.0), n["NodeID"]))
    return [nodes[i % len(nodes)]["NodeID"] for i in range(cfg.num_engines)]


def _reserve(index: int, cfg: EngineConfig, target_node: str | None) -> PlacementGroup:
    """The engine's placement group, on ``target_node`` when it has room in time: a hard
    label selector (public API) tried for TARGET_GRACE_S, then anywhere Ray finds room."""
    tp = cfg.tensor_parallel_size
    # Unique per orchestrator: several may share one Ray cluster.
    name = f"tp-reload-{uuid.uuid4().hex[:8]}-engine-{index}"
    if target_node is not None:
        group = placement_group([_bundle(cfg)] * tp, strategy=cfg.placement_strategy,
                                name=name, bundle_label_selector=[{NODE_LABEL: target_node}] * tp)
        try:
            ray.get(group.ready(), timeout=min(TARGET_GRACE_S, cfg.timeout_s))
        except GetTimeoutError:
            remove_placement_group(group)
            log.info("engine %d: node %s has no room for it now; letting Ray place it", index,
                     target_node)
        else:
            return group
    group = placement_group([_bundle(cfg)] * tp, strategy=cfg.placement_strategy, name=name)
    try:
        ray.get(group.ready(), timeout=cfg.timeout_s)
    except GetTimeoutError as exc:
        remove_placement_group(group)
        raise RankError(index, 0, (
            f"placement group of {tp} x {_bundle(cfg)} not ready after {cfg.timeout_s:.0f}s; "
            f"the cluster has {ray.available_resources()} available (lower num_cpus_per_rank?)"
        )) from exc
    return group


def create_engine(index: int, cfg: EngineConfig, dtype: str,
                  target_node: str | None = None) -> Engine:
    """Reserve the engine's bundles (on ``target_node`` if it has room), then start one
    rank actor in each."""
    tp = cfg.tensor_parallel_size
    group = _reserve(index, cfg, target_node)
    # ping answers even while the rank is busy (or stuck in a collective).
    remote = ray.remote(concurrency_groups={
        CONTROL_GROUP: 1, SERVE_GROUP: 1, SUBMIT_GROUP: 1, EVENTS_GROUP: 1})(RankActor)
    options = cfg.options(dtype)
    ranks = [
        remote.options(
            num_cpus=cfg.num_cpus_per_rank,
            num_gpus=cfg.num_gpus_per_rank if cfg.device == "cuda" else 0,
            # A dead rank comes back empty; the orchestrator rebuilds it (never retries a call).
            max_restarts=cfg.max_rank_restarts, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=rank
            ),
        ).remote(engine=index, rank=rank, plugin=cfg.plugin, options=options,
                 timeout_s=cfg.timeout_s, check_finite=cfg.check_finite)
        for rank in range(tp)
    ]
    return Engine(index, group, ranks)


def rank_pids(engines: list[Engine], timeout_s: float) -> dict[RankKey, int]:
    """Process id of every rank actor, waiting for Ray to restart dead ones (a changed pid
    is a restarted rank: its constructor ran again and it holds no weights)."""
    pids: dict[RankKey, int] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        missing = {k: ref for e in engines for k, ref in e.submit(RankActor.ping).items()
                   if k not in pids}
        ray.wait(list(missing.values()), num_returns=len(missing),
                 timeout=max(0.0, deadline - time.monotonic()))
        for key, ref in missing.items():
            try:
                pids[key] = ray.get(ref, timeout=0)
            except (RayActorError, GetTimeoutError):
                pass
        if len(pids) == sum(len(e.ranks) for e in engines):
            return pids
        if time.monotonic() >= deadline:
            engine, rank = min(set(missing) - set(pids))
            raise RankError(engine, rank, f"did not come back within {timeout_s:.0f}s "
                            "(max_rank_restarts exhausted?)")
        time.sleep(0.2)


def restart_ranks(engine: Engine, keys: set[RankKey], pids: dict[RankKey, int],
                  timeout_s: float) -> dict[RankKey, int]:
    """Kill the ranks ``keys`` of ``engine`` so Ray restarts them, and wait until each one
    answers from a new process (``ray.kill`` is asynchronous: until then the old process may
    still answer). Returns their new pids."""
    for _, rank in keys:
        ray.kill(engine.ranks[rank], no_restart=False)
    deadline = time.monotonic() + timeout_s
    fresh: dict[RankKey, int] = {}
    while len(fresh) < len(keys):
        for key in sorted(keys - set(fresh)):
            ref = engine.ranks[key[1]].ping.remote()
            try:
                pid = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except (RayActorError, GetTimeoutError):
                continue
            if pid != pids[key]:
                fresh[key] = pid
        if time.monotonic() >= deadline:
            missing = sorted(keys - set(fresh))
            raise RankError(*missing[0], f"not restarted within {timeout_s:.0f}s "
                            f"(max_rank_restarts exhausted?); waiting on {missing}")
        if len(fresh) < len(keys):
            time.sleep(0.1)
    return fresh


def connect_engines(engines: list[Engine], timeout_s: float) -> None:
    """Rendezvous each engine's ranks through a store on its rank 0 (port chosen by the OS),
    as a new engine instance (``actors.node_shm``): what dead instances left on the ranks'
    nodes (shared memory, temporary files) is removed first, and logged here."""
    addresses = gather(
        {k: v for e in engines for k, v in e.submit(RankActor.store_address, only_rank=0).items()},
        timeout_s,
    )
    calls: dict[RankKey, ray.ObjectRef] = {}
    for engine in engines:
        host, port = addresses[(engine.index, 0)]
        previous, engine.instance = engine.instance, new_instance(engine.index)
        calls.update(engine.submit(RankActor.init_distributed, host, port, engine.instance,
                                   previous))
    for (index, rank), removed in sorted(gather(calls, timeout_s).items()):
        if removed:
            log.warning("engine %d rank %d removed what dead engine instances left on its "
                        "node: %s", index, rank, describe(removed))


def close_engines(engines: list[Engine], timeout_s: float) -> None:
    """Ask every rank to release its node's shared memory before it is killed; a rank that
    is dead or does not answer in time is skipped (the next start on its node sweeps)."""
    calls = {ref: key for e in engines for key, ref in e.submit(RankActor.close).items()}
    ready, _ = ray.wait(list(calls), num_returns=len(calls), timeout=timeout_s)
    for ref in ready:
        engine, rank = calls[ref]
        try:
            removed = ray.get(ref)
        except (RayActorError, RayTaskError) as exc:
            log.info("engine %d rank %d did not close (%s)", engine, rank,
                     ANSI_ESCAPE.sub("", str(exc)).splitlines()[0])
            continue
        if removed:
            log.info("engine %d rank %d closed: removed %s", engine, rank, describe(removed))
