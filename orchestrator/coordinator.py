"""ReloadOrchestrator: the driver-side handle on a fleet of TP engines.

Usage::

    with ReloadOrchestrator(EngineConfig(model="ckpt/step0", tensor_parallel_size=2)) as orch:
        logits = orch.forward([[1, 2, 3]])
        tokens = orch.generate([[1, 2, 3]], max_new_tokens=8)

Ordering invariants:
  * ``start`` (or entering the context) must be called before any other method; it places
    the engines, forms each engine's process group and performs the first load (version 0).
  * every call reaches all ranks of one engine, because forward passes use collectives; a
    rank that fails raises ``RankError`` naming engine and rank with its traceback text.
  * ``shutdown`` (or leaving the context) kills the rank actors and frees their placement
    groups; the orchestrator cannot be restarted afterwards.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from orchestrator.cluster import Engine, RankKey, connect_engines, create_engine, gather
from orchestrator.config import EngineConfig
from orchestrator.errors import CheckpointError, ConfigError
from orchestrator.inventory import TensorInfo, checkpoint_inventory, names_by_file

log = logging.getLogger("tp_reload")

CHECKPOINT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What the first load did, per (engine, rank)."""

    seconds: float
    checkpoint_bytes: int
    """Bytes of all tensors in the checkpoint files."""
    bytes_read: dict[RankKey, int] = field(default_factory=dict)
    """Bytes each rank read from the files: about checkpoint_bytes / tp for TP >= 2."""


def resolve_dtype(requested: str, infos: list[TensorInfo]) -> str:
    """'auto' -> the dtype the checkpoint stores its embedding in."""
    if requested != "auto":
        return requested
    for info in infos:
        if info.name.endswith("embed_tokens.weight"):
            if info.dtype not in CHECKPOINT_DTYPES:
                raise ConfigError(f"{info.file}: '{info.name}' has dtype {info.dtype}; "
                                  "set EngineConfig.dtype explicitly")
            return CHECKPOINT_DTYPES[info.dtype]
    raise CheckpointError("checkpoint has no '*embed_tokens.weight'; set EngineConfig.dtype")


def as_token_tensor(token_ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"token_ids must be [batch, length] with length >= 1, got {tuple(ids.shape)}")
    return ids


class ReloadOrchestrator:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.engines: list[Engine] = []
        self.dtype = ""
        self.load_report: LoadReport | None = None
        self._version: int | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> ReloadOrchestrator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def start(self) -> ReloadOrchestrator:
        cfg = self.config
        infos = checkpoint_inventory(cfg.model)
        self.dtype = resolve_dtype(cfg.dtype, infos)
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)
        begin = time.perf_counter()
        try:
            self.engines = [create_engine(i, cfg, self.dtype) for i in range(cfg.num_engines)]
            connect_engines(self.engines, cfg.timeout_s)
            files = names_by_file(infos)
            stats = gather(self._submit_all("load_checkpoint", files), cfg.timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.load_report = LoadReport(
            seconds=time.perf_counter() - begin,
            checkpoint_bytes=sum(i.nbytes for i in infos),
            bytes_read={key: s["bytes_read"] for key, s in stats.items()},
        )
        self._version = 0
        log.info("%d engine(s) x TP=%d serving %s (%s) as version 0", cfg.num_engines,
                 cfg.tensor_parallel_size, cfg.model, self.dtype)
        return self

    def shutdown(self) -> None:
        for engine in self.engines:
            engine.kill()
        self.engines = []
        self._version = None

    # ---- serving ------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """0 after the first load; each committed reload adds one."""
        if self._version is None:
            raise RuntimeError("orchestrator is not started")
        return self._version

    def _engine(self, engine: int) -> Engine:
        if not self.engines:
            raise RuntimeError("orchestrator is not started (use it as a context manager)")
        if not 0 <= engine < len(self.engines):
            raise ValueError(f"engine={engine} out of range (num_engines={len(self.engines)})")
        return self.engines[engine]

    def _submit_all(self, method: str, *args: Any) -> dict[RankKey, ray.ObjectRef]:
        calls: dict[RankKey, ray.ObjectRef] = {}
        for engine in self.engines:
            calls.update(engine.submit(method, *args))
        return calls

    def _on_engine(self, engine: int, method: str, *args: Any) -> dict[int, Any]:
        results = gather(self._engine(engine).submit(method, *args), self.config.timeout_s)
        return {rank: value for (_, rank), value in sorted(results.items())}

    def forward(self, token_ids: Any, engine: int = 0) -> torch.Tensor:
        """float32 CPU logits [B, T, vocab] from ``engine`` (vocab padding removed)."""
        return self._on_engine(engine, "forward", as_token_tensor(token_ids))[0]

    def generate(self, token_ids: Any, max_new_tokens: int = 8, engine: int = 0) -> torch.Tensor:
        """Greedy decoding: prompt followed by ``max_new_tokens`` tokens, [B, T + N]."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return self._on_engine(engine, "generate", as_token_tensor(token_ids), max_new_tokens)[0]

    def inspect(self, engine: int = 0) -> list[dict[str, dict[str, Any]]]:
        """Per rank: kernel tensor name -> {data_ptr, shape, dtype, device}."""
        ranks = self._on_engine(engine, "inspect")
        return [ranks[r] for r in sorted(ranks)]

    def get_tensor(self, name: str, rank: int = 0, engine: int = 0) -> torch.Tensor:
        """A CPU copy of one kernel tensor of one rank."""
        target = self._engine(engine)
        if not 0 <= rank < len(target.ranks):
            raise ValueError(f"rank={rank} out of range (tensor_parallel_size={len(target.ranks)})")
        refs = target.submit("get_tensor", name, only_rank=rank)
        return gather(refs, self.config.timeout_s)[(engine, rank)]

    def placements(self) -> list[list[dict[str, Any]]]:
        """Per engine, per rank: node id, pid and GPU ids of the rank actor."""
        results = gather(self._submit_all("placement"), self.config.timeout_s)
        return [[results[(e.index, r)] for r in range(len(e.ranks))] for e in self.engines]
