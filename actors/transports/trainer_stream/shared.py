"""A trainer on the driver's node writes into the node's shared memory
(``actors.transports.regions``) instead of streaming over a process group: each trainer rank
writes each box it holds once, bucket by bucket in plan order, and every engine rank reads
its windows in place.

What is written: of every tensor of a bucket, each distinct box the trainer ranks hold that
some engine rank reads, once (replicas take turns, so no rank writes the others' share; a
box every engine and every TP rank reads, a norm, is written once, not once per reader).
A rank's read box inside one written box is a view of the region; one that spans several
(an FSDP row shard cut by a TP column slice) is put together from them.

Order: every trainer rank gets one call per bucket (a Ray actor runs its calls in order),
and the engine ranks' message of a bucket carries the refs of that bucket's calls: a rank
reads the bucket once they are done, while the trainer writes the next one. A trainer rank
that fails or dies fails those refs; every engine rank's read of the bucket fails with it,
and the reload rolls back (the region is the driver's, reused next time).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from actors.dtypes import dtype_name
from actors.lazy import Bounds, TensorEntry, box_numel, intersect
from actors.transports.base import Delivery, DeliveryContext, Source, TensorInfo
from actors.transports.regions import Lease, Pieces, SharedBucket, aligned, region_pool
from actors.transports.trainer_stream.trainer import ListedTrainer
from actors.transports.trainer_stream.wire import WritePiece
from orchestrator.plan import Plan

RankBoxes = tuple[dict[str, tuple[Bounds, ...]], ...]


def layout(listed: ListedTrainer, plan: Plan, infos: dict[str, TensorInfo],
           rank_boxes: RankBoxes) -> tuple[list[list[list[WritePiece]]], list[tuple[Pieces, ...]],
                                           int]:
    """Per trainer rank and bucket, the pieces it writes; per bucket and tensor, where its
    boxes are; the bytes of the region. ``rank_boxes``: each TP rank's read boxes (every
    engine reads the same)."""
    writes: list[list[list[WritePiece]]] = [[] for _ in listed.source.actors]
    where: list[tuple[Pieces, ...]] = []
    offset, turn = 0, itertools.count()
    for bucket in plan.buckets:
        for pieces in writes:
            pieces.append([])
        bucket_where = []
        for tensor in bucket.tensors:
            reads = [box for boxes in rank_boxes for box in boxes.get(tensor.name, ())]
            replicas: dict[Bounds, list[int]] = {}
            for rank, box in listed.holders[tensor.name]:
                replicas.setdefault(box, []).append(rank)
            placed = []
            for box, ranks in replicas.items():
                if not any(intersect(box, read) is not None for read in reads):
                    continue  # nobody reads this part
                writer = ranks[next(turn) % len(ranks)]
                writes[writer][-1].append(WritePiece(tensor.name, box, offset))
                placed.append((box, offset))
                offset += aligned(box_numel(box) * infos[tensor.name].torch_dtype.itemsize)
            bucket_where.append(tuple(placed))
        where.append(tuple(bucket_where))
    return writes, where, offset


def deliver_shared(source: Source, plan: Plan, context: DeliveryContext, stream: int
                   ) -> Delivery:
    """Queue every trainer rank's writes and every engine rank's reads, bucket by bucket.
    SharedMemoryUnavailable when the node's shared memory cannot take the source."""
    listed: ListedTrainer = source.handle
    infos = {t.name: t for t in source.tensors}
    writes, where, nbytes = layout(listed, plan, infos, context.routing.rank_boxes)
    lease: Lease = region_pool(context).lease(nbytes, "a trainer source")
    region, last = lease.region.name, len(plan.buckets) - 1
    stream_id = f"{region}/{stream}"
    sending: list[list[object]] = [[] for _ in listed.source.actors]
    steps, replay = [], []
    for index, bucket in enumerate(plan.buckets):
        written = []
        for rank, actor in enumerate(listed.source.actors):
            pieces = writes[rank][index]
            if pieces or index == last:  # the last call also drops the rank's held tensors
                call = actor.tp_reload_write.remote(stream_id, region, pieces, index == last)
                sending[rank].append(call)
                if pieces:
                    written.append(call)
        entries = tuple(TensorEntry(t.name, dtype_name(infos[t.name].torch_dtype),
                                    infos[t.name].shape) for t in bucket.tensors)
        message = SharedBucket(entries, region, where[index], tuple(written), lease)
        steps.append((context.fleet.load_bucket(message), bucket.nbytes))
        replay.append(replace(message, written=()))  # the commit log replays a done write
    return Delivery(iter(steps), replay, carrier="shared_memory",
                    node_bytes=lease.region.nbytes,
                    finish=lambda timeout_s: listed.wait(sending, timeout_s),
                    blame=lambda error, timeout_s: listed.blame(sending, error, timeout_s))
