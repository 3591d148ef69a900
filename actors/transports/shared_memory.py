"""In-memory sources through shared memory that tp-reload keeps on the node
(``actors.transports.regions``), when the driver (the sender) and every engine rank share it;
Ray's object store otherwise.

Driver: each bucket, in plan order, is written once into a region (the fewest copies a
process boundary allows: this write, then each rank's copy of its windows into model
format), and sent as soon as it is written: the region holds the whole source, so nothing
waits for the ranks to free a step, and the driver writes the next buckets while the ranks
read the ones before, each at its own offset (through the object store, at most
``ObjectStoreTransport.max_in_flight`` buckets are pending: each holds store memory). Rank:
maps the region read-only (kept mapped for the next reloads) and hands the reload engine
views of it, in place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from actors.dtypes import dtype_name
from actors.lazy import TensorEntry
from actors.node_shm import SharedMemoryUnavailable
from actors.transports.base import Delivery, DeliveryContext, RankCalls, Source
from actors.transports.object_store import ObjectStoreTransport
from actors.transports.regions import (
    Lease,
    SharedBucket,
    aligned,
    region_pool,
    shares_node,
    write_at,
)
from orchestrator.plan import Bucket, Plan

log = logging.getLogger("tp_reload")


class SharedMemoryTransport(ObjectStoreTransport):
    """A dict or pairs of tensors; through the node's shared memory when it can."""

    name = "shared_memory"
    max_in_flight = None  # a region holds the whole source; the store path sets its own

    def deliver(self, source: Source, plan: Plan, context: DeliveryContext) -> Delivery:
        if not shares_node(context):
            return self._through_store(source, plan, context)
        try:
            lease = region_pool(context).lease(
                sum(aligned(t.nbytes) for b in plan.buckets for t in b.tensors),
                "an in-memory source")
        except SharedMemoryUnavailable as exc:  # a small /dev/shm (containers: 64 MiB)
            log.warning("%s; this in-memory source goes through Ray's object store", exc)
            return self._through_store(source, plan, context)
        delivery = Delivery(iter(()), carrier=self.name, node_bytes=lease.region.nbytes)
        delivery.steps = self._steps(source, plan, lease, context, delivery)
        return delivery

    def _through_store(self, source: Source, plan: Plan, context: DeliveryContext
                       ) -> Delivery:
        delivery = super().deliver(source, plan, context)
        delivery.carrier = "object_store"
        delivery.max_in_flight = ObjectStoreTransport.max_in_flight
        delivery.node_bytes = sum(b.nbytes for b in plan.buckets)
        return delivery

    def _steps(self, source: Source, plan: Plan, lease: Lease, context: DeliveryContext,
               delivery: Delivery) -> Iterator[tuple[RankCalls, int]]:
        offset = 0
        for bucket in plan.buckets:
            message, offset = self._write(source, bucket, lease, offset)
            delivery.replay.append(message)
            yield context.fleet.load_bucket(message), bucket.nbytes

    def _write(self, source: Source, bucket: Bucket, lease: Lease, offset: int
               ) -> tuple[SharedBucket, int]:
        entries, pieces = [], []
        for info in bucket.tensors:
            tensor = source.handle[info.name]
            write_at(lease.region.map, offset, tensor)
            entries.append(TensorEntry(info.name, dtype_name(tensor.dtype), tuple(tensor.shape)))
            whole = tuple((0, n) for n in tensor.shape)
            pieces.append(((whole, offset),))
            offset += aligned(info.nbytes)
        return SharedBucket(tuple(entries), lease.region.name, tuple(pieces), lease=lease), offset
