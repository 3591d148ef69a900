"""Decoder-only causal LM (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral), tensor-parallel,
HF parameter names.

Module names mirror the Hugging Face checkpoints (``model.layers.3.self_attn...``) except for
the fused parameters: q/k/v land in ``self_attn.qkv_proj``, gate/up in ``mlp.gate_up_proj``
(``STACKED_PARAMS``) and every expert of a MoE layer in ``<block>.experts.w13_weight`` /
``w2_weight`` (``EXPERT_NAME``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from actors.engines.native.layers import MLP, Attention, KVCache, LayerCache, RMSNorm
from actors.engines.native.moe import SparseMoeBlock
from actors.engines.native.parallel import (
    ParallelLMHead,
    TPGroup,
    VocabParallelEmbedding,
    Weight,
    default_weight_loader,
)
from actors.engines.native.spec import ModelSpec, padded_vocab
from actors.reload.errors import ReloadError, UnknownTensorError
from quant import QuantConfig

# (fused param suffix, checkpoint suffix, shard id)
STACKED_PARAMS: tuple[tuple[str, str, Any], ...] = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)
# <block>.experts.<id>.<projection>.weight, e.g. mlp.experts.7.gate_proj.weight
EXPERT_NAME = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)
# Attention scales: (checkpoint suffix, param suffix on the attention module). q and
# probability scales are never used (queries and probabilities stay in the engine dtype).
KV_SCALE_ALIASES = (
    (".self_attn.k_proj.output_scale", ".self_attn.k_scale"),
    (".self_attn.v_proj.output_scale", ".self_attn.v_scale"),
    (".self_attn.k_scale", ".self_attn.k_scale"),
    (".self_attn.v_scale", ".self_attn.v_scale"),
)
UNUSED_SCALES = (".self_attn.q_proj.output_scale", ".self_attn.q_scale",
                 ".self_attn.prob_output_scale", ".self_attn.prob_scale")


def map_checkpoint_name(name: str, spec: ModelSpec, kv_scales: bool = False
                        ) -> tuple[str, Any] | None:
    """Checkpoint tensor name -> (model param name, shard id), or None when the engine does
    not keep it (rotary caches, a tied LM head, attention scales it does not use)."""
    if name.endswith(SKIPPED_SUFFIXES + UNUSED_SCALES):
        return None
    if spec.tie_word_embeddings and name == "lm_head.weight":
        return None
    for alias, target in KV_SCALE_ALIASES:
        if name.endswith(alias):
            return (name[: -len(alias)] + target, None) if kv_scales else None
    expert = EXPERT_NAME.search(name) if spec.moe is not None else None
    if expert is not None:
        shard = dict(spec.moe.expert_shards).get(expert.group(2))
        if shard is None:
            return name, None  # no such projection: reported as unknown
        param = "w2_weight" if shard == "w2" else "w13_weight"
        return f"{name[: expert.start()]}.experts.{param}", (int(expert.group(1)), shard)
    for fused, ckpt, shard_id in STACKED_PARAMS:
        if ckpt in name:
            return name.replace(ckpt, fused), shard_id
    return name, None


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, index: int, dtype: torch.dtype, tp: TPGroup,
                 quant: QuantConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.self_attn = Attention(spec, index, dtype, tp, quant)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        # The feed-forward module keeps its checkpoint name (mlp, or Mixtral's
        # block_sparse_moe) so parameter names stay those of the checkpoint.
        sparse = spec.moe is not None and spec.moe.sparse_layers[index]
        self.ffn_name = spec.moe.block if sparse else "mlp"
        ffn = SparseMoeBlock(spec, dtype, tp, quant) if sparse else MLP(spec, dtype, tp, quant)
        self.add_module(self.ffn_name, ffn)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None
                ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return x + getattr(self, self.ffn_name)(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, tp: TPGroup,
                 quant: QuantConfig) -> None:
        super().__init__()
        vocab = padded_vocab(spec.vocab_size, tp.size)
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, vocab, spec.hidden_size,
                                                   dtype=dtype, tp=tp)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, i, dtype, tp, quant) for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)


class DecoderForCausalLM(nn.Module):
    """One TP rank's shard of the model. Built on meta (``actors.engines.native.build_model``); the
    reload engine materializes it layer by layer as the first load fills it."""

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype, tp: TPGroup,
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        quant = quant or QuantConfig()
        self.spec = spec
        self.kv_scales = quant.kv_cache_method().has_scales
        self.model = DecoderBody(spec, dtype, tp, quant)
        self.lm_head = ParallelLMHead(spec.vocab_size, padded_vocab(spec.vocab_size, tp.size),
                                      spec.hidden_size, dtype=dtype, tp=tp)
        if spec.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        """token_ids [B, T], positions [T] -> logits [B, T, vocab] (padding removed)."""
        x = self.model.embed_tokens(token_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions, None if cache is None else cache.layers[i])
        return self.lm_head(self.model.norm(x))

    def load_weights(self, weights: Iterable[tuple[str, Weight]]) -> dict[str, set[Any]]:
        """Route checkpoint tensors to fused params through their ``weight_loader``.

        Returns, per model param name, the shard ids written. Errors name the tensor."""
        params = dict(self.named_parameters(remove_duplicate=False))
        written: dict[str, set[Any]] = {}
        for name, weight in weights:
            target = map_checkpoint_name(name, self.spec, self.kv_scales)
            if target is None:
                continue
            param_name, shard_id = target
            param = params.get(param_name)
            if param is None:
                raise UnknownTensorError(
                    f"checkpoint tensor '{name}' does not match any model parameter")
            loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                if shard_id is None:
                    loader(param, weight)
                else:
                    loader(param, weight, shard_id)
            except ReloadError:
                raise
            except ValueError as exc:  # a loader's shape or shard check
                raise ReloadError(f"checkpoint tensor '{name}': {exc}") from exc
            written.setdefault(param_name, set()).add(shard_id)
        return written
