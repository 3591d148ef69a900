"""Benchmark checkpoints: Llama-family models (and, for the rank benchmark, a Qwen3-MoE one)
written with transformers, sharded, bf16, cached in a work directory so repeated runs reuse
them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("tp_reload.bench")

SCRATCH_PREFIX = "tp-reload-bench-scratch-"
"""A benchmark run's own temporary directory (torch's Inductor cache), removed at its end."""

# name -> (LlamaConfig fields, max shard size)
SIZES: dict[str, tuple[dict, str]] = {
    # The tests' size: every case and row of the quick run, a quarter of the bytes.
    "tiny": (dict(vocab_size=4000, hidden_size=256, intermediate_size=768,
                  num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4), "5MB"),
    "quick": (dict(vocab_size=8000, hidden_size=512, intermediate_size=1536,
                   num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4), "20MB"),
    "0.1b": (dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                  num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4), "60MB"),
    "0.5b": (dict(vocab_size=32000, hidden_size=1024, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4), "200MB"),
    "1b": (dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=8), "400MB"),
}

MOE_SIZES: dict[str, tuple[dict, str]] = {
    # Qwen3-MoE, every layer sparse: 8 experts of width 512, top-2; the experts hold 61% of
    # the bytes. For the expert methods' share of a rank's reload (``benchmarks.rank_bench``).
    "moe-0.25b": (dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                       moe_intermediate_size=512, num_experts=8, num_experts_per_tok=2,
                       num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                       head_dim=64, norm_topk_prob=True), "200MB"),
}
"""name -> (Qwen3MoeConfig fields, max shard size)."""


def parameter_count(fields: dict) -> int:
    h, i, v, n = (fields[k] for k in ("hidden_size", "intermediate_size", "vocab_size",
                                       "num_hidden_layers"))
    kv = h // fields["num_attention_heads"] * fields["num_key_value_heads"]
    return n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + 2 * v * h + h


def ensure_checkpoint(workdir: Path, size: str, seed: int = 0) -> Path:
    """The cached checkpoint of ``size`` (a name of ``SIZES`` or ``MOE_SIZES``); written with
    transformers on first use."""
    import transformers

    moe = size in MOE_SIZES
    fields, shard = (MOE_SIZES if moe else SIZES)[size]
    family, config_class, model_class = (
        ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM") if moe else
        ("llama", "LlamaConfig", "LlamaForCausalLM"))
    path = workdir / f"{family}-{size}-seed{seed}"
    if (path / "model.safetensors.index.json").is_file() or (path / "model.safetensors").is_file():
        return path
    # parameter_count knows the dense layout only.
    log.warning("writing the %s benchmark checkpoint%s to %s", size,
                "" if moe else f" ({parameter_count(fields) / 1e9:.2f}B parameters)", path)
    config = getattr(transformers, config_class)(**fields, max_position_embeddings=4096,
                                                 tie_word_embeddings=False)
    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.save_pretrained(path, max_shard_size=shard)
    return path


def half_depth(path: Path) -> Path:
    """The same model with only its first half of layers (the depth comparison)."""
    target = path.with_name(path.name + "-half")
    config = json.loads((path / "config.json").read_text())
    keep = config["num_hidden_layers"] // 2
    if (target / "config.json").is_file():
        return target
    target.mkdir(parents=True)
    weight_map = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors = {n: t for n, t in load_file(file).items()
                   if ".layers." not in n or int(n.split(".layers.")[1].split(".")[0]) < keep}
        if tensors:
            save_file(tensors, target / file.name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file.name))
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (target / "config.json").write_text(json.dumps({**config, "num_hidden_layers": keep}))
    return target


FIXED_COST_TENSOR = "model.norm.weight"
"""The one tensor of ``one_tensor``: a few KB, so a reload of it is all fixed cost."""


def one_tensor(path: Path) -> Path:
    """A checkpoint dir holding only the final norm of ``path``: a partial reload of it
    measures what every reload pays whatever its size (calls, planning, commit)."""
    target = path.with_name(path.name + "-one-tensor")
    if (target / "model.safetensors").is_file():
        return target
    target.mkdir(parents=True)
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file)
        if FIXED_COST_TENSOR in tensors:
            save_file({FIXED_COST_TENSOR: tensors[FIXED_COST_TENSOR]},
                      target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text((path / "config.json").read_text())
    return target
