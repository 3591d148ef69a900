"""The serving and inspection calls of ``ReloadOrchestrator``: sampling, logits, KV-scale
calibration, CUDA graphs, kernel-tensor inspection, memory and fault drills.

``EngineCalls`` is mixed into ``ReloadOrchestrator`` (``orchestrator.coordinator``), which
provides the engines and the lock every call takes: ``_on_engine`` runs a method on every rank
of one engine under ``_exclusive`` (so no call sees a half-applied version) and rebuilds a rank
that died while serving; ``_submit_all`` reaches every rank of every engine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import ray
import torch

from actors.engines import EngineKind
from actors.model import ModelSpec
from actors.runtime import SamplingRequest
from actors.transport import unpack_tensors
from orchestrator.cluster import Engine, RankKey, gather
from orchestrator.config import EngineConfig
from orchestrator.report import Samples


def as_token_tensor(token_ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError("token_ids must be [batch, length] with length >= 1, "
                         f"got {tuple(ids.shape)}")
    return ids


class EngineCalls:
    """Serving calls over the engines the host class placed (see the module doc)."""

    config: EngineConfig
    kind: EngineKind
    engines: list[Engine]
    model_spec: ModelSpec | None
    version: int
    _exclusive: Callable[..., AbstractContextManager[None]]
    _engine: Callable[[int], Engine]
    _submit_all: Callable[..., dict[RankKey, ray.ObjectRef]]
    _on_engine: Callable[..., dict[int, Any]]

    def forward(self, token_ids: Any, engine: int = 0) -> torch.Tensor:
        """float32 CPU logits [B, T, vocab] from ``engine`` (vocab padding removed). Engines
        that serve no raw logits (vLLM) say so: use ``sample(..., logprobs=True)``."""
        if not self.kind.serves_logits:
            raise NotImplementedError(
                f"engine={self.config.engine!r} serves tokens and their log-probs, not raw "
                "logits: use generate() or sample(..., logprobs=True)")
        return self._on_engine(engine, "forward", as_token_tensor(token_ids))[0]

    def generate(self, token_ids: Any, max_new_tokens: int = 8, engine: int = 0) -> torch.Tensor:
        """Greedy decoding: prompt followed by exactly ``max_new_tokens`` tokens, [B, T + N]
        (no stop at EOS: every sequence of a batch gets the same number of tokens)."""
        ids = as_token_tensor(token_ids)
        samples = self.sample(ids, max_new_tokens, temperature=0.0, seed=0, logprobs=False,
                              engine=engine)
        return torch.cat([ids, samples.tokens], dim=1)

    def sample(self, token_ids: Any, max_new_tokens: int, temperature: float = 1.0,
               top_p: float = 1.0, seed: int | None = None, logprobs: bool = True,
               engine: int = 0) -> Samples:
        """Rollouts for RL: exactly ``max_new_tokens`` new tokens per prompt (no stop at
        EOS), drawn at ``temperature`` (0: greedy) from the ``top_p`` nucleus, reproducible
        with ``seed`` (row i uses seed + i), with each token's log-prob under the model
        (log-softmax of the raw logits, vLLM's default) and the version that produced them."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature="
                             f"{temperature}, top_p={top_p}")
        # Every rank must draw the same tokens: the seed is chosen here, never on a rank.
        request = SamplingRequest(max_new_tokens, float(temperature), float(top_p),
                                  random.getrandbits(31) if seed is None else seed, logprobs)
        with self._exclusive():
            sampled = self._on_engine(engine, "sample", as_token_tensor(token_ids), request)[0]
            version = self.version
        return Samples(sampled.tokens, sampled.logprobs if logprobs else None, version,
                       sampled.cached_tokens)

    def calibration_tokens(self) -> torch.Tensor:
        """``kv_calibration_tokens``, or a fixed seeded random 4 x 64 batch over the vocab."""
        if self.config.kv_calibration_tokens is not None:
            return as_token_tensor(self.config.kv_calibration_tokens)
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, self.model_spec.vocab_size, (4, 64), generator=generator)

    def calibrate_kv_scales(self, token_ids: Any) -> list[list[list[float]]]:
        """kv_cache_dtype='fp8': set every engine's k/v scales from a forward of
        ``token_ids`` (amax / 448 per layer, in place). Returns per engine [[k, v], ...]."""
        with self._exclusive():
            return self._calibrate(as_token_tensor(token_ids))

    def _calibrate(self, token_ids: torch.Tensor) -> list[list[list[float]]]:
        results = gather(self._submit_all("calibrate_kv_scales", token_ids),
                         self.config.timeout_s)
        return [results[(e.index, 0)] for e in self.engines]

    def capture_cuda_graph(self, token_ids: Any, engine: int = 0) -> None:
        """device='cuda': capture a forward of this shape on every rank of ``engine``."""
        self._on_engine(engine, "capture_cuda_graph", as_token_tensor(token_ids))

    def replay_cuda_graph(self, engine: int = 0) -> torch.Tensor:
        """Replay the captured forward: float32 CPU logits of the weights served now."""
        return self._on_engine(engine, "replay_cuda_graph")[0]

    def inspect(self, engine: int = 0) -> list[dict[str, dict[str, Any]]]:
        """Per rank: kernel tensor name -> {data_ptr, shape, dtype, device}."""
        ranks = self._on_engine(engine, "inspect")
        return [ranks[r] for r in sorted(ranks)]

    def get_tensor(self, name: str, rank: int = 0, engine: int = 0) -> torch.Tensor:
        """A CPU copy of one kernel tensor of one rank."""
        return self.get_tensors([name], rank=rank, engine=engine)[name]

    def get_tensors(self, names: list[str] | None = None, rank: int = 0, engine: int = 0
                    ) -> dict[str, torch.Tensor]:
        """CPU copies of kernel tensors of one rank (every one when ``names`` is None)."""
        target = self._engine(engine)
        if not 0 <= rank < len(target.ranks):
            raise ValueError(f"rank={rank} out of range (tensor_parallel_size={len(target.ranks)})")
        with self._exclusive():
            refs = target.submit("get_tensors", names, only_rank=rank)
            entries, arrays = gather(refs, self.config.timeout_s)[(engine, rank)]
        return {name: tensor.clone() for name, tensor in unpack_tensors(entries, arrays)}

    def memory(self, peak: bool = False, staging: bool = False) -> list[list[int]]:
        """Per engine, per rank: resident bytes of the rank process, or with ``peak`` the
        most it held since ``reset_peak_memory``, or with ``staging`` the bytes a staged
        reload holds in staging tensors now (answered while it streams)."""
        key = "staging_bytes" if staging else "peak_rss_bytes" if peak else "rss_bytes"
        with self._exclusive():
            results = gather(self._submit_all("memory"), self.config.timeout_s)
        return [[results[(e.index, r)][key] for r in range(len(e.ranks))] for e in self.engines]

    def reset_peak_memory(self) -> None:
        gather(self._submit_all("reset_peak_memory"), self.config.timeout_s)

    def inject_fault(self, stage: str, action: str, *, engine: int = 0, rank: int = 0,
                     signal_path: str | None = None) -> None:
        """Fault drills: make one rank 'raise' at, 'pause' in (until killed) or 'hold' in
        the next reload's ``stage`` ('transfer', 'process', 'quantize'). A paused or held
        rank touches ``signal_path``; a held one goes on once the file is deleted."""
        if (stage not in ("transfer", "process", "quantize")
                or action not in ("raise", "pause", "hold")):
            raise ValueError(f"unknown fault {stage!r}/{action!r}")
        if action == "hold" and not signal_path:
            raise ValueError("a 'hold' fault needs the signal_path its drill deletes")
        target = self._engine(engine)
        gather(target.submit("inject_fault", stage, action, signal_path, only_rank=rank),
               self.config.timeout_s)

    def placements(self) -> list[list[dict[str, Any]]]:
        """Per engine, per rank: node id, pid and GPU ids of the rank actor."""
        results = gather(self._submit_all("placement"), self.config.timeout_s)
        return [[results[(e.index, r)] for r in range(len(e.ranks))] for e in self.engines]
