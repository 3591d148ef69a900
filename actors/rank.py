"""One tensor-parallel rank of one engine. The driver wraps this class with ``ray.remote``
(``orchestrator.cluster``); nothing here imports the driver side.

Lifecycle, each step called on every rank of the engine by the driver:
``store_address`` (rank 0 only) -> ``init_distributed`` -> ``start_reload(first_load=True)``
-> ``load_bucket``* -> ``finish_reload`` -> serve (``forward`` / ``generate`` / ``inspect`` /
``get_tensor``), and for every reload again ``start_reload`` -> ``load_bucket``* ->
``finish_reload`` (or ``abort_reload``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from actors.model import DecoderForCausalLM, KVCache, ModelSpec, TPGroup, build_model
from actors.reload import ReloadEngine
from actors.transport import BucketReader, FileBucket, PackedBucket, PackedEntry, pack_tensors
from quant import QuantConfig
from quant.kv_cache import scales_from_amax


def process_memory() -> dict[str, int]:
    """{'rss_bytes', 'peak_rss_bytes'} of this process (VmRSS, VmHWM)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) * 1024
    return {"rss_bytes": fields["VmRSS"], "peak_rss_bytes": fields["VmHWM"]}


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux clear_refs '5')."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class RankLogger(logging.LoggerAdapter):
    def process(self, msg: str, kwargs: Any) -> tuple[str, Any]:
        return f"{self.extra['prefix']} {msg}", kwargs


