"""In-memory sources through shared memory that tp-reload keeps on the node, when the driver
(the sender) and every engine rank share it; Ray's object store otherwise.

Driver: each bucket, in plan order, is written once into a region of ``/dev/shm`` (the
fewest copies a process boundary allows: this write, then each rank's copy of its windows
into model format); at most ``max_in_flight`` buckets are pending, so the driver writes the
next bucket while the ranks read the one before, each at its own offset. Rank: maps the
region read-only (kept mapped for the next reloads) and hands the reload engine views of it,
in place.

Regions belong to the orchestrator (``RegionPool``, in its ``TransportState``) and are
reused: a region whose pages were touched once costs a plain memory copy the next time, not
fresh pages (Ray's store: ~2 GB/s on fresh pages against ~12 GB/s on reused ones here). A
region stays out of reuse while any message pointing into it lives on the driver: the
commit log's (it replays from them, one copy per node whatever the number of ranks) and the
reload's own. They are entries of an engine-instance-like name of their own
(``actors.node_shm``), claimed by the driver: closing the orchestrator removes them, and a
driver that died leaves them to the next start on the node, which sweeps them.
"""

from __future__ import annotations

import logging
import mmap
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from actors import node_shm
from actors.dtypes import dtype_name, view_in
from actors.lazy import TensorEntry, TensorWindow
from actors.node_shm import SharedMemoryUnavailable
from actors.transports.base import (
    BucketMessage,
    BucketReader,
    Delivery,
    DeliveryContext,
    Items,
    RankCalls,
    Source,
)
from actors.transports.object_store import ObjectStoreTransport
from orchestrator.plan import Bucket, Plan

log = logging.getLogger("tp_reload")
ALIGN = 64
"""Every tensor starts on a cache line (and so on its dtype's alignment)."""
MIB = 1 << 20
GROWTH = MIB
"""Regions are made in whole MiB, so slightly larger sources reuse them."""


class Region:
    """One file of ``/dev/shm``, created and mapped writable by the driver. Its pages are
    allocated up front: a full ``/dev/shm`` refuses the region here, in one line, instead
    of killing the writer with SIGBUS halfway through a reload."""

    def __init__(self, name: str, nbytes: int) -> None:
        self.name, self.nbytes = name, nbytes
        path = node_shm.SHM_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            self.map = mmap.mmap(fd, nbytes)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise SharedMemoryUnavailable(f"cannot allocate {nbytes / MIB:.1f} MiB for {path} "
                                          f"({exc.strerror})") from exc
        finally:
            os.close(fd)

    def write(self, offset: int, tensor: torch.Tensor) -> None:
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        view_in(self.map, offset, torch.uint8, (raw.numel(),)).copy_(raw)

    def close(self) -> None:
        self.map.close()
        (node_shm.SHM_DIR / self.name).unlink(missing_ok=True)


class Lease:
    """A region in use: back in its pool once the last message holding the lease is gone."""

    def __init__(self, pool: RegionPool, region: Region) -> None:
        self.region = region
        weakref.finalize(self, pool.give_back, region)


