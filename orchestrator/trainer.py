"""Reloading straight from a trainer made of Ray actors: no driver, no object store.

Trainer side: the trainer's actor class mixes in ``TrainerEndpoint`` and says which tensors it
holds (``tp_reload_weights``: a state dict in checkpoint format, full tensors or DTensors
sharded with ``Shard``/``Replicate`` placements, e.g. FSDP2's). Driver side:
``orch.reload(TrainerSource(actors))`` lists every rank's holdings (names, full shapes,
dtypes and the box each rank holds; no data), plans and validates them like any source, then
schedules the transfer: every engine rank's read boxes of each tensor, cut by the boxes the
trainer ranks hold, one sender per piece (replicas take turns, so no rank funnels the rest).
``actors.stream`` moves the pieces over a process group that spans the trainer's ranks and
every engine rank, in plan order, bucket by bucket.

All or nothing: a trainer rank that dies or fails mid-stream makes its peers' sends and
receives fail at once; the reload is rolled back like any other and the error names the
trainer rank. A stream cannot be replayed from the trainer later, so every engine rank keeps
the boxes it received of each committed stream while the commit log needs them (its share of
the source, about what the object store keeps of an in-memory source).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors.dtypes import SAFETENSORS_CODES, dtype_name
from actors.lazy import Bounds, TensorEntry
from actors.reload import Routing
from actors.reload.routes import covers
from actors.stream import (
    KeptBucket,
    LinkAddress,
    RecvPiece,
    SendPiece,
    StreamBucket,
    intersect,
    join,
    send_buckets,
)
from orchestrator.errors import CheckpointError, TrainerError
from orchestrator.inventory import Source, TensorInfo
from orchestrator.plan import Plan

RankKey = tuple[int, int]


@dataclass(frozen=True, slots=True)
class HeldTensor:
    """What one trainer rank holds of one tensor."""

    name: str
    shape: tuple[int, ...]
    """The full (unsharded) tensor's shape."""
    dtype: str
    """torch dtype name, e.g. ``bfloat16``."""
    box: Bounds
    """The part of the full tensor this rank holds, per dim [start, stop)."""
    device: str
    """``cpu`` or ``cuda``."""