class RankActor:
    def __init__(self, *, engine: int, rank: int, world_size: int, spec: ModelSpec, dtype: str,
                 device: str, quant: QuantConfig, timeout_s: float,
                 check_finite: bool = True) -> None:
        self.engine = engine
        self.rank = rank
        self.world_size = world_size
        self.spec = spec
        self.dtype = getattr(torch, dtype)
        self.timeout = timedelta(seconds=timeout_s)
        # Ray gives a cuda rank actor exactly one visible GPU, so its index is always 0.
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self._store: dist.TCPStore | None = None
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        self.log = RankLogger(logging.getLogger("tp_reload.rank"),
                              {"prefix": f"[engine {engine} rank {rank}]"})
        # Built on meta now; every layer is materialized on self.device by the first load.
        self.model: DecoderForCausalLM = build_model(
            spec, tp=TPGroup(rank, world_size), dtype=self.dtype, device=self.device,
            quant=quant)
        self.reloader = ReloadEngine(self.model, self.device, self.log, check_finite)
        self.reloader.stage_hook = self._at_stage
        self.loaded = False
        self._fault: tuple[str, str, str | None] | None = None

    # ---- distributed set-up -------------------------------------------------------------

    def store_address(self) -> tuple[str, int]:
        """Rank 0 only: open the rendezvous store on a free port chosen by the OS."""
        import ray

        host = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(host, 0, self.world_size, is_master=True,
                                    wait_for_workers=False, timeout=self.timeout)
        return host, self._store.port

    def ping(self) -> int:
        return os.getpid()

    def reset_distributed(self) -> None:
        """Leave the engine's process group (after a peer died) so a new one can form."""
        if dist.is_initialized():
            dist.destroy_process_group()
        self._store = None

    def init_distributed(self, host: str, port: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size == 1:
            return
        store = self._store or dist.TCPStore(host, port, self.world_size, is_master=False,
                                             timeout=self.timeout)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=self.rank,
                                world_size=self.world_size, timeout=self.timeout)
        self.log.info("joined %s group of %d via %s:%d", backend, self.world_size, host, port)

    # ---- loading: the first load and every reload go through the same engine ---------

    def start_reload(self, first_load: bool) -> None:
        self.reader = BucketReader()
        self.reload_begin = time.perf_counter()
        self.reloader.start("first" if first_load else "reload")

    def load_bucket(self, bucket: FileBucket | PackedBucket) -> None:
        """Feed one bucket; complete layers are processed before this returns."""
        self._at_stage("transfer")
        fetched = self.reader.fetch_seconds
        items = self.reader.items(bucket)
        self.reloader.add_seconds("transfer", self.reader.fetch_seconds - fetched)
        self.reloader.load(items)
        self.reloader.own_buffers()

    def finish_reload(self) -> dict[str, Any]:
        try:
            stats = self.reloader.finish()
        finally:
            self.reader.close()
        self.loaded = True
        self.log.info("reloaded %d layers (%d kept), %.2f MB read, peak buffered %.2f MB in "
                      "%.2fs", len(stats.layers_reloaded), len(stats.layers_kept),
                      stats.bytes_read / 1e6, stats.peak_buffered_bytes / 1e6,
                      time.perf_counter() - self.reload_begin)
        return asdict(stats)

    def abort_reload(self) -> None:
        self.reloader.abort()
        if hasattr(self, "reader"):
            self.reader.close()

    # ---- fault injection (tests, chaos drills) ------------------------------------------

    def inject_fault(self, stage: str, action: str, signal_path: str | None = None) -> None:
        """At the next ``stage`` of a reload ('transfer', 'process' or 'quantize'): 'raise'
        an error, or 'pause' (touch ``signal_path``, then block) so a drill can kill it there."""
        self._fault = (stage, action, signal_path)

    def _at_stage(self, stage: str) -> None:
        if self._fault is None or self._fault[0] != stage:
            return
        _, action, signal_path = self._fault
        self._fault = None
        if action == "raise":
            raise RuntimeError(f"injected fault in the {stage} stage")
        if signal_path:
            with open(signal_path, "w") as f:
                f.write(str(os.getpid()))
        time.sleep(3600)

    def memory(self) -> dict[str, int]:
        """Resident set size of this rank process and its peak since the last
        ``reset_peak_memory``, from /proc (Linux)."""
        return process_memory()

    def reset_peak_memory(self) -> None:
        reset_peak_rss()

    # ---- serving ------------------------------------------------------------------------

    def _require_model(self) -> DecoderForCausalLM:
        if not self.loaded:
            raise RuntimeError("no weights loaded on this rank yet")
        return self.model

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor) -> torch.Tensor | None:
        """Every rank computes; rank 0 returns float32 CPU logits [B, T, vocab]."""
        model = self._require_model()
        ids = token_ids.to(self.device)
        logits = model(ids, torch.arange(ids.shape[1], device=self.device))
        return logits.float().cpu() if self.rank == 0 else None

    @torch.inference_mode()
    def generate(self, token_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor | None:
        """Greedy decoding with a KV cache; rank 0 returns prompt + new tokens [B, T+N]."""
        model = self._require_model()
        ids = token_ids.to(self.device)
        cache = KVCache.empty(self.spec.num_layers)
        logits = model(ids, torch.arange(ids.shape[1], device=self.device), cache)
        tokens = [ids]
        for step in range(max_new_tokens):
            # Logits are all-gathered, so every rank picks the same token.
            next_ids = logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens.append(next_ids)
            if step + 1 < max_new_tokens:
                position = torch.tensor([ids.shape[1] + step], device=self.device)
                logits = model(next_ids, position, cache)
        out = torch.cat(tokens, dim=1)
        return out.cpu() if self.rank == 0 else None

    def capture_cuda_graph(self, token_ids: torch.Tensor) -> None:
        """CUDA only: capture one forward of this shape. The graph bakes in the kernel
        tensors' addresses, which is why reloads must copy into them in place."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need device='cuda'")
        model = self._require_model()
        ids = token_ids.to(self.device)
        positions = torch.arange(ids.shape[1], device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up outside the graph, as CUDA graph capture requires
                model(ids, positions)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            logits = model(ids, positions)
        self._graph = (graph, logits)

    def replay_cuda_graph(self) -> torch.Tensor | None:
        """Replay the captured forward; rank 0 returns its float32 CPU logits."""
        graph, logits = self._graph
        graph.replay()
        torch.cuda.synchronize(self.device)
        return logits.float().cpu() if self.rank == 0 else None

    @torch.inference_mode()
    def calibrate_kv_scales(self, token_ids: torch.Tensor) -> list[list[float]]:
        """Forward a calibration batch, observe amax(|k|), amax(|v|) per attention layer
        (max over the engine's ranks, so every rank uses the same scales) and write
        scale = amax / 448 into the kernel scale tensors in place. Returns [[k, v], ...]."""
        model = self._require_model()
        layers = [m for m in model.modules()
                  if getattr(getattr(m, "kv_cache_method", None), "has_scales", False)]
        if not layers:
            raise RuntimeError("KV-scale calibration needs kv_cache_dtype='fp8'")
        for layer in layers:
            layer.kv_amax = [torch.zeros((), device=self.device) for _ in range(2)]
        try:
            ids = token_ids.to(self.device)
            model(ids, torch.arange(ids.shape[1], device=self.device))
            amax = torch.stack([torch.stack(layer.kv_amax) for layer in layers])
        finally:
            for layer in layers:
                del layer.kv_amax
        TPGroup(self.rank, self.world_size).all_reduce(amax, op=dist.ReduceOp.MAX)
        scales = scales_from_amax(amax)
        for layer, (k_scale, v_scale) in zip(layers, scales, strict=True):
            layer.k_scale.data.copy_(k_scale)
            layer.v_scale.data.copy_(v_scale)
        return scales.cpu().tolist()

    def kernel_tensors(self) -> dict[str, torch.Tensor]:
        model = self._require_model()
        tensors = dict(model.named_parameters())
        tensors.update(model.named_buffers())
        return tensors

    def inspect(self) -> dict[str, dict[str, Any]]:
        """name -> identity facts of every kernel tensor this rank serves from."""
        return {
            name: {"data_ptr": t.data_ptr(), "shape": tuple(t.shape), "dtype": str(t.dtype),
                   "device": str(t.device)}
            for name, t in self.kernel_tensors().items()
        }

    def get_tensors(self, names: list[str] | None) -> tuple[tuple[PackedEntry, ...], Any]:
        """The named kernel tensors (all of them for None), packed as raw bytes: Ray's own
        tensor serialization does not carry every dtype (float8)."""
        tensors = self.kernel_tensors()
        unknown = sorted(set(names or ()) - set(tensors))
        if unknown:
            raise KeyError(f"rank {self.rank} has no kernel tensor(s) {unknown}")
        return pack_tensors([(n, tensors[n]) for n in (names or tensors)])

    def placement(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(),
                "gpu_ids": ray.get_gpu_ids(), "device": str(self.device)}

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
