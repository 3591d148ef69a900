"""The embedded default job (``tp-reload demo`` / ``make demo``): a small random checkpoint
written with transformers (Llama by default; Qwen3-MoE or Mixtral with ``--model``), served by
a TP engine on a local Ray (vLLM by default, each TP rank a Ray actor; ``--engine native``
for the reference runtime), reloaded in place, and checked against transformers: greedy
tokens, and the log-prob of every served token under transformers' forward."""

from __future__ import annotations

import importlib.util
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.config import EngineConfig
from orchestrator.reload_orchestrator import ReloadOrchestrator
from orchestrator.report import ReloadReport
from orchestrator.rollouts import Rollouts
from orchestrator.scratch import inductor_cache_in, local_ray

NEW_TOKENS = 8


@dataclass(frozen=True, slots=True)
class DemoOptions:
    engine: str = "vllm"
    """'vllm' (the production engine) or 'native'."""
    tensor_parallel_size: int = 2
    """Ranks of the demo engine."""
    num_layers: int = 4
    """Decoder layers of the random model."""
    num_cpus_per_rank: float = 0.5
    """Ray CPU request per rank (fractional so the demo fits a 2-core machine)."""
    seed: int = 0
    """Seed of the random weights and the prompt."""
    quantization: str | None = None
    """Online quantization of the engine (a name the engine runs, e.g. fp8_per_channel)."""
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


def missing_requirements(engine: str) -> list[str]:
    """What this environment lacks for the demo, each with how to get it (a plain
    ``pip install tp-reload`` has neither transformers nor vLLM)."""
    missing = []
    if importlib.util.find_spec("transformers") is None:
        missing.append("transformers, which writes the demo's random checkpoints and checks "
                       "what the engine serves: pip install 'tp-reload[demo]'")
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        missing.append("vLLM, the demo's default engine: pip install 'tp-reload[vllm]' (GPU), "
                       "`make install` (its CPU build), or run `tp-reload demo --engine native`")
    return missing


def write_demo_checkpoint(path: Path, num_layers: int, seed: int, model: str = "llama") -> None:
    """A random model of family ``model``, sharded into several files."""
    import transformers

    config_class, model_class, _, fields = DEMO_MODELS[model]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(num_hidden_layers=num_layers,
                                                 **COMMON, **fields)
    getattr(transformers, model_class)(config).save_pretrained(path, max_shard_size="1MB")


def transformers_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def transformers_greedy(path: Path, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' greedy continuation [B, N] (no stop at EOS, like the engines)."""
    model = transformers_model(path)
    model.generation_config.eos_token_id = None
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                         max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, prompt.shape[1]:]


@torch.no_grad()
def transformers_logprobs(path: Path, prompt: torch.Tensor, tokens: torch.Tensor
                          ) -> torch.Tensor:
    """log p(token) of each of ``tokens`` [B, N] after ``prompt``, under transformers'
    float32 forward (teacher forcing: the tokens need not be transformers' own)."""
    logits = transformers_model(path)(torch.cat([prompt, tokens], dim=1)).logits.float()
    steps = logits[:, prompt.shape[1] - 1:-1]
    return torch.log_softmax(steps, dim=-1).gather(-1, tokens[..., None])[..., 0]


def demo_config(options: DemoOptions, model: Path) -> EngineConfig:
    # vLLM quantizes bfloat16 and float16 engines only.
    quantized_vllm = options.engine == "vllm" and options.quantization is not None
    return EngineConfig(model=str(model), engine=options.engine,
                        tensor_parallel_size=options.tensor_parallel_size,
                        dtype="bfloat16" if quantized_vllm else "float32",
                        num_cpus_per_rank=options.num_cpus_per_rank,
                        bucket_bytes=1 << 20, quantization=options.quantization,
                        kv_cache_dtype=options.kv_cache_dtype,
                        engine_args={"kv_cache_memory_bytes": 256 << 20}
                        if options.engine == "vllm" else {})


def run_demo(options: DemoOptions) -> dict[str, Any]:
    with (tempfile.TemporaryDirectory(prefix="tp-reload-demo-") as tmp,
          inductor_cache_in(Path(tmp))):
        step0, step1 = Path(tmp) / "step0", Path(tmp) / "step1"
        write_demo_checkpoint(step0, options.num_layers, options.seed, options.model)
        write_demo_checkpoint(step1, options.num_layers, options.seed + 1, options.model)
        generator = torch.Generator().manual_seed(options.seed)
        prompt = torch.randint(0, 1000, (2, 16), generator=generator)
        ray_begin = time.perf_counter()
        with local_ray(include_dashboard=False, log_to_driver=False):
            timings = {"ray_start_seconds": round(time.perf_counter() - ray_begin, 3)}
            served, identity, first, reload = serve_and_reload(options, step0, step1, prompt,
                                                               timings)
        checks = [check(step, prompt, s) for step, s in zip((step0, step1), served, strict=True)]
    return summary(options, timings, first, reload, checks, identity, served[1][0].version)


