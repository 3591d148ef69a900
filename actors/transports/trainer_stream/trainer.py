"""The trainer's side of a trainer stream (``TrainerEndpoint``, mixed into its Ray actors),
the source that names them (``TrainerSource``) and the driver's listing of what every trainer
rank holds. Ray is imported where it is used: the rank-side code runs without it (the GPU
tests' machine has none)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from actors.dtypes import SAFETENSORS_CODES, dtype_name
from actors.lazy import Bounds, cut, intersect
from actors.reload.routes import covers
from actors.transports.base import Source, TensorInfo, Transport
from actors.transports.cuda_ipc import SharedPieces, gpu_uuid, share
from actors.transports.regions import mapped, write_at
from actors.transports.trainer_stream.wire import (
    LinkAddress,
    SendPiece,
    WritePiece,
    join,
    send_buckets,
)
from orchestrator.errors import CheckpointError, TrainerError


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
    ``orch.reload(TrainerSource([actor, ...]))``. Implement ``tp_reload_weights``. The
    actor runs its calls in order (a plain, not threaded or async, actor)."""

    def tp_reload_weights(self) -> Mapping[str, torch.Tensor]:
        """The weights to send, in checkpoint format (``model.layers.0.mlp.up_proj.weight``):
        full tensors, or this rank's DTensor shards (e.g. an FSDP2 model's ``state_dict()``).
        Called once to list and once per reload to send; both calls must give the same
        tensors."""
        raise NotImplementedError("a TrainerEndpoint implements tp_reload_weights()")

    def tp_reload_manifest(self) -> tuple[str, str, list[HeldTensor]]:
        """This rank's node id, its GPU's UUID ('' unless all it holds is on one GPU) and
        what it holds."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        held = [held_tensor(n, t) for n, t in self.tp_reload_weights().items()]
        devices = {local.device for _, local in held}
        return node, gpu_uuid(devices.pop()) if len(devices) == 1 else "", \
            [info for info, _ in held]

    def tp_reload_send(self, address: LinkAddress, rank: int,
                       buckets: list[list[SendPiece]]) -> int:
        """Join the reload's group and send this rank's pieces; returns the bytes sent."""
        held = _held(self, on_cpu=address.backend == "gloo")  # gloo moves host memory
        group = join(address, rank)
        try:
            return send_buckets(group, held, buckets)
        finally:
            del group

    def tp_reload_write(self, stream: str, region: str, pieces: list[WritePiece],
                        last: bool) -> int:
        """Write this rank's ``pieces`` of one bucket into ``region`` of the node's shared
        memory (one call per bucket of stream ``stream``, the ``last`` one last); returns
        the bytes written."""
        held = _stream_held(self, stream)
        if last:
            _streaming.clear()
        buffer = mapped(region, writable=True)
        written = 0
        for piece in pieces:
            local, inside = held[piece.name]
            written += write_at(buffer, piece.offset, local[cut(piece.box, inside)])
        return written

    def tp_reload_share(self, stream: str, pieces: list[SendPiece]) -> SharedPieces:
        """CUDA IPC handles of this rank's ``pieces`` of one bucket of stream ``stream``
        (views of its tensors: no copy), for engine ranks on its GPU. Its tensors stay held
        until ``tp_reload_release``."""
        held = _stream_held(self, stream)
        return share([held[p.name][0][cut(p.box, held[p.name][1])] for p in pieces])

    def tp_reload_release(self, stream: str) -> None:
        """Every engine rank is done with stream ``stream``: drop what it held (an answer
        also tells the driver this process lived through their reads)."""
        if _streaming.get("stream") == stream:
            _streaming.clear()


_streaming: dict[str, Any] = {}
"""A trainer process's stream being written into shared memory or shared over CUDA IPC:
its id and its held tensors, so ``tp_reload_weights`` is asked once per reload, not once
per bucket."""


def _stream_held(endpoint: TrainerEndpoint, stream: str
                 ) -> dict[str, tuple[torch.Tensor, Bounds]]:
    if _streaming.get("stream") != stream:
        _streaming.clear()
        _streaming.update(stream=stream, held=_held(endpoint, on_cpu=False))
    return _streaming["held"]


def _held(endpoint: TrainerEndpoint, on_cpu: bool) -> dict[str, tuple[torch.Tensor, Bounds]]:
    """name -> (the local tensor, the box of the full tensor it holds)."""
    held = {}
    for name, tensor in endpoint.tp_reload_weights().items():
        info, local = held_tensor(name, tensor)
        held[name] = (local.cpu() if on_cpu else local, info.box)
    return held


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
    nodes: tuple[str, ...] = ()
    """Each trainer rank's Ray node id."""
    gpus: tuple[str, ...] = ()
    """Each trainer rank's GPU UUID ('' when its tensors are not all on one GPU)."""

    def wait(self, sending: list[list[Any]], timeout_s: float) -> list[int]:
        """Bytes each trainer rank sent (``sending``: this reload's calls of each trainer
        rank); TrainerError naming the rank that failed."""
        import ray

        sent = []
        for rank, calls in enumerate(sending):
            try:
                sent.append(sum(_nbytes(done) for done in ray.get(calls, timeout=timeout_s)))
            except Exception as exc:  # noqa: BLE001 - any failure of a trainer rank
                raise TrainerError(rank, _error_text(exc),
                                   died=isinstance(exc, ray.exceptions.RayActorError)) from exc
        return sent

    def blame(self, sending: list[list[Any]], error: BaseException, timeout_s: float
              ) -> BaseException:
        """What a failed stream reports: a trainer rank that died, or that failed while no
        engine rank died (engine ranks receive every piece even after failing, so a trainer
        fails only by itself or because an engine rank died); else the engines' error."""
        import ray

        try:
            self.wait(sending, timeout_s)
        except TrainerError as failure:
            if failure.died or not isinstance(error.__cause__ or error,
                                              ray.exceptions.RayActorError):
                return failure
        return error


