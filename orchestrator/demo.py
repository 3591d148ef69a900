"""The embedded default job (``tp-reload demo`` / ``make demo``): a small random checkpoint
written with transformers (Llama by default; Qwen3-MoE or Mixtral with ``--model``), served by
a TP engine on a local Ray, reloaded in place, checked against transformers."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from orchestrator.config import EngineConfig
from orchestrator.coordinator import ReloadOrchestrator


@dataclass(frozen=True, slots=True)
class DemoOptions:
    tensor_parallel_size: int = 2
    """Ranks of the demo engine."""
    num_layers: int = 4
    """Decoder layers of the random model."""
    num_cpus_per_rank: float = 0.5
    """Ray CPU request per rank (fractional so the demo fits a 2-core machine)."""
    seed: int = 0
    """Seed of the random weights and the prompt."""
    quantization: str | None = None
    """Online quantization of the engine (None, fp8, fp8_per_channel, fp8_block, w4a8)."""
    kv_cache_dtype: str = "auto"
    """'auto' or 'fp8'."""
    model: str = "llama"
    """Random model family: one of DEMO_MODELS."""


COMMON = dict(vocab_size=1000, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
              max_position_embeddings=512, initializer_range=0.1)
# name -> (transformers config class, model class, description, config fields)
DEMO_MODELS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaForCausalLM (random, llama3 rope, "
              "GQA 8/2)", dict(intermediate_size=512, rope_parameters={
                  "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64})),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3MoeForCausalLM (random, 16 "
                  "experts top-4, q/k norms)", dict(intermediate_size=512, head_dim=32,
                                                    moe_intermediate_size=128, num_experts=16,
                                                    num_experts_per_tok=4, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "MixtralForCausalLM (random, 8 experts "
                "top-2)", dict(intermediate_size=256, num_local_experts=8,
                               num_experts_per_tok=2)),
}


def write_demo_checkpoint(path: Path, num_layers: int, seed: int, model: str = "llama") -> None:
    """A random model of family ``model``, sharded into several files."""
    import transformers

    config_class, model_class, _, fields = DEMO_MODELS[model]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(num_hidden_layers=num_layers,
                                                 **COMMON, **fields)
    getattr(transformers, model_class)(config).save_pretrained(path, max_shard_size="1MB")


def reference_outputs(path: Path, prompt: torch.Tensor, new_tokens: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(prompt).logits
        model.generation_config.eos_token_id = None  # like the engine: no stop at EOS
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return logits, tokens


def _rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def run_demo(options: DemoOptions) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tp-reload-demo-") as tmp:
        step0, step1 = Path(tmp) / "step0", Path(tmp) / "step1"
        write_demo_checkpoint(step0, options.num_layers, options.seed, options.model)
        write_demo_checkpoint(step1, options.num_layers, options.seed + 1, options.model)
        generator = torch.Generator().manual_seed(options.seed)
        prompt = torch.randint(0, 1000, (2, 16), generator=generator)
        ref0_logits, ref0_tokens = reference_outputs(step0, prompt, 8)
        ref1_logits, ref1_tokens = reference_outputs(step1, prompt, 8)
        cfg = EngineConfig(model=str(step0), tensor_parallel_size=options.tensor_parallel_size,
                           dtype="float32", num_cpus_per_rank=options.num_cpus_per_rank,
                           bucket_bytes=1 << 20, quantization=options.quantization,
                           kv_cache_dtype=options.kv_cache_dtype)
        ray_begin = time.perf_counter()
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        ray_seconds = time.perf_counter() - ray_begin
        begin = time.perf_counter()
        with ReloadOrchestrator(cfg) as orch:
            started = time.perf_counter() - begin
            logits0, tokens0 = orch.forward(prompt), orch.generate(prompt, max_new_tokens=8)
            first = orch.load_report
            identity_before = orch.inspect()
            reload = orch.reload(str(step1))
            identity_after = orch.inspect()
            logits1, tokens1 = orch.forward(prompt), orch.generate(prompt, max_new_tokens=8)
    errors = [_rel_error(logits0, ref0_logits), _rel_error(logits1, ref1_logits)]
    matches = [bool(torch.equal(tokens0, ref0_tokens)), bool(torch.equal(tokens1, ref1_tokens))]
    same_tensors = identity_before == identity_after
    exact = options.quantization is None and options.kv_cache_dtype == "auto"
    # A quantized engine is compared with the unquantized model: the error is reported, and
    # only a broken engine (error near 1, NaN) fails the demo.
    numerics_ok = (max(errors) <= 1e-4 and all(matches)) if exact else max(errors) < 0.9
    return {
        "model": DEMO_MODELS[options.model][2],
        "quantization": options.quantization,
        "kv_cache_dtype": options.kv_cache_dtype,
        "exact": exact,
        "layers": options.num_layers,
        "tensor_parallel_size": options.tensor_parallel_size,
        "ray_start_seconds": round(ray_seconds, 3),
        "start_seconds": round(started, 3),
        "source_bytes": first.source_bytes,
        "bytes_read_per_rank": {f"engine{e}/rank{r}": b for (e, r), b in first.bytes_read.items()},
        "kernel_tensors": sum(len(rank) for rank in identity_before),
        "logits_rel_l2_error_vs_transformers": errors[0],
        "greedy_tokens_match_transformers": matches[0],
        "reload": {
            "version": reload.version,
            "seconds": round(reload.seconds, 4),
            "stage_seconds": {k: round(v, 4) for k, v in reload.stage_seconds.items()},
            "buckets": reload.buckets,
            "layers_reloaded": len(reload.layers_reloaded),
            "peak_buffered_bytes": reload.peak_buffered_bytes,
            "predicted_peak_buffered_bytes": reload.predicted_peak_buffered_bytes,
            "bytes_read_per_rank": {f"engine{e}/rank{r}": b
                                    for (e, r), b in reload.bytes_read.items()},
            "kernel_tensors_unchanged": same_tensors,
            "logits_rel_l2_error_vs_transformers": errors[1],
            "greedy_tokens_match_transformers": matches[1],
            "warnings": reload.warnings,
            "expert_layers_share": dict(zip(("bytes", "seconds"), reload.share("experts"),
                                            strict=True)),
        },
        "ok": numerics_ok and same_tensors,
    }


def format_summary(result: dict[str, Any]) -> str:
    mb = 1e6
    reload = result["reload"]
    bound = " (bound 1e-4)" if result["exact"] else " (quantized vs unquantized transformers)"
    lines = [
        f"tp-reload demo: {result['model']}, {result['layers']} layers, "
        f"TP={result['tensor_parallel_size']}, quantization={result['quantization']}, "
        f"kv_cache_dtype={result['kv_cache_dtype']}",
        f"  local Ray up in {result['ray_start_seconds']:.2f}s; engine up (placement, process "
        f"group, first load) in {result['start_seconds']:.2f}s, serving version 0",
        f"  step0: {result['source_bytes'] / mb:.2f} MB; bytes read per rank: "
        + ", ".join(f"{r} {b / mb:.2f} MB" for r, b in result["bytes_read_per_rank"].items()),
        f"  step0 logits vs transformers: rel. L2 error "
        f"{result['logits_rel_l2_error_vs_transformers']:.2e}{bound}; greedy tokens match: "
        f"{result['greedy_tokens_match_transformers']}",
        f"  reload(step1) -> version {reload['version']} in {reload['seconds']:.3f}s, "
        f"{reload['buckets']} buckets, {reload['layers_reloaded']} layers",
        "    stages: " + ", ".join(f"{k} {v:.3f}s" for k, v in reload["stage_seconds"].items()),
        f"    peak buffered per rank {reload['peak_buffered_bytes'] / mb:.3f} MB "
        f"(predicted {reload['predicted_peak_buffered_bytes'] / mb:.3f} MB); bytes read: "
        + ", ".join(f"{r} {b / mb:.2f} MB" for r, b in reload["bytes_read_per_rank"].items()),
        *([f"    expert layers: {reload['expert_layers_share']['bytes']:.0%} of the bytes, "
           f"{reload['expert_layers_share']['seconds']:.0%} of the rank time"]
          if reload["expert_layers_share"]["bytes"] else []),
        f"    all {result['kernel_tensors']} kernel tensors kept identity and data_ptr: "
        f"{reload['kernel_tensors_unchanged']}",
        f"  step1 logits vs transformers: rel. L2 error "
        f"{reload['logits_rel_l2_error_vs_transformers']:.2e}; greedy tokens match: "
        f"{reload['greedy_tokens_match_transformers']}",
    ]
    lines += [f"  warning: {w}" for w in reload["warnings"]]
    lines.append("  OK" if result["ok"] else "  MISMATCH")
    return "\n".join(lines)
