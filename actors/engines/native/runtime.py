"""The native engine as a rank runtime: this rank's shard of the model, its gloo/NCCL group,
greedy decoding and sampling with a KV cache, FP8 KV-scale calibration and CUDA graphs."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from actors.engines import EngineOptions
from actors.engines.native.layers import Attention, KVCache
from actors.engines.native.parallel import TPGroup
from actors.engines.native.reloadable import build_reloadable
from actors.engines.native.spec import load_spec
from actors.engines.runtime import (
    CalibratesKvScales,
    CapturesCudaGraphs,
    Generated,
    RankContext,
    RankRuntime,
    Rejoins,
    SamplingRequest,
    ServesLogits,
)
from actors.reload import ReloadableModel
from quant import QuantConfig
from quant.kv_cache import scales_from_amax


def choose_tokens(logits: torch.Tensor, request: SamplingRequest,
                  generators: list[torch.Generator]) -> torch.Tensor:
    """[B, vocab] float32 logits -> [B, 1] token ids: argmax when temperature is 0, else
    row b drawn with ``generators[b]`` from its top-k, top-p share of the distribution."""
    if request.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / request.temperature
    if request.top_k:
        kth = logits.topk(min(request.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the most likely tokens until their mass reaches top_p (the first always).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > request.top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0))
    return torch.cat([torch.multinomial(row, 1, generator=g).unsqueeze(0)
                      for row, g in zip(probs, generators, strict=True)])


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

    @torch.inference_mode()
    def sample(self, prompts: list[list[int]], request: SamplingRequest
               ) -> list[Generated] | None:
        """Prompts of one length decode together, as one batch of all their ``n``
        completions, with a KV cache. Logits are all-gathered and every rank draws from the
        same generators, so every rank picks the same tokens and stops at the same step."""
        n = request.n
        done: list[Generated] = [None] * (len(prompts) * n)  # type: ignore[list-item]
        by_length: dict[int, list[int]] = {}
        for index, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(index)
        for indices in by_length.values():
            rows = [(i, j) for i in indices for j in range(n)]
            decoded = self._decode([prompts[i] for i, _ in rows],
                                   [request.seeds[i] + j for i, j in rows], request)
            for (i, j), generated in zip(rows, decoded, strict=True):
                done[i * n + j] = generated
        return done if self.context.rank == 0 else None

    def _decode(self, rows: list[list[int]], seeds: list[int], request: SamplingRequest
                ) -> list[Generated]:
        """Completions of ``rows`` (prompts of one length), row b drawn with ``seeds[b]``."""
        stops, length = set(request.stop_token_ids), len(rows[0])
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        ids = torch.tensor(rows, device=self.device)
        cache = KVCache.empty(self.spec.num_layers)
        logits = self.model(ids, self._positions(length), cache)
        tokens: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        stopped = [False] * len(rows)
        for step in range(request.max_new_tokens):
            last = logits[:, -1].float()
            next_ids = choose_tokens(last, request, generators)
            scores = torch.log_softmax(last, dim=-1).gather(-1, next_ids)
            for row, (token, score) in enumerate(zip(next_ids[:, 0].tolist(),
                                                     scores[:, 0].tolist(), strict=True)):
                if not stopped[row]:
                    tokens[row].append(token)
                    logprobs[row].append(score)
                    stopped[row] = token in stops
            if all(stopped) or step + 1 == request.max_new_tokens:
                break
            logits = self.model(next_ids, self._positions(1, length + step), cache)
        # No prefix cache: every prompt is computed in full.
        return [Generated(tokens[row], logprobs[row] if request.logprobs else [],
                          "stop" if stopped[row] else "length", 0) for row in range(len(rows))]

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
