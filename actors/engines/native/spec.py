"""Model spec: the dimensions a TP engine needs, read from a Hugging Face ``config.json``.

A family is one entry in ``FAMILIES``: it says which HF architecture names it accepts and
how that family's config fields map onto the shared decoder (biases, q/k norms, sliding
windows). Adding a family means adding an entry here and, if its layers differ, a module
beside ``decoder.py``; nothing outside ``actors/engines/native/`` changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.engines.runtime import read_model_config

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class RopeSpec:
    theta: float
    """Base wavelength of the rotary embedding."""
    rope_type: str = "default"
    """One of SUPPORTED_ROPE_TYPES."""
    factor: float = 1.0
    """Scaling factor (linear, llama3)."""
    low_freq_factor: float = 1.0
    """llama3 only: wavelengths above original_max/low_freq_factor are divided by factor."""
    high_freq_factor: float = 4.0
    """llama3 only: wavelengths below original_max/high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """llama3 only: context length the model was pre-trained with."""


@dataclass(frozen=True, slots=True)
class MoESpec:
    """Mixture-of-experts MLPs: which layers are sparse and how tokens are routed."""

    num_experts: int
    top_k: int
    """Experts each token is sent to."""
    intermediate_size: int
    """Width of one expert's MLP (before TP)."""
    renormalize: bool
    """Top-k routing weights divided by their sum (Mixtral always; Qwen3-MoE when
    ``norm_topk_prob``)."""
    sparse_layers: tuple[bool, ...]
    """Per layer: True for a MoE block, False for a dense MLP of ``intermediate_size``."""
    block: str
    """Checkpoint module name of the sparse block: ``mlp`` (Qwen3-MoE) or
    ``block_sparse_moe`` (Mixtral)."""
    expert_shards: tuple[tuple[str, str], ...]
    """Checkpoint name of each expert projection -> fused shard: w1 (gate), w3 (up), w2
    (down)."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    architecture: str
    """HF architecture name, e.g. ``LlamaForCausalLM``."""
    family: str
    """Family key in FAMILIES (llama, mistral, qwen2, qwen3, qwen3_moe, mixtral)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    """Per-head width; may differ from hidden_size // num_heads (Qwen3)."""
    rms_norm_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    qkv_bias: bool
    """Bias on q/k/v projections."""
    o_bias: bool
    """Bias on the attention output projection."""
    mlp_bias: bool
    """Bias on gate/up/down projections."""
    qk_norm: bool
    """Per-head RMSNorm on q and k before rotary (Qwen3)."""
    sliding_windows: tuple[int | None, ...]
    """Per layer: attention window in tokens, or None for full causal attention."""
    checkpoint_dtype: str | None
    """dtype named in config.json (``dtype`` or ``torch_dtype``), if any."""
    moe: MoESpec | None = None
    """Mixture-of-experts layout; None for dense families."""


def _require(cfg: dict[str, Any], key: str, source: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{source}: required field '{key}' is missing")
    return cfg[key]


def _positive_int(cfg: dict[str, Any], key: str, source: str) -> int:
    value = _require(cfg, key, source)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{source}: field '{key}' must be a positive integer, got {value!r}")
    return value


def _rope_spec(cfg: dict[str, Any], source: str) -> RopeSpec:
    # transformers >= 5 writes ``rope_parameters`` (theta inside); older configs write
    # ``rope_theta`` plus an optional ``rope_scaling`` dict.
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: rope_type '{rope_type}' is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return RopeSpec(theta=theta)
    factor = float(_require(params, "factor", f"{source} rope_parameters"))
    if rope_type == "linear":
        return RopeSpec(theta=theta, rope_type="linear", factor=factor)
    original = params.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return RopeSpec(
        theta=theta,
        rope_type="llama3",
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original),
    )


