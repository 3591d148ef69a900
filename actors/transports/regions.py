"""Shared memory tp-reload keeps on the driver's node, which senders on the node (the driver
for an in-memory source, a trainer's ranks for a trainer source) write into and every rank on
the node reads in place.

Regions belong to the orchestrator (``RegionPool``, in its ``TransportState``) and are
reused: a region whose pages were touched once costs a plain memory copy the next time, not
fresh pages (Ray's store: ~2 GB/s on fresh pages against ~12 GB/s on reused ones here). A
region stays out of reuse while any message pointing into it lives on the driver: the commit
log's (it replays from them, one copy per node whatever the number of ranks) and the
reload's own. They are entries of an engine-instance-like name of their own
(``actors.node_shm``), claimed by the driver: closing the orchestrator removes them, and a
driver that died leaves them to the next start on the node, which sweeps them. A sender that
dies only stops writing: the region is the driver's.
"""

from __future__ import annotations

import logging
import mmap
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from actors import node_shm
from actors.copy_screen import copy_streamed
from actors.dtypes import view_in
from actors.lazy import Bounds, BoxesWindow, TensorEntry, box_shape
from actors.node_shm import SharedMemoryUnavailable
from actors.transports.base import BucketMessage, BucketReader, DeliveryContext, Items

log = logging.getLogger("tp_reload")
ALIGN = 64
"""Every tensor starts on a cache line (and so on its dtype's alignment)."""
MIB = 1 << 20
GROWTH = MIB
"""Regions are made in whole MiB, so slightly larger sources reuse them."""


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def write_at(buffer: Any, offset: int, tensor: torch.Tensor) -> int:
    """Copy ``tensor`` (any device, any strides) to ``offset`` of ``buffer`` (aligned to
    its dtype), in one pass; returns the bytes written. Another process reads it next, so
    a large CPU copy streams around this core's cache (``copy_streamed``: ~10% off an
    in-memory reload here)."""
    target = view_in(buffer, offset, tensor.dtype, tuple(tensor.shape))
    if not copy_streamed(target, tensor.detach()):
        target.copy_(tensor.detach())
    return target.numel() * target.element_size()


class Region:
    """One file of ``/dev/shm``, created and mapped writable by the driver. Its pages are
    allocated up front: a full ``/dev/shm`` refuses the region here, in one line, instead
    of killing a writer with SIGBUS halfway through a reload."""

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

    def lease(self, nbytes: int, what: str) -> Lease:
        """A region of at least ``nbytes`` for ``what`` (named in a refusal)."""
        fits = [r for r in self.free if r.nbytes >= nbytes]
        if fits:
            region = min(fits, key=lambda r: r.nbytes)
            self.free.remove(region)
        else:
            # None fits: the free ones are too small for what the sources need now.
            for old in self.free:
                old.close()
            self.free.clear()
            size = -(-max(nbytes, ALIGN) // GROWTH) * GROWTH
            name = f"{self.instance}-region{self.made}"
            node_shm.require_space(size, f"{node_shm.SHM_DIR / name} ({what})")
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


def region_pool(context: DeliveryContext) -> RegionPool:
    """The orchestrator's pool (one for every transport that writes regions)."""
    return context.state.get("regions", RegionPool)


Pieces = tuple[tuple[Bounds, int], ...]
"""Boxes of one tensor in a region: (box in the full tensor's coordinates, byte offset)."""


@dataclass(frozen=True, slots=True)
class SharedBucket(BucketMessage):
    """One bucket in a region: each tensor as the boxes written of it (the whole tensor,
    or the boxes a trainer's ranks hold), which every rank reads in place."""

    entries: tuple[TensorEntry, ...]
    region: str
    """File name of the region in ``/dev/shm``."""
    pieces: tuple[Pieces, ...]
    """Per entry, where its boxes are."""
    written: tuple[Any, ...] = ()
    """Refs of the sender calls that write the bucket (a trainer's): read once they are
    done; empty when the region was written before the message was sent."""
    lease: Lease | None = field(default=None, compare=False)
    """Driver side only (not sent): keeps the region out of reuse while the message lives."""

    def __reduce__(self) -> tuple[Any, ...]:
        return SharedBucket, (self.entries, self.region, self.pieces, self.written)

    def read(self, reader: BucketReader) -> Items:
        if self.written:
            import ray

            reader.timed(lambda: ray.get(list(self.written)))
        region = mapped(self.region)
        items: Items = []
        for entry, pieces in zip(self.entries, self.pieces, strict=True):
            dtype = getattr(torch, entry.dtype)
            boxes = {box: view_in(region, offset, dtype, box_shape(box)) for box, offset in pieces}
            items.append((entry.name, BoxesWindow(entry, boxes, borrowed=True)))
        return items


KEPT_MAPPINGS = 3
"""Regions a process keeps mapped between reloads (the pool cycles through two in steady
state): a region mapped afresh costs a page fault per 4 KiB read or written, every reload
(measured: 10-20% of an unquantized in-memory reload of the 0.5B model here). A region the
driver removed frees its memory once the last process drops its mapping."""
_mappings: dict[tuple[str, bool], mmap.mmap] = {}


def mapped(name: str, writable: bool = False) -> mmap.mmap:
    """Region ``name`` mapped in this process (read-only unless ``writable``: a trainer),
    kept for the next reloads; the least recently used mapping beyond ``KEPT_MAPPINGS`` is
    dropped (views still using it keep it alive until they go)."""
    key = (name, writable)
    region = _mappings.pop(key, None)
    if region is None:
        with open(node_shm.SHM_DIR / name, "r+b" if writable else "rb") as f:
            region = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ | (
                mmap.PROT_WRITE if writable else 0))
    _mappings[key] = region
    while len(_mappings) > KEPT_MAPPINGS:
        _mappings.pop(next(iter(_mappings)))
    return region


class NodeLocality:
    """Where every rank of the fleet runs (its node, its GPU), asked once per set of rank
    processes (a restarted rank stays in its placement group's bundle, on its node)."""

    def __init__(self) -> None:
        self.known: dict[tuple[Any, ...], dict[tuple[int, int], dict[str, Any]]] = {}

    def placed(self, context: DeliveryContext) -> dict[tuple[int, int], dict[str, Any]]:
        """Each rank's ``RankActor.placement``."""
        from actors.rank_actor import RankActor

        fleet = context.fleet
        key = tuple(sorted(fleet.pids.items()))
        if key not in self.known:
            self.known = {key: fleet.run(RankActor.placement)}
        return self.known[key]

    def same_node(self, context: DeliveryContext, others: Iterable[str] = ()) -> bool:
        """Whether the driver, every rank and every node id in ``others`` (a trainer's
        ranks') share a node."""
        import ray

        here = ray.get_runtime_context().get_node_id()
        return (all(p["node_id"] == here for p in self.placed(context).values())
                and all(node == here for node in others))

    def close(self) -> None:
        self.known.clear()


def locality(context: DeliveryContext) -> NodeLocality:
    return context.state.get("node_locality", NodeLocality)


def shares_node(context: DeliveryContext, others: Iterable[str] = ()) -> bool:
    """Whether shared memory is on and the driver, every rank and ``others`` share a node."""
    return context.shared_memory and locality(context).same_node(context, others)
