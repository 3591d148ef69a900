"""EngineConfig: every knob of an engine fleet, validated once, with a docstring per field."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from actors.model import ModelSpec, check_tp, load_spec
from orchestrator.errors import ConfigError
from quant import LINEAR_METHODS

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
KV_CACHE_DTYPES = ("auto",)
PLACEMENT_STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    model: str
    """Hugging Face checkpoint directory (config.json + safetensors) of the first load."""
    tensor_parallel_size: int = 1
    """Ranks per engine; each rank is one Ray actor holding one TP shard."""
    num_engines: int = 1
    """Data-parallel replicas; each gets its own placement group and process group."""
    dtype: str = "auto"
    """Engine dtype: 'auto' keeps the checkpoint's dtype; 'float32' for exact comparisons."""
    quantization: str | None = None
    """Online quantization method name, or None for full precision."""
    kv_cache_dtype: str = "auto"
    """KV-cache storage dtype; 'auto' stores keys/values in the engine dtype."""
    device: str = "cpu"
    """'cpu' (gloo) or 'cuda' (NCCL; one GPU per rank actor)."""
    num_cpus_per_rank: float = 1.0
    """Ray CPU request per rank actor; fractional values let TP=4 run on a 2-core machine."""
    bucket_bytes: int = 256 << 20
    """Upper bound of one streamed bucket during a reload."""
    placement_strategy: str = "PACK"
    """Ray placement-group strategy for one engine's ranks."""
    timeout_s: float = 300.0
    """Longest wait for any rank call or collective before the call fails naming the rank."""
    model_spec: ModelSpec = field(init=False, repr=False, compare=False)
    """Parsed from <model>/config.json during validation."""

    def __post_init__(self) -> None:
        self._check_types()
        self._check_values()
        try:
            self.model_spec = load_spec(self.model)
            check_tp(self.model_spec, self.tensor_parallel_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def _check_types(self) -> None:
        expected = {
            "model": (str, Path), "tensor_parallel_size": (int,), "num_engines": (int,),
            "dtype": (str,), "quantization": (str, type(None)), "kv_cache_dtype": (str,),
            "device": (str,), "num_cpus_per_rank": (int, float), "bucket_bytes": (int,),
            "placement_strategy": (str,), "timeout_s": (int, float),
        }
        for f in fields(self):
            if f.name not in expected:
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, expected[f.name]):
                names = " or ".join(t.__name__ for t in expected[f.name])
                raise ConfigError(f"EngineConfig.{f.name} must be {names}, got {value!r}")
        self.model = str(self.model)

    def _check_values(self) -> None:
        positive = ("tensor_parallel_size", "num_engines", "num_cpus_per_rank", "bucket_bytes",
                    "timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"EngineConfig.{name} must be > 0, got {getattr(self, name)!r}")
        choices = {"dtype": DTYPES, "device": DEVICES, "kv_cache_dtype": KV_CACHE_DTYPES,
                   "placement_strategy": PLACEMENT_STRATEGIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"EngineConfig.{name}={getattr(self, name)!r} is not one of {allowed}"
                )
        if self.quantization not in LINEAR_METHODS:
            known = [k for k in LINEAR_METHODS if k is not None]
            raise ConfigError(
                f"EngineConfig.quantization={self.quantization!r} is unknown (known: None, {known})"
            )