def _windows_all(cfg: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Mistral: one ``sliding_window`` (or null) for every layer."""
    return (cfg.get("sliding_window"),) * num_layers


def _windows_by_layer_type(cfg: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Qwen2/Qwen3: windows only where ``use_sliding_window`` and ``layer_types`` say so."""
    if not cfg.get("use_sliding_window"):
        return (None,) * num_layers
    types = cfg.get("layer_types") or ["sliding_attention"] * num_layers
    window = cfg.get("sliding_window")
    return tuple(window if t == "sliding_attention" else None for t in types)


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    qkv_bias: Callable[[dict[str, Any]], bool]
    o_bias: Callable[[dict[str, Any]], bool]
    qk_norm: bool
    sliding_windows: Callable[[dict[str, Any], int], tuple[int | None, ...]]
    moe: Callable[[dict[str, Any], int, str], MoESpec] | None = None


def _num_experts(cfg: dict[str, Any], source: str) -> int:
    # Qwen3-MoE configs say num_experts; Mixtral's (and transformers >= 5) num_local_experts.
    key = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"
    return _positive_int(cfg, key, source)


def _moe_spec(cfg: dict[str, Any], source: str, *, block: str, renormalize: bool,
              sparse_layers: tuple[bool, ...], expert_names: tuple[str, str, str]) -> MoESpec:
    experts = _num_experts(cfg, source)
    top_k = _positive_int(cfg, "num_experts_per_tok", source)
    if top_k > experts:
        raise ValueError(f"{source}: field 'num_experts_per_tok' ({top_k}) exceeds the "
                         f"number of experts ({experts})")
    return MoESpec(
        num_experts=experts, top_k=top_k,
        intermediate_size=_positive_int(
            cfg, "moe_intermediate_size" if "moe_intermediate_size" in cfg
            else "intermediate_size", source),
        renormalize=renormalize, sparse_layers=sparse_layers, block=block,
        expert_shards=tuple(zip(expert_names, ("w1", "w3", "w2"), strict=True)),
    )


def _mixtral_moe(cfg: dict[str, Any], num_layers: int, source: str) -> MoESpec:
    return _moe_spec(cfg, source, block="block_sparse_moe", renormalize=True,
                     sparse_layers=(True,) * num_layers, expert_names=("w1", "w3", "w2"))


def _qwen3_moe(cfg: dict[str, Any], num_layers: int, source: str) -> MoESpec:
    """Layer i is sparse unless listed in ``mlp_only_layers`` or off the
    ``decoder_sparse_step`` grid (as transformers' Qwen3MoeDecoderLayer decides)."""
    step = cfg.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step <= 0:
        raise ValueError(f"{source}: field 'decoder_sparse_step' must be a positive integer, "
                         f"got {step!r}")
    dense = set(cfg.get("mlp_only_layers") or [])
    if not dense <= set(range(num_layers)):
        raise ValueError(f"{source}: field 'mlp_only_layers' names layers outside "
                         f"0..{num_layers - 1}: {sorted(dense - set(range(num_layers)))}")
    sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
    return _moe_spec(cfg, source, block="mlp", renormalize=bool(cfg.get("norm_topk_prob")),
                     sparse_layers=sparse, expert_names=("gate_proj", "up_proj", "down_proj"))


def _attention_bias(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("attention_bias", False))


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("LlamaForCausalLM",), _attention_bias, _attention_bias, False,
               lambda cfg, n: (None,) * n),
        Family("mistral", ("MistralForCausalLM",), _attention_bias, _attention_bias, False,
               _windows_all),
        Family("qwen2", ("Qwen2ForCausalLM",), lambda cfg: True, lambda cfg: False, False,
               _windows_by_layer_type),
        Family("qwen3", ("Qwen3ForCausalLM",), _attention_bias, _attention_bias, True,
               _windows_by_layer_type),
        Family("qwen3_moe", ("Qwen3MoeForCausalLM",), _attention_bias, _attention_bias, True,
               _windows_by_layer_type, _qwen3_moe),
        Family("mixtral", ("MixtralForCausalLM",), _attention_bias, _attention_bias, False,
               _windows_all, _mixtral_moe),
    )
}
ARCHITECTURES: dict[str, Family] = {a: f for f in FAMILIES.values() for a in f.architectures}


def spec_from_dict(cfg: dict[str, Any], source: str = "config.json") -> ModelSpec:
    """Validate a parsed config.json and return the engine's ModelSpec."""
    archs = cfg.get("architectures") or []
    if not archs:
        raise ValueError(f"{source}: field 'architectures' is missing or empty")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{source}: unknown architecture '{arch}' "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    family = ARCHITECTURES[arch]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: field 'hidden_act' must be 'silu', got {act!r}")
    num_layers = _positive_int(cfg, "num_hidden_layers", source)
    hidden = _positive_int(cfg, "hidden_size", source)
    heads = _positive_int(cfg, "num_attention_heads", source)
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    if cfg.get("head_dim") is None and hidden % heads:
        raise ValueError(f"{source}: hidden_size {hidden} is not divisible by "
                         f"num_attention_heads {heads}")
    if heads % kv_heads:
        raise ValueError(
            f"{source}: num_attention_heads {heads} is not divisible by "
            f"num_key_value_heads {kv_heads}"
        )
    windows = family.sliding_windows(cfg, num_layers)
    if len(windows) != num_layers:
        raise ValueError(f"{source}: field 'layer_types' has {len(windows)} entries, "
                         f"expected {num_layers}")
    return ModelSpec(
        architecture=arch,
        family=family.name,
        vocab_size=_positive_int(cfg, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_positive_int(cfg, "intermediate_size", source),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_spec(cfg, source),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias(cfg),
        o_bias=family.o_bias(cfg),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=family.qk_norm,
        sliding_windows=windows,
        checkpoint_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        moe=family.moe(cfg, num_layers, source) if family.moe else None,
    )


def load_spec(model_dir: str | Path) -> ModelSpec:
    """Read ``<model_dir>/config.json``; errors name the file and the field."""
    return spec_from_dict(read_model_config(model_dir), str(Path(model_dir) / "config.json"))


def check_tp(spec: ModelSpec, tp: int) -> None:
    """Raise ValueError unless ``spec`` can be split over ``tp`` ranks."""
    if spec.num_heads % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide num_attention_heads={spec.num_heads}"
        )
    if tp >= spec.num_kv_heads and tp % spec.num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp} must be a multiple of num_key_value_heads="
            f"{spec.num_kv_heads} when it exceeds it (KV heads are replicated)"
        )
    if tp < spec.num_kv_heads and spec.num_kv_heads % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide num_key_value_heads={spec.num_kv_heads}"
        )
    dense = spec.moe is None or not all(spec.moe.sparse_layers)
    if dense and spec.intermediate_size % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide intermediate_size={spec.intermediate_size}"
        )
    if spec.moe is not None and spec.moe.intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide the expert width "
                         f"(moe_intermediate_size) {spec.moe.intermediate_size}")


def padded_vocab(vocab_size: int, tp: int) -> int:
    """Vocab rows rounded up so every rank holds the same number of embedding rows."""
    return math.ceil(vocab_size / tp) * tp
