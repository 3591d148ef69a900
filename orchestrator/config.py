"""EngineConfig: every knob of an engine fleet, validated once, with a docstring per field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.dtypes import ENGINE_DTYPE_NAMES
from actors.engines import EngineOptions, EnginePlugin, engine_names, engine_plugin
from orchestrator.errors import ConfigError
from orchestrator.fields import check_types
from quant import QuantConfig

DTYPES = ("auto", *ENGINE_DTYPE_NAMES)
DEVICES = ("cpu", "cuda")
KV_CACHE_DTYPES = ("auto", "fp8")
KV_SCALES = ("checkpoint", "calibrate")
PLACEMENT_STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")
ENGINE_PLACEMENTS = ("SPREAD", "ANY")


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    model: str | Path
    """Hugging Face checkpoint directory (config.json + safetensors) of the first load
    (kept as a str). Read by ``start()``, not here."""
    engine: str = "native"
    """Inference engine of every rank: 'native' (tp-reload's reference runtime) or 'vllm'
    (each rank actor hosts one TP rank of a vLLM engine: the production engine)."""
    tensor_parallel_size: int = 1
    """Ranks per engine; each rank is one Ray actor holding one TP shard."""
    num_engines: int = 1
    """Data-parallel replicas; each gets its own placement group and process group."""
    dtype: str = "auto"
    """Engine dtype: 'auto' keeps the checkpoint's dtype; 'float32' for exact comparisons."""
    quantization: str | None = None
    """Online quantization, re-applied to the new weights on each rank at every load.
    native: None (full precision), 'fp8' (per tensor), 'fp8_per_channel', 'fp8_block'
    (128x128) or 'w4a8' (int4 groups of 128, FP8 activations). vllm: vLLM's own online
    names (e.g. 'fp8_per_channel'); one this platform cannot run is refused with the list
    of those it can."""
    kv_cache_dtype: str = "auto"
    """KV-cache storage: 'auto' (engine dtype) or 'fp8' (with per-layer k/v scales)."""
    kv_scales: str = "checkpoint"
    """With kv_cache_dtype='fp8': 'checkpoint' (scales from the source, defaults 1.0) or
    'calibrate' (measured on a calibration batch after every load)."""
    kv_calibration_tokens: list[list[int]] | None = None
    """Calibration batch for kv_scales='calibrate'; None: a fixed seeded random 4 x 64 batch."""
    device: str = "cpu"
    """'cpu' (gloo) or 'cuda' (NCCL; one GPU per rank actor)."""
    num_cpus_per_rank: float = 1.0
    """Ray CPU request per rank actor; fractional values let TP=4 run on a 2-core machine."""
    num_gpus_per_rank: float = 1.0
    """Ray GPU request per rank actor when ``device='cuda'`` (at most 1): a fraction leaves
    room on the rank's GPU for a colocated trainer rank, as RL frameworks colocate them
    (a trainer source then shares its tensors over CUDA IPC, with no copy on its side)."""
    bucket_bytes: int = 256 << 20
    """Upper bound of one streamed bucket during a reload (the first few are smaller, so
    the ranks start sooner: ``orchestrator.plan.RAMP_STEPS``)."""
    shared_memory: bool = True
    """Whether in-memory and trainer sources travel through shared memory tp-reload keeps on
    the node when their sender (the driver, a trainer's ranks) and every rank share it: the
    sender writes each byte once and the ranks read it in place; a CUDA trainer on the
    engine ranks' GPUs shares its tensors over CUDA IPC. False, or across nodes: an
    in-memory source goes through Ray's object store and a trainer streams over a process
    group."""
    placement_strategy: str = "STRICT_PACK"
    """Ray placement-group strategy for one engine's ranks: STRICT_PACK keeps an engine's
    TP group on one node (its collectives then never cross the network)."""
    engine_placement: str = "SPREAD"
    """How engines are laid over nodes: 'SPREAD' aims each STRICT_PACK engine at the node
    holding the fewest of this fleet's engines among those that can fit it (a soft target:
    if that node has no room within 10 s, Ray places the engine on any node with room);
    'ANY' lets Ray choose."""
    timeout_s: float = 300.0
    """Longest wait for any rank call or collective before the call fails naming the rank."""
    check_finite: bool = True
    """Refuse a reload whose tensors hold NaN or Inf (checked per tensor as it streams)."""
    serve_during_reload: str = "wait"
    """forward/generate during a reload: 'wait' for it to commit or roll back, or 'fail'
    at once with ReloadInProgressError."""
    max_rank_restarts: int = 3
    """How often Ray restarts a dead rank actor; each restart rebuilds it at the last
    committed version."""
    progress: bool = True
    """Show progress (bucket, bytes, rate) on stderr for loads that run longer than
    PROGRESS_AFTER_S seconds."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the engine's constructor (vLLM's ``LLM(...)``, e.g.
    ``{"kv_cache_memory_bytes": 1 << 28}``); the native engine takes none."""

    def __post_init__(self) -> None:
        """Checks the fields alone: a config is a value, built anywhere. The checkpoint is
        read by ``ReloadOrchestrator.start()`` / ``plan()``."""
        check_types(self)
        self.model = str(self.model)
        self._check_values()
        try:
            self.plugin.check_options(self.options(self.dtype))
        except ValueError as exc:
            raise ConfigError(f"EngineConfig: {exc}") from exc

    @property
    def plugin(self) -> EnginePlugin:
        """The engine named by ``engine`` (``actors.engines``)."""
        return engine_plugin(self.engine)

    @property
    def quant(self) -> QuantConfig:
        """The native engine's quant config."""
        return QuantConfig(self.quantization, self.kv_cache_dtype)

    def options(self, dtype: str) -> EngineOptions:
        """What every rank needs to build its part of an engine, with the resolved dtype."""
        return EngineOptions(
            engine=self.engine, model=self.model, tensor_parallel_size=self.tensor_parallel_size,
            dtype=dtype, quantization=self.quantization, kv_cache_dtype=self.kv_cache_dtype,
            device=self.device, num_cpus=self.num_cpus_per_rank,
            engine_args=dict(self.engine_args))

    def _check_values(self) -> None:
        positive = ("tensor_parallel_size", "num_engines", "num_cpus_per_rank", "bucket_bytes",
                    "timeout_s")
        if not 0 < self.num_gpus_per_rank <= 1:
            raise ConfigError(f"EngineConfig.num_gpus_per_rank must be in (0, 1], "
                              f"got {self.num_gpus_per_rank!r}")
        if self.max_rank_restarts < 0:
            raise ConfigError(f"EngineConfig.max_rank_restarts must be >= 0, "
                              f"got {self.max_rank_restarts}")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"EngineConfig.{name} must be > 0, got {getattr(self, name)!r}")
        choices = {"dtype": DTYPES, "device": DEVICES, "kv_cache_dtype": KV_CACHE_DTYPES,
                   "kv_scales": KV_SCALES, "placement_strategy": PLACEMENT_STRATEGIES,
                   "engine_placement": ENGINE_PLACEMENTS, "engine": tuple(engine_names()),
                   "serve_during_reload": ("wait", "fail")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"EngineConfig.{name}={getattr(self, name)!r} is not one of {allowed}"
                )
        if self.kv_scales == "calibrate" and self.kv_cache_dtype != "fp8":
            raise ConfigError("EngineConfig.kv_scales='calibrate' needs kv_cache_dtype='fp8'")
        if self.kv_scales == "calibrate" and not self.plugin.supports("kv_calibration"):
            raise ConfigError(f"EngineConfig.kv_scales='calibrate': engine={self.engine!r} "
                              "cannot calibrate KV scales (the native engine can)")
