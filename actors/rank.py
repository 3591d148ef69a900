"""One tensor-parallel rank of one engine. The driver wraps this class with ``ray.remote``
(``orchestrator.cluster``); nothing here imports the driver side.

Lifecycle, each step called on every rank of the engine by the driver:
``store_address`` (rank 0 only) -> ``init_distributed`` -> ``load_checkpoint`` -> serve
(``forward`` / ``generate`` / ``inspect`` / ``get_tensor``).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from actors.checkpoint import ReadCounter, iter_checkpoint_slices
from actors.model import (
    DecoderForCausalLM,
    KVCache,
    ModelSpec,
    TPGroup,
    build_model,
    process_weights_after_loading,
)


@dataclass(frozen=True, slots=True)
class LoadStats:
    """What one rank did during a load; returned to the driver as a dict."""

    rank: int
    bytes_read: int
    tensors_read: int
    seconds: float


class RankLogger(logging.LoggerAdapter):
    def process(self, msg: str, kwargs: Any) -> tuple[str, Any]:
        return f"{self.extra['prefix']} {msg}", kwargs


class RankActor:
    def __init__(self, *, engine: int, rank: int, world_size: int, spec: ModelSpec, dtype: str,
                 device: str, quantization: str | None, timeout_s: float) -> None:
        self.engine = engine
        self.rank = rank
        self.world_size = world_size
        self.spec = spec
        self.dtype = getattr(torch, dtype)
        self.quantization = quantization
        self.timeout = timedelta(seconds=timeout_s)
        # Ray gives a cuda rank actor exactly one visible GPU, so its index is always 0.
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.model: DecoderForCausalLM | None = None
        self._store: dist.TCPStore | None = None
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        self.log = RankLogger(logging.getLogger("tp_reload.rank"),
                              {"prefix": f"[engine {engine} rank {rank}]"})

    # ---- distributed set-up -------------------------------------------------------------

    def store_address(self) -> tuple[str, int]:
        """Rank 0 only: open the rendezvous store on a free port chosen by the OS."""
        import ray

        host = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(host, 0, self.world_size, is_master=True,
                                    wait_for_workers=False, timeout=self.timeout)
        return host, self._store.port

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

    # ---- loading ------------------------------------------------------------------------

    def load_checkpoint(self, files: dict[str, list[str]]) -> dict[str, Any]:
        """Build this rank's shard and fill it from the checkpoint, reading only its slices."""
        start = time.perf_counter()
        model = build_model(self.spec, tp=TPGroup(self.rank, self.world_size), dtype=self.dtype,
                            device=self.device, quantization=self.quantization)
        counter = ReadCounter()
        with ExitStack() as stack, torch.no_grad():
            written = model.load_weights(iter_checkpoint_slices(files, counter, stack))
        missing = model.missing_params(written)
        if missing:
            raise ValueError(f"checkpoint is missing tensors for: {', '.join(missing)}")
        process_weights_after_loading(model)
        self.model = model
        stats = LoadStats(self.rank, counter.bytes_read, counter.tensors_read,
                          time.perf_counter() - start)
        self.log.info("loaded %d tensors, %.2f MB read in %.2fs", stats.tensors_read,
                      stats.bytes_read / 1e6, stats.seconds)
        return asdict(stats)

    # ---- serving ------------------------------------------------------------------------

    def _require_model(self) -> DecoderForCausalLM:
        if self.model is None:
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

    def get_tensor(self, name: str) -> torch.Tensor:
        tensors = self.kernel_tensors()
        if name not in tensors:
            raise KeyError(f"rank {self.rank} has no kernel tensor '{name}'")
        return tensors[name].detach().cpu().clone()

    def placement(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(),
                "gpu_ids": ray.get_gpu_ids(), "device": str(self.device)}

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
