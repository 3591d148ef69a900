"""The transfer schedule of a trainer stream: for every bucket in plan order, each engine
rank's read boxes of each tensor (from the routing's dry run) cut by the boxes the trainer
ranks hold. Every piece has one sender (replicas take turns, so no rank funnels the rest) and
one receiver, and a global sequence number, which is also its tag."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from actors.dtypes import dtype_name
from actors.lazy import Bounds, TensorEntry, intersect
from actors.transports.base import TensorInfo
from actors.transports.trainer_stream.trainer import ListedTrainer
from actors.transports.trainer_stream.wire import RecvPiece, SendPiece, StreamBucket
from orchestrator.plan import Plan

RankKey = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Schedule:
    sends: list[list[list[SendPiece]]]
    """Per trainer rank, per bucket: its pieces in global order."""
    receives: dict[RankKey, list[StreamBucket]]
    """Per engine rank, per bucket."""


class NotHeldLocally(LookupError):
    """An engine rank reads a piece that no trainer rank it may take pieces from holds."""


def schedule(listed: ListedTrainer, plan: Plan, infos: dict[str, TensorInfo],
             rank_boxes: tuple[dict[str, tuple[Bounds, ...]], ...], engines: int,
             first_link_rank: int, senders: dict[RankKey, frozenset[int]] | None = None
             ) -> Schedule:
    """Cut every engine rank's read boxes by the trainer ranks' holdings, bucket by bucket.
    Engine rank (e, r) is link rank ``first_link_rank + e * tp + r``; trainer rank t is t.
    ``senders``: per engine rank, the only trainer ranks it may take pieces from (those on
    its GPU, for CUDA IPC); NotHeldLocally names a piece none of them holds."""
    tp = len(rank_boxes)
    sends: list[list[list[SendPiece]]] = [[] for _ in listed.source.actors]
    receives: dict[RankKey, list[StreamBucket]] = {
        (e, r): [] for e in range(engines) for r in range(tp)}
    tags = itertools.count()
    turn = itertools.count()
    for bucket in plan.buckets:
        for pieces in sends:
            pieces.append([])
        entries = tuple(TensorEntry(t.name, dtype_name(infos[t.name].torch_dtype),
                                    infos[t.name].shape) for t in bucket.tensors)
        incoming: dict[RankKey, list[RecvPiece]] = {key: [] for key in receives}
        for tensor in bucket.tensors:
            replicas: dict[Bounds, list[int]] = {}
            for rank, box in listed.holders[tensor.name]:
                replicas.setdefault(box, []).append(rank)
            for (engine, rank), read_box in _reads(tensor.name, rank_boxes, engines):
                dst = first_link_rank + engine * tp + rank
                allowed = None if senders is None else senders[(engine, rank)]
                choice = next(turn)
                for held_box, ranks in replicas.items():
                    piece = intersect(read_box, held_box)
                    if piece is None:
                        continue
                    if allowed is not None:
                        ranks = [r for r in ranks if r in allowed]
                        if not ranks:
                            raise NotHeldLocally(
                                f"engine {engine} rank {rank} reads {piece} of "
                                f"'{tensor.name}', which no trainer rank on its GPU holds")
                    src, tag = ranks[choice % len(ranks)], next(tags)
                    sends[src][-1].append(SendPiece(tensor.name, piece, dst, tag))
                    incoming[(engine, rank)].append(
                        RecvPiece(tensor.name, read_box, piece, src, tag))
        for key, pieces in incoming.items():
            receives[key].append(StreamBucket(entries, tuple(pieces)))
    return Schedule(sends, receives)


def _reads(name: str, rank_boxes: tuple[dict[str, tuple[Bounds, ...]], ...], engines: int
           ) -> list[tuple[RankKey, Bounds]]:
    return [((engine, rank), box) for engine in range(engines)
            for rank, boxes in enumerate(rank_boxes) for box in boxes.get(name, ())]
