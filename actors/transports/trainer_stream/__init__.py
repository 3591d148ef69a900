"""Reloading straight from a trainer made of Ray actors: no driver, no object store.

Trainer side: the trainer's actor class mixes in ``TrainerEndpoint`` and says which tensors it
holds (``tp_reload_weights``: a state dict in checkpoint format, full tensors or DTensors
sharded with ``Shard``/``Replicate`` placements, e.g. FSDP2's). Driver side:
``orch.reload(TrainerSource(actors))`` lists every rank's holdings (names, full shapes,
dtypes and the box each rank holds; no data), plans and validates them like any source, then
schedules the transfer: every engine rank's read boxes of each tensor, cut by the boxes the
trainer ranks hold, one sender per piece (replicas take turns, so no rank funnels the rest).
``wire`` moves the pieces over a process group that spans the trainer's ranks and
every engine rank, in plan order, bucket by bucket.

All or nothing: a trainer rank that dies or fails mid-stream makes its peers' sends and
receives fail at once; the reload is rolled back like any other and the error names the
trainer rank. A stream cannot be replayed from the trainer later, so every engine rank keeps
the boxes it received of each committed stream while the commit log needs them (its share of
the source, about what the object store keeps of an in-memory source).

When the driver, every trainer rank and every engine rank share a node (and the engines are
not on CUDA beside a CUDA trainer), the trainer writes into the node's shared memory instead
(``shared``): each byte written once, read in place by every rank, one copy kept on the node
for rollback. A CUDA trainer whose ranks on each GPU hold what that GPU's engine ranks read
shares views of its tensors over CUDA IPC (``ipc``): no copy on the trainer's side. The
stream above stays for everything else.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from actors.node_shm import SharedMemoryUnavailable
from actors.transports.base import Delivery, DeliveryContext, RankCalls, Source, Transport
from actors.transports.regions import shares_node
from actors.transports.trainer_stream.ipc import deliver_ipc
from actors.transports.trainer_stream.schedule import schedule
from actors.transports.trainer_stream.shared import deliver_shared
from actors.transports.trainer_stream.trainer import (
    HeldTensor,
    ListedTrainer,
    TrainerEndpoint,
    TrainerSource,
    list_trainer,
)
from actors.transports.trainer_stream.wire import KeptBucket, LinkAddress, StreamLink
from orchestrator.plan import Plan

log = logging.getLogger("tp_reload")


class TrainerStreamTransport(Transport):
    name = "trainer_stream"

    def __init__(self) -> None:
        self._store: Any = None  # the driver's rendezvous store, made on the first stream
        self._ids = itertools.count()

    def accepts(self, source: Any) -> bool:
        return isinstance(source, TrainerSource)

    def open(self, source: Any, timeout_s: float) -> Source:
        return list_trainer(self, source, timeout_s)

    def deliver(self, source: Source, plan: Plan, context: DeliveryContext) -> Delivery:
        listed: ListedTrainer = source.handle
        stream = next(self._ids)
        nccl = listed.on_cuda and context.device == "cuda"
        if nccl and context.shared_memory:
            colocated = deliver_ipc(source, plan, context, stream)
            if colocated is not None:
                return colocated
        elif shares_node(context, listed.nodes):
            try:
                return deliver_shared(source, plan, context, stream)
            except SharedMemoryUnavailable as exc:  # a small /dev/shm (containers: 64 MiB)
                log.warning("%s; this trainer source streams over a process group", exc)
        return self._stream(source, plan, context, stream)

    def _stream(self, source: Source, plan: Plan, context: DeliveryContext, stream: int
                ) -> Delivery:
        """Queue the stream on every engine rank (join, then one call per bucket) and every
        trainer rank (one call that sends all its pieces)."""
        listed: ListedTrainer = source.handle
        fleet = context.fleet
        trainers = len(listed.source.actors)
        keys = fleet.rank_keys()
        plan_of = schedule(listed, plan, {t.name: t for t in source.tensors},
                           context.routing.rank_boxes, len(fleet.engines), trainers)
        address = self._address(trainers + len(keys), listed.on_cuda and context.device == "cuda",
                                context.timeout_s)
        link_rank = {key: trainers + i for i, key in enumerate(keys)}
        steps: list[tuple[RankCalls, int | None]] = [(fleet.open_link(
            {key: StreamLink(address, rank, stream) for key, rank in link_rank.items()}), None)]
        sending = [[actor.tp_reload_send.remote(address, t, plan_of.sends[t])]
                   for t, actor in enumerate(listed.source.actors)]
        for index, bucket in enumerate(plan.buckets):
            steps.append((fleet.load_bucket_each({key: plan_of.receives[key][index]
                                                  for key in keys}), bucket.nbytes))
        replay = [KeptBucket(stream, index, plan_of.receives[keys[0]][index].entries)
                  for index in range(len(plan.buckets))]
        return Delivery(iter(steps), replay, rank_kept=stream,
                        finish=lambda timeout_s: listed.wait(sending, timeout_s),
                        blame=lambda error, timeout_s: listed.blame(sending, error, timeout_s))

    def _address(self, world: int, nccl: bool, timeout_s: float) -> LinkAddress:
        """Where this reload's stream meets: the driver's store, a fresh prefix."""
        import ray
        import torch.distributed as dist

        host = ray.util.get_node_ip_address()
        if self._store is None:
            self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        return LinkAddress(host, self._store.port,
                           f"tp-reload/stream/{id(self)}/{time.monotonic_ns()}/", world,
                           "nccl" if nccl else "gloo", timeout_s)


__all__ = ["HeldTensor", "TrainerEndpoint", "TrainerSource", "TrainerStreamTransport"]
