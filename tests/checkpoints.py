"""Small random checkpoints written with transformers, one per family, each exercising one
of the awkward shapes the runtime must handle. Transformers is the independent oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

# family -> (config class name, model class name, config overrides, save options)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
    # llama3 rope scaling; vocab 251 divides neither 2 nor 4; sharded into several files.
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=251,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}),
        dict(max_shard_size="60KB")),
    # sliding window shorter than the test prompts.
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(vocab_size=128, sliding_window=6,
                                                           head_dim=16), {}),
    # q/k/v bias, tied embeddings.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(vocab_size=130, tie_word_embeddings=True),
              {}),
    # q/k norms, explicit head_dim with heads * head_dim != hidden_size.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(vocab_size=128, head_dim=32), {}),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights around 1, biases non-zero), so a tensor loaded
    into the wrong place cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            param.copy_(noise + 1.0 if "norm" in name else noise * 1.5)


def write_checkpoint(path: Path, family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     **overrides: Any) -> Path:
    import transformers

    config_name, model_name, config_kwargs, save_kwargs = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**BASE, **config_kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    randomize(model, seed)
    model.to(dtype).save_pretrained(path, **save_kwargs)
    return path


def reference_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def reference_logits(path: Path, token_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference_model(path)(token_ids).logits


def reference_generate(path: Path, token_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return reference_model(path).generate(
            token_ids, attention_mask=torch.ones_like(token_ids), max_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0,
        )


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()
