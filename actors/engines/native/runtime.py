"""The native engine as a rank runtime: this rank's shard of the model, its gloo/NCCL group,
continuous batching with a KV cache per cohort (``batcher``), FP8 KV-scale calibration and
CUDA graphs."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from actors.engines import EngineOptions
from actors.engines.native.batcher import ContinuousBatcher
from actors.engines.native.layers import Attention
from actors.engines.native.parallel import TPGroup
from actors.engines.native.reloadable import build_reloadable
from actors.engines.native.spec import load_spec
from actors.engines.runtime import (
    CalibratesKvScales,
    CapturesCudaGraphs,
    RankContext,
    RankRuntime,
    Rejoins,
    Request,
    ServesLogits,
    Update,
)
from actors.reload import ReloadableModel
from quant import QuantConfig
from quant.kv_cache import scales_from_amax


class NativeRuntime(RankRuntime, ServesLogits, CalibratesKvScales, CapturesCudaGraphs, Rejoins):
    def __init__(self, options: EngineOptions, context: RankContext) -> None:
        super().__init__(options, context)
        self.spec = load_spec(options.model)
        self.tp = TPGroup(context.rank, context.world_size)
        # Built on meta now; every layer is materialized on self.device by the first load.
        self.model, self._reloadable = build_reloadable(
            self.spec, tp=self.tp, dtype=getattr(torch, options.dtype), device=self.device,
            quant=QuantConfig(options.quantization, options.kv_cache_dtype))
        self._store: dist.TCPStore | None = None
        self.batcher = ContinuousBatcher(self.model, self.spec.num_layers, self.device)

    # ---- group and model ---------------------------------------------------------------

    def rendezvous(self) -> tuple[str, int]:
        """Open the rendezvous store on a free port chosen by the OS."""
        import ray

        host = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(host, 0, self.context.world_size, is_master=True,
                                    wait_for_workers=False, timeout=self._timeout)
        return host, self._store.port

    @property
    def _timeout(self) -> timedelta:
        return timedelta(seconds=self.context.timeout_s)

    def join(self, host: str, port: int, instance: str) -> None:
        # The native engine creates no shared memory: ``instance`` names nothing here.
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.context.world_size == 1:
            return
        store = self._store or dist.TCPStore(host, port, self.context.world_size,
                                             is_master=False, timeout=self._timeout)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=self.context.rank,
                                world_size=self.context.world_size, timeout=self._timeout)
        self.context.log.info("joined %s group of %d via %s:%d", backend,
                              self.context.world_size, host, port)

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        self._store = None
        # A restarted peer holds no batch: the driver submits the running requests again.
        self.batcher = ContinuousBatcher(self.model, self.spec.num_layers, self.device)

    def reloadable(self) -> ReloadableModel:
        return self._reloadable

    # ---- serving -----------------------------------------------------------------------

    def _positions(self, length: int, start: int = 0) -> torch.Tensor:
        return torch.arange(start, start + length, device=self.device)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor) -> torch.Tensor | None:
        """Every rank computes; rank 0 returns float32 CPU logits [B, T, vocab]."""
        ids = token_ids.to(self.device)
        logits = self.model(ids, self._positions(ids.shape[1]))
        return logits.float().cpu() if self.context.rank == 0 else None

    # The batch's calls run on the step loop's thread (``actors.step_loop``).

    def admit(self, request: Request, version: int) -> None:
        self.batcher.admit(request, version)

    def abort(self, request_ids: list[str]) -> None:
        self.batcher.abort(request_ids)

    def has_work(self) -> bool:
        return self.batcher.has_work()

    def running(self) -> list[str]:
        return self.batcher.running()

    def step(self) -> list[Update]:
        return self.batcher.step()

    def recompute(self) -> None:
        self.batcher.recompute()

    def kernel_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.model.named_parameters())
        tensors.update(self.model.named_buffers())
        return tensors

    @torch.inference_mode()
    def calibrate_kv_scales(self, token_ids: torch.Tensor) -> list[list[float]]:
        """Forward a calibration batch, observe amax(|k|), amax(|v|) per attention layer
        (max over the engine's ranks, so every rank uses the same scales) and write
        scale = amax / 448 into the kernel scale tensors in place. Returns [[k, v], ...]."""
        layers = [m for m in self.model.modules()
                  if isinstance(m, Attention) and m.kv_cache_method.has_scales]
        if not layers:
            raise RuntimeError("KV-scale calibration needs kv_cache_dtype='fp8'")
        for layer in layers:
            layer.kv_cache_method.observe(self.device)
        try:
            ids = token_ids.to(self.device)
            self.model(ids, self._positions(ids.shape[1]))
        finally:
            amax = torch.stack([layer.kv_cache_method.observed() for layer in layers])
        self.tp.all_reduce(amax, op=dist.ReduceOp.MAX)
        scales = scales_from_amax(amax)
        for layer, (k_scale, v_scale) in zip(layers, scales, strict=True):
            layer.k_scale.data.copy_(k_scale)
            layer.v_scale.data.copy_(v_scale)
        return scales.cpu().tolist()

    def capture_cuda_graph(self, token_ids: torch.Tensor) -> None:
        """CUDA only: capture one forward of this shape. The graph bakes in the kernel
        tensors' addresses, which is why reloads must copy into them in place."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need device='cuda'")
        ids = token_ids.to(self.device)
        positions = self._positions(ids.shape[1])
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up outside the graph, as CUDA graph capture requires
                self.model(ids, positions)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            logits = self.model(ids, positions)
        self._graph = (graph, logits)

    def replay_cuda_graph(self) -> torch.Tensor | None:
        """Replay the captured forward; rank 0 returns its float32 CPU logits."""
        graph, logits = self._graph
        graph.replay()
        torch.cuda.synchronize(self.device)
        return logits.float().cpu() if self.context.rank == 0 else None