class RegionPool:
    """The orchestrator's regions on the driver's node: leased per reload, reused. Closed
    with the orchestrator, or at the latest when the driver's interpreter exits."""

    def __init__(self) -> None:
        if not node_shm.SHM_DIR.is_dir():
            raise SharedMemoryUnavailable(f"this node has no {node_shm.SHM_DIR}")
        self.instance = node_shm.new_instance(0)
        node_shm.claim(self.instance, 0)
        self.release = weakref.finalize(self, node_shm.release, self.instance, log)
        self.free: list[Region] = []
        self.made = 0

    def lease(self, nbytes: int) -> Lease:
        fits = [r for r in self.free if r.nbytes >= nbytes]
        if fits:
            region = min(fits, key=lambda r: r.nbytes)
            self.free.remove(region)
        else:
            # None fits: the free ones are too small for what this source needs now.
            for old in self.free:
                old.close()
            self.free.clear()
            size = -(-nbytes // GROWTH) * GROWTH
            name = f"{self.instance}-region{self.made}"
            node_shm.require_space(size, f"{node_shm.SHM_DIR / name} (an in-memory source)")
            region = Region(name, size)
            self.made += 1
        return Lease(self, region)

    def give_back(self, region: Region) -> None:
        if self.release.alive:  # else: gone with the instance
            self.free.append(region)

    def close(self) -> None:
        """Every region goes (views the ranks still hold stay readable until dropped)."""
        for region in self.free:
            region.map.close()
        self.free.clear()
        self.release()


@dataclass(frozen=True, slots=True)
class SharedBucket(BucketMessage):
    entries: tuple[TensorEntry, ...]
    region: str
    """File name of the region in ``/dev/shm``."""
    offsets: tuple[int, ...]
    """Of each entry's bytes in the region."""
    lease: Lease | None = field(default=None, compare=False)
    """Driver side only (not sent): keeps the region out of reuse while the message lives."""

    def __reduce__(self) -> tuple[Any, ...]:
        return SharedBucket, (self.entries, self.region, self.offsets)

    def read(self, reader: BucketReader) -> Items:
        region = _mapped(self.region)
        return [(e.name, TensorWindow(e.name, view_in(region, offset, getattr(torch, e.dtype),
                                                        e.shape)))
                for e, offset in zip(self.entries, self.offsets, strict=True)]


KEPT_MAPPINGS = 3
"""Regions a rank keeps mapped between reloads (the pool cycles through two in steady
state): a region mapped afresh costs a page fault per 4 KiB the rank reads, every reload
(measured: 10-20% of an unquantized in-memory reload of the 0.5B model here). A region the
driver removed frees its memory once the last rank drops its mapping."""
_mappings: dict[str, mmap.mmap] = {}


def _mapped(name: str) -> mmap.mmap:
    """``name`` mapped read-only in this rank process, kept for the next reloads; the least
    recently used mapping beyond ``KEPT_MAPPINGS`` is dropped (views still using it keep it
    alive until they go)."""
    region = _mappings.pop(name, None)
    if region is None:
        with open(node_shm.SHM_DIR / name, "rb") as f:
            region = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    _mappings[name] = region
    while len(_mappings) > KEPT_MAPPINGS:
        _mappings.pop(next(iter(_mappings)))
    return region


class NodeLocality:
    """Whether the driver and every rank of the fleet share a node, asked once per set of
    rank processes (a restarted rank stays in its placement group's bundle, on its node)."""

    def __init__(self) -> None:
        self.known: dict[tuple[Any, ...], bool] = {}

    def same_node(self, context: DeliveryContext) -> bool:
        import ray

        from actors.rank_actor import RankActor

        fleet = context.fleet
        key = tuple(sorted(fleet.pids.items()))
        if key not in self.known:
            here = ray.get_runtime_context().get_node_id()
            placed = fleet.run(RankActor.placement)
            self.known = {key: all(p["node_id"] == here for p in placed.values())}
        return self.known[key]

    def close(self) -> None:
        self.known.clear()


class SharedMemoryTransport(ObjectStoreTransport):
    """A dict or pairs of tensors; through the node's shared memory when it can."""

    name = "shared_memory"

    def deliver(self, source: Source, plan: Plan, context: DeliveryContext) -> Delivery:
        locality = context.state.get("node_locality", NodeLocality)
        if context.memory_transport == "object_store" or not locality.same_node(context):
            return self._through_store(source, plan, context)
        try:
            pool: RegionPool = context.state.get(self.name, RegionPool)
            lease = pool.lease(_layout_bytes(plan.buckets))
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
        entries, offsets = [], []
        for info in bucket.tensors:
            tensor = source.handle[info.name]
            lease.region.write(offset, tensor)
            entries.append(TensorEntry(info.name, dtype_name(tensor.dtype), tuple(tensor.shape)))
            offsets.append(offset)
            offset += _aligned(info.nbytes)
        return SharedBucket(tuple(entries), lease.region.name, tuple(offsets), lease), offset


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _layout_bytes(buckets: list[Bucket]) -> int:
    return max(ALIGN, sum(_aligned(t.nbytes) for b in buckets for t in b.tensors))
