"""A CUDA trainer whose ranks share GPUs with the engine ranks (colocated, as RL frameworks
run them) hands its pieces over CUDA IPC (``actors.transports.cuda_ipc``) instead of NCCL.

The schedule is the stream's (``schedule``), with one more rule: an engine rank takes each
piece from a trainer rank on its own GPU (replicas there take turns). A trainer whose ranks
on a GPU hold everything that GPU's engine ranks read qualifies: full tensors (gathered, or
replicated as DDP keeps them), or shards that line up. Anything else streams over NCCL.

Each trainer rank gets one call per bucket that shares views of its tensors (no copy), and
every engine rank's message of the bucket carries the refs of those calls: the rank opens
the pieces once they are shared, copies them into read boxes of its own and waits for the
copies, so the trainer's memory is not read after the bucket. The ranks keep those boxes for
replay, as they keep a stream's (a committed version must outlive the trainer's next step).
Once every rank finished, each trainer rank is told to drop what it held; that answer also
proves it lived through the reads (its memory stayed valid), else the reload rolls back.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from actors.lazy import TensorEntry
from actors.transports.base import (
    BucketMessage,
    BucketReader,
    Delivery,
    DeliveryContext,
    Items,
    LinkMessage,
    RankCalls,
    Source,
)
from actors.transports.cuda_ipc import SharedPieces, opened
from actors.transports.regions import locality
from actors.transports.trainer_stream.schedule import NotHeldLocally, RankKey, schedule
from actors.transports.trainer_stream.trainer import ListedTrainer
from actors.transports.trainer_stream.wire import KeptBucket, RecvPiece, read_boxes
from orchestrator.plan import Plan

log = logging.getLogger("tp_reload")


@dataclass(frozen=True, slots=True)
class IpcLink(LinkMessage):
    """Sent before a CUDA IPC stream's buckets: what the rank takes of them is kept under
    ``stream`` once the reload commits."""

    stream: int

    def open(self, reader: BucketReader) -> None:
        received: list[Items] = []
        reader.state["ipc"] = received
        reader.to_keep = (self.stream, received)


@dataclass(frozen=True, slots=True)
class IpcBucket(BucketMessage):
    """One bucket as one engine rank takes it from the trainer ranks on its GPU."""

    entries: tuple[TensorEntry, ...]
    pieces: tuple[RecvPiece, ...]
    slots: tuple[int, ...]
    """Per piece, its place in what its sender shares of this bucket."""
    shared: tuple[Any, ...]
    """Per trainer rank, the ref of its share call for this bucket (None: it shares
    nothing); or, without Ray, the ``SharedPieces`` itself."""

    def read(self, reader: BucketReader) -> Items:
        if "ipc" not in reader.state:
            raise RuntimeError("a CUDA IPC bucket arrived before the rank opened its link")
        items: Items = reader.timed(lambda: take_bucket(self, fetched(self.shared),
                                                        reader.device))
        reader.state["ipc"].append(items)
        return items


def fetched(shared: tuple[Any, ...]) -> list[SharedPieces | None]:
    """Each sender's ``SharedPieces``, waiting for the share calls still running."""
    done = list(shared)
    pending = [i for i, s in enumerate(shared) if s is not None
               and not isinstance(s, SharedPieces)]
    if pending:
        import ray

        for i, value in zip(pending, ray.get([shared[i] for i in pending]), strict=True):
            done[i] = value
    return done


def take_bucket(bucket: IpcBucket, shared: list[SharedPieces | None], device: torch.device,
                open_piece: Callable[[Any, torch.device], torch.Tensor] = opened) -> Items:
    """Copy every piece from its sender's memory into this rank's read boxes and wait for
    the copies (the sender's memory is not read once this returns)."""
    windows, targets = read_boxes(bucket.entries, bucket.pieces, device)
    for piece, slot, target in zip(bucket.pieces, bucket.slots, targets, strict=True):
        sender = shared[piece.src]
        if sender is None:
            raise RuntimeError(f"'{piece.name}': trainer rank {piece.src} shared nothing")
        target.copy_(open_piece(sender.handles[slot], device))
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return windows


def gpu_senders(listed: ListedTrainer, rank_gpus: dict[RankKey, str]
                ) -> dict[RankKey, frozenset[int]]:
    """Per engine rank, the trainer ranks on its GPU."""
    return {key: frozenset(t for t, gpu in enumerate(listed.gpus) if gpu and gpu == mine)
            for key, mine in rank_gpus.items()}


def deliver_ipc(source: Source, plan: Plan, context: DeliveryContext, stream: int
                ) -> Delivery | None:
    """Queue every trainer rank's shares and every engine rank's takes, bucket by bucket;
    None when an engine rank reads a piece no trainer rank on its GPU holds."""
    listed: ListedTrainer = source.handle
    fleet = context.fleet
    placed = locality(context).placed(context)
    senders = gpu_senders(listed, {key: p["gpu_uuid"] for key, p in placed.items()})
    try:
        plan_of = schedule(listed, plan, {t.name: t for t in source.tensors},
                           context.routing.rank_boxes, len(fleet.engines), 0, senders)
    except NotHeldLocally as exc:
        log.info("%s: this trainer source streams over NCCL", exc)
        return None
    keys, actors = fleet.rank_keys(), listed.source.actors
    stream_id = f"cuda-ipc/{uuid.uuid4().hex}"
    steps: list[tuple[RankCalls, int | None]] = [
        (fleet.open_link({key: IpcLink(stream) for key in keys}), None)]
    sending: list[list[Any]] = [[] for _ in actors]
    for index, bucket in enumerate(plan.buckets):
        shared: list[Any] = []
        for rank, actor in enumerate(actors):
            pieces = plan_of.sends[rank][index]
            call = actor.tp_reload_share.remote(stream_id, pieces) if pieces else None
            if call is not None:
                sending[rank].append(call)
            shared.append(call)
        slot = {p.tag: i for sends in plan_of.sends for i, p in enumerate(sends[index])}
        messages = {}
        for key in keys:
            taken = plan_of.receives[key][index]
            messages[key] = IpcBucket(taken.entries, taken.pieces,
                                      tuple(slot[p.tag] for p in taken.pieces), tuple(shared))
        steps.append((fleet.load_bucket_each(messages), bucket.nbytes))
    replay = [KeptBucket(stream, index, plan_of.receives[keys[0]][index].entries)
              for index in range(len(plan.buckets))]

    def release() -> list[list[Any]]:
        return [[actor.tp_reload_release.remote(stream_id)] for actor in actors]

    def finish(timeout_s: float) -> list[int]:
        shared_bytes = listed.wait(sending, timeout_s)
        listed.wait(release(), timeout_s)
        return shared_bytes

    def blame(error: BaseException, timeout_s: float) -> BaseException:
        release()  # the trainer drops its views whatever happened; not waited for
        return listed.blame(sending, error, timeout_s)

    return Delivery(iter(steps), replay, rank_kept=stream, carrier="cuda_ipc",
                    finish=finish, blame=blame)
