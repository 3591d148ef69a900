"""Decoder building blocks: RMSNorm, rotary embedding, TP attention with a KV cache, TP MLP.

Numerics follow the Hugging Face reference implementations (RMSNorm in float32, rotate-half
RoPE with float32 angles) so that float32 engines match transformers to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from actors.engines.native.parallel import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TPGroup,
    default_weight_loader,
    new_param,
)
from actors.engines.native.spec import ModelSpec, RopeSpec
from quant import QuantConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = new_param((size,), dtype, weight_loader=default_weight_loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """float32 [head_dim/2] on the CPU; llama3 smoothing per Meta's Llama 3.1 recipe."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type != "llama3":
        return inv_freq
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeSpec, head_dim: int) -> None:
        super().__init__()
        # Explicit CPU device: this is computed, never loaded, and moves with the layer.
        self.register_buffer("inv_freq", rope_inverse_frequencies(rope, head_dim), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [B, T, heads, head_dim]; positions: [T]."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((angles, angles), dim=-1)
        cos = emb.cos().to(q.dtype)[None, :, None, :]
        sin = emb.sin().to(q.dtype)[None, :, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@dataclass(slots=True)
class LayerCache:
    """Keys and values seen so far, [B, kv_heads, S, head_dim]."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


@dataclass(slots=True)
class KVCache:
    layers: list[LayerCache] = field(default_factory=list)

    @classmethod
    def empty(cls, num_layers: int) -> KVCache:
        return cls([LayerCache() for _ in range(num_layers)])


def attention_mask(q_positions: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
    """Boolean [T, S]: True where query may attend (causal, optionally windowed)."""
    k_positions = torch.arange(kv_len, device=q_positions.device)
    distance = q_positions[:, None] - k_positions[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed


class Attention(nn.Module):
    """TP attention. With a KV-cache method that has scales, this module owns them and is
    the 'attention layer' the reload engine finalizes after every linear layer."""

    def __init__(self, spec: ModelSpec, layer_index: int, dtype: torch.dtype, tp: TPGroup,
                 quant: QuantConfig) -> None:
        super().__init__()
        self.head_dim = spec.head_dim
        self.window = spec.sliding_windows[layer_index]
        self.qkv_proj = QKVParallelLinear(
            spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads,
            bias=spec.qkv_bias, dtype=dtype, quant_method=quant.linear_method(), tp=tp,
        )
        self.o_proj = RowParallelLinear(
            spec.num_heads * spec.head_dim, [spec.hidden_size], bias=spec.o_bias, dtype=dtype,
            quant_method=quant.linear_method(), tp=tp,
        )
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype) if spec.qk_norm else None
        self.rotary_emb = RotaryEmbedding(spec.rope, spec.head_dim)
        self.kv_cache_method = quant.kv_cache_method()
        self.kv_cache_method.create_weights(self)
        if self.kv_cache_method.has_scales:
            self.quant_method = self.kv_cache_method

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None
                ) -> torch.Tensor:
        batch, length, _ = x.shape
        q_size, kv_size, _ = self.qkv_proj.output_partition_sizes
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(batch, length, -1, self.head_dim)
        k = k.view(batch, length, -1, self.head_dim)
        v = v.view(batch, length, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(q, k, positions)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = self.kv_cache_method.encode(self, k, v)
        if cache is not None:
            k, v = cache.append(k, v)
        k, v = self.kv_cache_method.decode(self, k, v, q.dtype)
        mask = attention_mask(positions, k.shape[2], self.window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, tp: TPGroup,
                 quant: QuantConfig) -> None:
        super().__init__()
        size = spec.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            spec.hidden_size, [size, size], bias=spec.mlp_bias, dtype=dtype,
            quant_method=quant.linear_method(), tp=tp,
        )
        self.down_proj = RowParallelLinear(
            size, [spec.hidden_size], bias=spec.mlp_bias, dtype=dtype,
            quant_method=quant.linear_method(), tp=tp,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
