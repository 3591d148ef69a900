"""Trainer-to-engine streaming: a process group that spans a trainer's ranks and every engine
rank, formed for one reload, carrying exactly the boxes each engine rank reads.

The driver computes the schedule (``schedule``): for every bucket in plan order,
each engine rank's read boxes of each tensor (from the routing's dry run) cut by the boxes the
trainer ranks hold. Every piece has one sender (a trainer rank that holds it) and one receiver,
and a global sequence number that both sides walk in the same order, which is also the tag:
gloo matches pieces by (peer, tag), NCCL by issue order, and walking one global order means the
lowest unfinished piece can always proceed, so no pair of ranks waits on each other.

Nothing goes through the driver or the object store. The sender cuts each piece from its own
tensor (a view when contiguous); the receiver gets each read box once, in memory of its own,
and hands the reload engine a ``BoxesWindow`` that serves those boxes.

The group is a stateless ``ProcessGroupGloo`` (``ProcessGroupNCCL`` when every member is on
CUDA) built from a ``PrefixStore`` over the driver's ``TCPStore``: it lives beside each
process's own default group (an engine's TP group, a trainer's FSDP group) and is dropped
after the reload. Its timeout bounds every wait; a member that dies is seen by its peers as a
failed send or receive within milliseconds (a closed connection), never as a hang.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from actors.dtypes import as_bytes
from actors.lazy import Bounds, BoxesWindow, TensorEntry, box_shape, cut
from actors.transports.base import BucketMessage, BucketReader, Items, LinkMessage

BUCKETS_IN_FLIGHT = 2
"""A sender posts the next bucket while the previous one drains; it holds at most this many
buckets' cut pieces."""


@dataclass(frozen=True, slots=True)
class LinkAddress:
    host: str
    port: int
    prefix: str
    """Unique per reload: each reload forms a group of its own on the same store."""
    world: int
    backend: str
    """``gloo`` or ``nccl``."""
    timeout_s: float


@dataclass(frozen=True, slots=True)
class SendPiece:
    name: str
    box: Bounds
    """Source coordinates of the piece (inside the sender's held box)."""
    dst: int
    tag: int


@dataclass(frozen=True, slots=True)
class WritePiece:
    """A box a trainer rank writes into a region of the node's shared memory."""

    name: str
    box: Bounds
    """Source coordinates of the piece (inside the writer's held box)."""
    offset: int
    """In the region."""


@dataclass(frozen=True, slots=True)
class RecvPiece:
    name: str
    read_box: Bounds
    """The receiver's read box the piece belongs to."""
    box: Bounds
    src: int
    tag: int


@dataclass(frozen=True, slots=True)
class StreamLink(LinkMessage):
    """Join this reload's group as link rank ``link_rank``; StreamBuckets follow."""

    address: LinkAddress
    link_rank: int
    stream: int
    """Id of the stream: what the rank keeps of it once committed is kept under it."""

    def open(self, reader: BucketReader) -> None:
        device = reader.device if self.address.backend == "nccl" else torch.device("cpu")
        received: list[Items] = []
        reader.state["stream"] = (join(self.address, self.link_rank), device, received)
        reader.to_keep = (self.stream, received)


@dataclass(frozen=True, slots=True)
class StreamBucket(BucketMessage):
    """One bucket as one engine rank receives it."""

    entries: tuple[TensorEntry, ...]
    pieces: tuple[RecvPiece, ...]
    """In global order."""
    must_read: ClassVar[bool] = True  # the trainer's sends complete only when received

    def read(self, reader: BucketReader) -> Items:
        if "stream" not in reader.state:
            raise RuntimeError("a stream bucket arrived before the rank joined the stream")
        group, device, received = reader.state["stream"]
        items: Items = reader.timed(lambda: receive_bucket(group, self, device))
        received.append(items)
        return items


