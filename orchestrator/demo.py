"""The embedded default job (``tp-reload demo`` / ``make demo``): a small random Llama-family
checkpoint written with transformers, served by a TP engine on a local Ray, checked against
transformers."""

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


def write_demo_checkpoint(path: Path, num_layers: int, seed: int) -> None:
    """A random Llama 3-style model (llama3 rope scaling, GQA), sharded into several files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=num_layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
    )
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="1MB")


def reference_outputs(path: Path, prompt: torch.Tensor, new_tokens: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(prompt).logits
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return logits, tokens


def run_demo(options: DemoOptions) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tp-reload-demo-") as tmp:
        path = Path(tmp) / "step0"
        write_demo_checkpoint(path, options.num_layers, options.seed)
        prompt = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(options.seed))
        ref_logits, ref_tokens = reference_outputs(path, prompt, 8)
        cfg = EngineConfig(model=str(path), tensor_parallel_size=options.tensor_parallel_size,
                           dtype="float32", num_cpus_per_rank=options.num_cpus_per_rank)
        ray_begin = time.perf_counter()
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        ray_seconds = time.perf_counter() - ray_begin
        begin = time.perf_counter()
        with ReloadOrchestrator(cfg) as orch:
            started = time.perf_counter() - begin
            logits = orch.forward(prompt)
            tokens = orch.generate(prompt, max_new_tokens=8)
            report = orch.load_report
            kernel_tensors = sum(len(rank) for rank in orch.inspect())
            version = orch.version
    error = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    return {
        "model": "LlamaForCausalLM (random, llama3 rope, GQA 8/2)",
        "layers": options.num_layers,
        "tensor_parallel_size": options.tensor_parallel_size,
        "version": version,
        "ray_start_seconds": round(ray_seconds, 3),
        "start_seconds": round(started, 3),
        "checkpoint_bytes": report.checkpoint_bytes,
        "bytes_read_per_rank": {f"engine{e}/rank{r}": b for (e, r), b in sorted(report.bytes_read.items())},
        "kernel_tensors": kernel_tensors,
        "logits_rel_l2_error_vs_transformers": error,
        "greedy_tokens_match_transformers": bool(torch.equal(tokens, ref_tokens)),
        "ok": error <= 1e-4 and bool(torch.equal(tokens, ref_tokens)),
    }


def format_summary(result: dict[str, Any]) -> str:
    lines = [
        f"tp-reload demo: {result['model']}, {result['layers']} layers, "
        f"TP={result['tensor_parallel_size']}",
        f"  local Ray up in {result['ray_start_seconds']:.2f}s; engine up (placement, process "
        f"group, first load) in {result['start_seconds']:.2f}s, "
        f"serving version {result['version']}",
        f"  checkpoint {result['checkpoint_bytes'] / 1e6:.2f} MB; bytes read per rank:",
    ]
    for rank, nbytes in result["bytes_read_per_rank"].items():
        share = nbytes / result["checkpoint_bytes"]
        lines.append(f"    {rank}: {nbytes / 1e6:.2f} MB ({share:.0%} of the checkpoint)")
    lines += [
        f"  {result['kernel_tensors']} kernel tensors across ranks",
        f"  logits vs transformers: relative L2 error {result['logits_rel_l2_error_vs_transformers']:.2e}"
        " (bound 1e-4)",
        f"  greedy 8 tokens match transformers: {result['greedy_tokens_match_transformers']}",
        "  OK" if result["ok"] else "  MISMATCH",
    ]
    return "\n".join(lines)