def serve_and_reload(options: DemoOptions, step0: Path, step1: Path, prompt: torch.Tensor,
                     timings: dict[str, float]
                     ) -> tuple[list[Rollouts], list[Any], ReloadReport, ReloadReport]:
    """Start the engine on step 0, generate, reload step 1 in place, generate again (a
    fixed number of greedy tokens: the random demo model has no meaningful EOS)."""
    begin = time.perf_counter()
    with ReloadOrchestrator(demo_config(options, step0)) as orch:
        timings["start_seconds"] = round(time.perf_counter() - begin, 3)
        served = [orch.generate(prompt, NEW_TOKENS, ignore_eos=True)]
        identity = [orch.inspect()]
        reload = orch.reload(str(step1))
        identity.append(orch.inspect())
        served.append(orch.generate(prompt, NEW_TOKENS, ignore_eos=True))
        return served, identity, orch.load_report, reload


def summary(options: DemoOptions, timings: dict[str, float], first: ReloadReport,
            reload: ReloadReport, checks: list[dict[str, Any]],
            identity: list[Any], rollout_version: int) -> dict[str, Any]:
    """The demo's result: what was served before and after the reload, and whether it
    matches transformers."""
    same_tensors = identity[0] == identity[1]
    exact = options.quantization is None and options.kv_cache_dtype == "auto"
    # A quantized engine is compared with the unquantized model: the error is reported, and
    # only a broken engine (log-probs off by nats, NaN) fails the demo.
    numerics_ok = all(c["tokens_match"] and c["logprob_error"] <= 1e-4 for c in checks) \
        if exact else all(c["logprob_error"] < 2.0 for c in checks)
    return {
        "engine": options.engine,
        "model": DEMO_MODELS[options.model][2],
        "quantization": options.quantization,
        "kv_cache_dtype": options.kv_cache_dtype,
        "exact": exact,
        "layers": options.num_layers,
        "tensor_parallel_size": options.tensor_parallel_size,
        **timings,
        "source_bytes": first.source_bytes,
        "bytes_read_per_rank": {f"engine{e}/rank{r}": b for (e, r), b in first.bytes_read.items()},
        "kernel_tensors": sum(len(rank) for rank in identity[0]),
        "logprob_max_abs_error_vs_transformers": checks[0]["logprob_error"],
        "greedy_tokens_match_transformers": checks[0]["tokens_match"],
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
            "rollout_version": rollout_version,
            "logprob_max_abs_error_vs_transformers": checks[1]["logprob_error"],
            "greedy_tokens_match_transformers": checks[1]["tokens_match"],
            "warnings": reload.warnings,
            "expert_layers_share": dict(zip(("bytes", "seconds"), reload.share("experts"),
                                            strict=True)),
        },
        "ok": numerics_ok and same_tensors and rollout_version == 1,
    }


def check(path: Path, prompt: torch.Tensor, served: Rollouts) -> dict[str, Any]:
    """Served greedy tokens vs transformers', and their served log-probs vs transformers'
    log-probs of the same tokens."""
    tokens, logprobs, _ = served.padded()
    expected = transformers_logprobs(path, prompt, tokens)
    return {"tokens_match": bool(torch.equal(tokens,
                                             transformers_greedy(path, prompt, NEW_TOKENS))),
            "logprob_error": (logprobs - expected).abs().max().item()}


def format_summary(result: dict[str, Any]) -> str:
    mb = 1e6
    reload = result["reload"]
    bound = " (bound 1e-4)" if result["exact"] else " (quantized vs unquantized transformers)"
    lines = [
        f"tp-reload demo: {result['engine']} engine, {result['model']}, {result['layers']} "
        f"layers, TP={result['tensor_parallel_size']} (one Ray actor per rank), "
        f"quantization={result['quantization']}, kv_cache_dtype={result['kv_cache_dtype']}",
        f"  local Ray up in {result['ray_start_seconds']:.2f}s; engine up (placement, process "
        f"group, engine build, first load) in {result['start_seconds']:.2f}s, serving "
        "version 0",
        f"  step0: {result['source_bytes'] / mb:.2f} MB; bytes read per rank: "
        + ", ".join(f"{r} {b / mb:.2f} MB" for r, b in result["bytes_read_per_rank"].items()),
        f"  step0 served log-probs vs transformers: max |error| "
        f"{result['logprob_max_abs_error_vs_transformers']:.2e}{bound}; greedy tokens match: "
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
        f"  step1 served log-probs vs transformers: max |error| "
        f"{reload['logprob_max_abs_error_vs_transformers']:.2e}; greedy tokens match: "
        f"{reload['greedy_tokens_match_transformers']}; rollouts tagged version "
        f"{reload['rollout_version']}",
    ]
    lines += [f"  warning: {w}" for w in reload["warnings"]]
    lines.append("  OK" if result["ok"] else "  MISMATCH")
    return "\n".join(lines)