def _nbytes(answer: int | SharedPieces | None) -> int:
    """Bytes a trainer call moved (sent, written, or shared over CUDA IPC)."""
    return answer if isinstance(answer, int) else getattr(answer, "nbytes", 0)


def _error_text(exc: BaseException) -> str:
    import ray

    if isinstance(exc, ray.exceptions.RayActorError):
        return f"the trainer actor died mid-stream ({type(exc).__name__})"
    return str(exc)


def list_trainer(transport: Transport, source: TrainerSource, timeout_s: float) -> Source:
    """Every trainer rank's holdings as a plannable ``Source``; CheckpointError names a
    tensor the ranks disagree on, leave partly unheld, or hold overlapping parts of."""
    if not source.actors:
        raise CheckpointError("trainer source: no trainer actors given")
    import ray

    listing = [actor.tp_reload_manifest.remote() for actor in source.actors]
    nodes, gpus, manifests = [], [], []
    for rank, call in enumerate(listing):
        try:
            node, gpu, manifest = ray.get(call, timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - a trainer that cannot list is refused
            raise TrainerError(rank, _error_text(exc)) from exc
        nodes.append(node)
        gpus.append(gpu)
        manifests.append(manifest)
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
    listed = ListedTrainer(source, holders, on_cuda, tuple(nodes), tuple(gpus))
    return Source(transport, tuple(infos),
                  f"trainer of {len(source.actors)} rank(s), {len(infos)} tensors", listed)


def _check_holdings(name: str, shape: tuple[int, ...], held: list[tuple[int, Bounds]]) -> None:
    """Distinct boxes must not overlap (replicas hold equal boxes) and must cover the tensor."""
    boxes = list(dict.fromkeys(box for _, box in held))
    if len(boxes) == 1 and boxes[0] == tuple((0, n) for n in shape):
        return  # held whole (by one rank, or replicated): the common case, checked at once
    for a, b in itertools.combinations(boxes, 2):
        if intersect(a, b) is not None:
            raise CheckpointError(f"trainer tensor '{name}': ranks hold overlapping parts "
                                  f"{a} and {b}")
    if not covers(shape, boxes):
        raise CheckpointError(f"trainer tensor '{name}' {shape}: the trainer ranks together "
                              f"hold only {boxes}")