def held_tensor(name: str, tensor: torch.Tensor) -> tuple[HeldTensor, torch.Tensor]:
    """The full shape and the box a rank holds of ``tensor``, and its local data. A DTensor
    is cut by its ``Shard`` placements with ``torch.chunk``'s rule (as FSDP2 and DTensor
    shard); ``Replicate`` holds the whole dim; anything else is refused by name."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(tensor, DTensor):
        local = tensor.detach()
        box = tuple((0, n) for n in local.shape)
    else:
        local = tensor.to_local().detach()
        bounds = [[0, n] for n in tensor.shape]
        coordinate = tensor.device_mesh.get_coordinate()
        for mesh_dim, placement in enumerate(tensor.placements):
            if isinstance(placement, Replicate):
                continue
            if not isinstance(placement, Shard) or coordinate is None:
                raise ValueError(f"trainer tensor '{name}': placement {placement} is not "
                                 "supported (Shard or Replicate)")
            dim = placement.dim % tensor.ndim
            lo, hi = bounds[dim]
            step = -(-(hi - lo) // tensor.device_mesh.size(mesh_dim))
            start = min(hi, lo + coordinate[mesh_dim] * step)
            bounds[dim] = [start, min(hi, start + step)]
        box = tuple((lo, hi) for lo, hi in bounds)
        if tuple(hi - lo for lo, hi in box) != tuple(local.shape):
            raise ValueError(f"trainer tensor '{name}': local shard {tuple(local.shape)} is "
                             f"not the chunk {box} of {tuple(tensor.shape)} its placements "
                             f"{tensor.placements} give (uneven sharding is not supported)")
    info = HeldTensor(name, tuple(tensor.shape), dtype_name(tensor.dtype), box,
                      local.device.type)
    return info, local


class TrainerEndpoint:
    """Mix into a trainer's Ray actor class to reload engines from it directly:
    ``orch.reload(TrainerSource([actor, ...]))``. Implement ``tp_reload_weights``."""

    def tp_reload_weights(self) -> Mapping[str, torch.Tensor]:
        """The weights to send, in checkpoint format (``model.layers.0.mlp.up_proj.weight``):
        full tensors, or this rank's DTensor shards (e.g. an FSDP2 model's ``state_dict()``).
        Called once to list and once to send; both calls must give the same tensors."""
        raise NotImplementedError("a TrainerEndpoint implements tp_reload_weights()")

    def tp_reload_manifest(self) -> list[HeldTensor]:
        return [held_tensor(n, t)[0] for n, t in self.tp_reload_weights().items()]

    def tp_reload_send(self, address: LinkAddress, rank: int,
                       buckets: list[list[SendPiece]]) -> int:
        """Join the reload's group and send this rank's pieces; returns the bytes sent."""
        held = {}
        for name, tensor in self.tp_reload_weights().items():
            info, local = held_tensor(name, tensor)
            if address.backend == "gloo" and local.device.type != "cpu":
                local = local.cpu()  # gloo moves host memory
            held[name] = (local, info.box)
        group = join(address, rank)
        try:
            return send_buckets(group, held, buckets)
        finally:
            del group


class TrainerSource:
    """A reload source: the Ray actors of a trainer (each a ``TrainerEndpoint``), one per
    trainer rank, in rank order."""

    def __init__(self, actors: Any) -> None:
        self.actors = tuple(actors)


@dataclass
class ListedTrainer:
    """A trainer source after listing: who holds which box of every tensor."""

    source: TrainerSource
    holders: dict[str, list[tuple[int, Bounds]]]
    """Tensor -> (trainer rank, box held), in rank order."""
    on_cuda: bool
    sending: list[Any] | None = None
    """This reload's ``tp_reload_send`` calls, one per trainer rank."""

    def wait(self, timeout_s: float) -> list[int]:
        """Bytes each trainer rank sent; TrainerError naming the rank that failed."""
        sent = []
        for rank, call in enumerate(self.sending or ()):
            try:
                sent.append(ray.get(call, timeout=timeout_s))
            except Exception as exc:  # noqa: BLE001 - any failure of a trainer rank
                raise TrainerError(rank, _error_text(exc),
                                   died=isinstance(exc, ray.exceptions.RayActorError)) from exc
        return sent

    def blame(self, error: BaseException, timeout_s: float) -> BaseException:
        """What a failed stream reports: a trainer rank that died, or that failed while no
        engine rank died (engine ranks receive every piece even after failing, so a trainer
        fails only by itself or because an engine rank died); else the engines' error."""
        try:
            self.wait(timeout_s)
        except TrainerError as failure:
            if failure.died or not isinstance(error.__cause__ or error,
                                              ray.exceptions.RayActorError):
                return failure
        return error


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ray.exceptions.RayActorError):
        return f"the trainer actor died mid-stream ({type(exc).__name__})"
    return str(exc)


def list_trainer(source: TrainerSource, timeout_s: float) -> Source:
    """Every trainer rank's holdings as a plannable ``Source``; CheckpointError names a
    tensor the ranks disagree on, leave partly unheld, or hold overlapping parts of."""
    if not source.actors:
        raise CheckpointError("trainer source: no trainer actors given")
    manifests = []
    for rank, actor in enumerate(source.actors):
        try:
            manifests.append(ray.get(actor.tp_reload_manifest.remote(), timeout=timeout_s))
        except Exception as exc:  # noqa: BLE001 - a trainer that cannot list is refused
            raise TrainerError(rank, _error_text(exc)) from exc
    first: dict[str, HeldTensor] = {}
    holders: dict[str, list[tuple[int, Bounds]]] = {}
    for rank, manifest in enumerate(manifests):
        for held in manifest:
            known = first.setdefault(held.name, held)
            if (known.shape, known.dtype) != (held.shape, held.dtype):
                raise CheckpointError(
                    f"trainer tensor '{held.name}': rank {rank} holds {held.shape} "
                    f"{held.dtype}, an earlier rank {known.shape} {known.dtype}")
            holders.setdefault(held.name, []).append((rank, held.box))
    infos = []
    for name, held in first.items():
        _check_holdings(name, held.shape, holders[name])
        dtype = getattr(torch, held.dtype)
        if dtype not in SAFETENSORS_CODES:
            raise CheckpointError(f"trainer tensor '{name}' has unsupported dtype {dtype}")
        numel = 1
        for n in held.shape:
            numel *= n
        infos.append(TensorInfo(name, held.shape, SAFETENSORS_CODES[dtype],
                                numel * dtype.itemsize, None))
    on_cuda = all(h.device == "cuda" for m in manifests for h in m)
    listed = ListedTrainer(source, holders, on_cuda)
    return Source("trainer", tuple(infos),
                  f"trainer of {len(source.actors)} rank(s), {len(infos)} tensors",
                  stream=listed)