@dataclass(frozen=True, slots=True)
class KeptBucket(BucketMessage):
    """Replay of a committed stream's bucket from what each engine rank kept of it."""

    stream: int
    index: int
    entries: tuple[TensorEntry, ...]

    def read(self, reader: BucketReader) -> Items:
        if self.stream not in reader.kept:
            raise RuntimeError(
                f"this rank no longer holds trainer stream {self.stream} (it was restarted): "
                "a committed version that came from a trainer cannot be rebuilt; reload from "
                "the trainer or a checkpoint")
        return reader.kept[self.stream][self.index]


def join(address: LinkAddress, rank: int) -> dist.ProcessGroup:
    """This process's member of the reload's group (blocks until every member joined)."""
    timeout = datetime.timedelta(seconds=address.timeout_s)
    store = dist.PrefixStore(address.prefix, dist.TCPStore(
        address.host, address.port, is_master=False, timeout=timeout))
    if address.backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, address.world, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(store, rank, address.world, timeout)


# ---- the sender (a trainer rank) -------------------------------------------------------------

def send_buckets(group: dist.ProcessGroup, held: dict[str, tuple[torch.Tensor, Bounds]],
                 buckets: list[list[SendPiece]]) -> int:
    """Send every piece, bucket by bucket, at most BUCKETS_IN_FLIGHT buckets posted at once.
    ``held``: name -> (the local tensor, the box of the full tensor it holds). Returns the
    bytes sent."""
    pending: list[list[tuple[Any, torch.Tensor]]] = []
    sent = 0
    for pieces in buckets:
        posted = []
        for piece in pieces:
            local, inside = held[piece.name]
            # A view when the box is contiguous in the local tensor, else the sender's one cut.
            data = local[cut(piece.box, inside)].contiguous()
            posted.append((group.send([as_bytes(data)], piece.dst, piece.tag), data))
            sent += data.numel() * data.element_size()
        pending.append(posted)
        if len(pending) >= BUCKETS_IN_FLIGHT:
            _wait(pending.pop(0))
    for posted in pending:
        _wait(posted)
    return sent


def _wait(posted: list[tuple[Any, torch.Tensor]]) -> None:
    for work, _ in posted:
        work.wait()


# ---- the receiver (an engine rank) -----------------------------------------------------------

def receive_bucket(group: dist.ProcessGroup, bucket: StreamBucket, device: torch.device
                   ) -> list[tuple[str, BoxesWindow]]:
    """Post every receive of the bucket, wait for all, and return its tensors as windows."""
    windows, targets = read_boxes(bucket.entries, bucket.pieces, device)
    posted, scattered = [], []
    for piece, target in zip(bucket.pieces, targets, strict=True):
        if not target.is_contiguous():
            # A piece that is not one run of the read box (a column slab of rows): received
            # whole, then put in place.
            staged = torch.empty(box_shape(piece.box), dtype=target.dtype, device=device)
            scattered.append((target, staged))
            target = staged
        posted.append(group.recv([as_bytes(target)], piece.src, piece.tag))
    for work in posted:
        work.wait()
    for target, staged in scattered:
        target.copy_(staged)
    return windows


def read_boxes(entries: tuple[TensorEntry, ...], pieces: tuple[RecvPiece, ...],
               device: torch.device) -> tuple[list[tuple[str, BoxesWindow]], list[torch.Tensor]]:
    """A receiver's bucket in memory of its own: each read box allocated once on ``device``,
    served as windows, and where each piece goes in them (a view, in piece order)."""
    dtypes = {e.name: getattr(torch, e.dtype) for e in entries}
    boxes: dict[str, dict[Bounds, torch.Tensor]] = {e.name: {} for e in entries}
    targets = []
    for piece in pieces:
        held = boxes[piece.name]
        if piece.read_box not in held:
            held[piece.read_box] = torch.empty(box_shape(piece.read_box),
                                               dtype=dtypes[piece.name], device=device)
        targets.append(held[piece.read_box][cut(piece.box, piece.read_box)])
    return [(e.name, BoxesWindow(e, boxes[e.name])) for e in entries], targets
