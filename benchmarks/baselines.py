"""The floor and the peers tp-reload is measured against.

``RankWork`` is one rank's unavoidable work with bare torch: its model-format tensors and its
kernel tensors are preallocated; a run narrows each source tensor to the rank's slice and
copies it into place (the model's own loaders: one read, one copy), then quantizes each
quantized layer once and copies the result into the preallocated kernel tensors.

* the floors (``benchmarks.floors``): ``RankWork`` alone, with bare torch, in processes of
  their own.
* peer ``dcp``: torch.distributed.checkpoint's ``HuggingFaceStorageReader`` loads the
  checkpoint into a TP-sharded DTensor state dict over gloo (one process per rank), then the
  same fuse, quantization and copy.
* peer ``full``: every rank ``load_file``s the whole checkpoint, then shards, fuses,
  quantizes and copies (what most RL frameworks do before their post-process).
"""

from __future__ import annotations

import os
import queue
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from actors.engines.native import TPGroup, build_model, load_spec
from actors.rank_actor import process_memory, reset_peak_rss
from actors.transports.files import checkpoint_inventory
from quant import QuantConfig


class RankWork:
    def __init__(self, model_dir: Path, tp: int, rank: int, dtype: torch.dtype,
                 quantization: str | None) -> None:
        self.model = build_model(load_spec(model_dir), tp=TPGroup(rank, tp), dtype=dtype,
                                 device=torch.device("cpu"), quant=QuantConfig(quantization))
        for module in self.model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and param.is_meta:
                    real = nn.Parameter(torch.zeros_like(param, device="cpu"), requires_grad=False)
                    real.__dict__.update(param.__dict__)
                    module._parameters[name] = real
        self.quantized = [m for m in self.model.modules()
                          if getattr(m, "quant_method", None) is not None
                          and m.quant_method.policy.converts_weights]
        self.kernel = {id(m): {n: torch.empty_like(t) for n, t in self._quantize(m).items()}
                       for m in self.quantized}

    def _quantize(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Kernel tensors of ``module`` from its model-format scratch (which is kept)."""
        scratch = dict(module._parameters)
        module.quant_method.process_weights_after_loading(module)
        result = dict(module._parameters)
        module._parameters.clear()
        module._parameters.update(scratch)
        return result

    def run(self, weights: Iterable[tuple[str, Any]]) -> dict[str, float]:
        """Seconds spent loading (read + slice + fuse copy) and quantizing (+ kernel copy)."""
        begin = time.perf_counter()
        with torch.no_grad():
            self.model.load_weights(weights)
            loaded = time.perf_counter()
            for module in self.quantized:
                for name, tensor in self._quantize(module).items():
                    self.kernel[id(module)][name].copy_(tensor)
        return {"load": loaded - begin, "quantize": time.perf_counter() - loaded}


# ---- peers, one process per rank -------------------------------------------------------


class ShardView:
    """A rank's DTensor shard presented as the full tensor to the model's loaders, which
    narrow to exactly this rank's region along the shard dim."""

    def __init__(self, local: torch.Tensor, full_shape: tuple[int, ...], dim: int,
                 offset: int) -> None:
        self.local, self.shape, self.dtype = local, torch.Size(full_shape), local.dtype
        self.dim, self.offset = dim, offset

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim != self.dim:
            raise ValueError("ShardView only narrows along its shard dim")
        return self.local.narrow(dim, start - self.offset, length)

    def materialize(self) -> torch.Tensor:
        """The whole tensor: only when this rank's shard is all of it (TP=1)."""
        if self.local.shape != self.shape:
            raise ValueError("a partial shard cannot stand for the whole tensor")
        return self.local


def _placement_dim(name: str, shape: tuple[int, ...], tp: int, kv_heads: int) -> int | None:
    """Shard dim of a checkpoint tensor in the engine's TP layout, None when replicated."""
    if len(shape) == 1 and not any(k in name for k in ("q_proj", "k_proj", "v_proj")):
        return None
    if any(k in name for k in ("k_proj", "v_proj")) and tp > kv_heads:
        return None  # KV heads replicated across ranks
    if name.endswith("weight") and any(k in name for k in ("o_proj", "down_proj")):
        return 1
    return 0


def _dcp_state_dict(model_dir: Path, tp: int, rank: int, kv_heads: int, mesh: Any):
    from torch.distributed.tensor import DTensor, Replicate, Shard

    state, views = {}, {}
    for info in checkpoint_inventory(model_dir):
        dim = _placement_dim(info.name, info.shape, tp, kv_heads)
        if dim is None:
            local = torch.empty(info.shape, dtype=info.torch_dtype)
            state[info.name] = DTensor.from_local(local, mesh, [Replicate()], run_check=False)
            views[info.name] = local
            continue
        sizes = [len(c) for c in torch.arange(info.shape[dim]).chunk(tp)]
        sizes += [0] * (tp - len(sizes))
        local_shape = list(info.shape)
        local_shape[dim] = sizes[rank]
        local = torch.empty(local_shape, dtype=info.torch_dtype)
        stride = torch.empty(info.shape, device="meta").stride()
        state[info.name] = DTensor.from_local(local, mesh, [Shard(dim)], run_check=False,
                                              shape=torch.Size(info.shape), stride=stride)
        views[info.name] = ShardView(local, info.shape, dim, sum(sizes[:rank]))
    return state, views


def _peer_worker(rank: int, tp: int, port: int, kind: str, model_dir: str, dtype: str,
                 quantization: str | None, repeats: int, results: Any) -> None:
    import json

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    path = Path(model_dir)
    work = RankWork(path, tp, rank, getattr(torch, dtype), quantization)
    kv_heads = json.loads((path / "config.json").read_text())["num_key_value_heads"]
    if kind == "dcp":
        state, views = _dcp_state_dict(path, tp, rank, kv_heads, init_device_mesh("cpu", (tp,)))
    files = sorted({i.file for i in checkpoint_inventory(path)})
    for _ in range(repeats):
        dist.barrier()
        reset_peak_rss()
        stamp = time.monotonic()
        begin = time.perf_counter()
        if kind == "dcp":
            dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(model_dir))
            read = time.perf_counter() - begin
            stages = work.run(views.items())
        else:
            full: dict[str, torch.Tensor] = {}
            for file in files:
                full.update(load_file(file))
            read = time.perf_counter() - begin
            stages = work.run(full.items())
            del full
        end = time.monotonic()
        results.put((rank, {"read": read, "fuse": stages["load"],
                            "quantize": stages["quantize"]},
                     process_memory()["peak_rss_bytes"], (stamp, end)))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_peer(kind: str, model_dir: Path, tp: int, dtype: str, quantization: str | None,
             repeats: int) -> tuple[list[float], list[dict[str, float]], int]:
    """Per repetition, the seconds from the first rank's start to the last rank's end (one
    clock, as the floors and ours are timed: the weights are in once every rank has them)
    and the stages of the slowest rank; and the peak RSS of any rank."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_peer_worker, args=(r, tp, port, kind, str(model_dir), dtype,
                                                     quantization, repeats, results))
             for r in range(tp)]
    for proc in procs:
        proc.start()
    rows = []
    while len(rows) < tp * repeats:
        try:
            rows.append(results.get(timeout=5))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for proc in procs:
                    proc.kill()
                raise RuntimeError(f"peer {kind}: a rank process exited with {dead}") from None
    for proc in procs:
        proc.join(timeout=120)
        if proc.exitcode != 0:
            raise RuntimeError(f"peer {kind} rank process exited with {proc.exitcode}")
    by_rank: dict[int, list[tuple[dict[str, float], tuple[float, float]]]] = {}
    for rank, stages, _, stamps in rows:
        by_rank.setdefault(rank, []).append((stages, stamps))
    repetitions = [[by_rank[r][i] for r in by_rank] for i in range(repeats)]
    seconds = [max(end for _, (_, end) in ranks) - min(begin for _, (begin, _) in ranks)
               for ranks in repetitions]
    stages = [max((s for s, _ in ranks), key=lambda s: sum(s.values())) for ranks in repetitions]
    return seconds, stages, max(row[2] for row in rows)


# ---- vLLM's own reload, on the same engines ---------------------------------------------


def _vllm_reload_weights(rank: Any, path: str | None, ref: list[Any] | None) -> None:
    """Runs inside a vLLM rank actor (``__ray_call__``): vLLM's ``reload_weights`` from the
    directory, or from the in-memory dict the driver put once (each rank gets it from the
    object store and hands vLLM an iterator). The prefix cache goes, as after our commit."""
    import ray

    llm = rank.runtime.llm
    if path is not None:
        # Engines are built with load_format="dummy": reading a directory takes vLLM's
        # default (safetensors) loader, the one its own first load would use.
        llm.llm_engine.vllm_config.load_config.load_format = "auto"
        llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
    else:
        weights = ray.get(ref[0])
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items())})
    llm.reset_prefix_cache()


def vllm_reload_seconds(engines: list[Any], model_dir: Path | None,
                        tensors: dict[str, torch.Tensor] | None, timeout_s: float) -> float:
    """Wall seconds of vLLM's native reload on every rank of ``engines`` (the peer of an
    ``engine='vllm'`` orchestrator's reload), the driver's object-store put included."""
    import ray

    begin = time.perf_counter()
    ref = None if tensors is None else [ray.put(tensors)]
    path = None if model_dir is None else str(model_dir)
    # __ray_call__: Ray's documented way to run a function inside an existing actor.
    calls = [actor.__ray_call__.remote(_vllm_reload_weights, path, ref)
             for engine in engines for actor in engine.ranks]
    ray.get(calls, timeout=timeout_s)
    return time.perf_counter() - begin