def _check_holdings(name: str, shape: tuple[int, ...], held: list[tuple[int, Bounds]]) -> None:
    """Distinct boxes must not overlap (replicas hold equal boxes) and must cover the tensor."""
    boxes = list(dict.fromkeys(box for _, box in held))
    for a, b in itertools.combinations(boxes, 2):
        if intersect(a, b) is not None:
            raise CheckpointError(f"trainer tensor '{name}': ranks hold overlapping parts "
                                  f"{a} and {b}")
    if not covers(shape, boxes):
        raise CheckpointError(f"trainer tensor '{name}' {shape}: the trainer ranks together "
                              f"hold only {boxes}")


@dataclass(frozen=True, slots=True)
class Schedule:
    sends: list[list[list[SendPiece]]]
    """Per trainer rank, per bucket: its pieces in global order."""
    receives: dict[RankKey, list[StreamBucket]]
    """Per engine rank, per bucket."""


def schedule(listed: ListedTrainer, plan: Plan, infos: dict[str, TensorInfo],
             rank_boxes: tuple[dict[str, tuple[Bounds, ...]], ...], engines: int,
             first_link_rank: int) -> Schedule:
    """Cut every engine rank's read boxes by the trainer ranks' holdings, bucket by bucket.
    Engine rank (e, r) is link rank ``first_link_rank + e * tp + r``; trainer rank t is t."""
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
                choice = next(turn)
                for held_box, ranks in replicas.items():
                    piece = intersect(read_box, held_box)
                    if piece is None:
                        continue
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


def launch(listed: ListedTrainer, plan: Plan, source: Source, routing: Routing,
           engines: list[Any], address: LinkAddress, stream: int
           ) -> tuple[list[tuple[dict[RankKey, Any], int]], list[KeptBucket]]:
    """Queue the stream on every engine rank (join, then one call per bucket) and every
    trainer rank (one call that sends all its pieces). Returns the engine calls per step with
    their bytes, and the messages that replay the stream from what the ranks keep."""
    infos = {t.name: t for t in source.tensors}
    trainers = len(listed.source.actors)
    tp = len(engines[0].ranks)
    plan_of = schedule(listed, plan, infos, routing.rank_boxes, len(engines), trainers)
    link_rank = {(e.index, r): trainers + e.index * tp + r
                 for e in engines for r in range(len(e.ranks))}
    joins = {key: engines[key[0]].ranks[key[1]].join_stream.remote(address, rank, stream)
             for key, rank in link_rank.items()}
    listed.sending = [actor.tp_reload_send.remote(address, t, plan_of.sends[t])
                      for t, actor in enumerate(listed.source.actors)]
    steps = [(joins, 0)]
    for index, bucket in enumerate(plan.buckets):
        steps.append(({key: engines[key[0]].ranks[key[1]].load_bucket.remote(
            plan_of.receives[key][index]) for key in link_rank}, bucket.nbytes))
    replay = [KeptBucket(stream, index, plan_of.receives[(0, 0)][index].entries)
              for index in range(len(plan.buckets))]
    return steps, replay
