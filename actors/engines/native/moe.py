"""Mixture-of-experts block (Qwen3-MoE, Mixtral): a replicated router and fused experts.

Every rank holds all experts, each cut to ``I/tp`` of its intermediate width (the vLLM
layout without expert parallelism): ``w13`` [E, 2*I/tp, H] fuses gate (w1) and up (w3)
rows, ``w2`` [E, H, I/tp] holds the down projection's columns. Checkpoint tensors arrive
one expert at a time and the loader takes ``shard_id = (expert_id, 'w1' | 'w3' | 'w2')``.
All experts of a layer are one module, so the reload engine treats them as one parent layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from actors.engines.native.parallel import (
    TPGroup,
    Weight,
    check_full_extent,
    copy_into,
    default_weight_loader,
    new_param,
)
from actors.engines.native.spec import ModelSpec
from quant import MoEMethod, QuantConfig

SHARDS = ("w1", "w3", "w2")


class ReplicatedLinear(nn.Module):
    """A full-precision linear every rank holds whole (the router: its logits pick experts,
    and vLLM keeps it unquantized too)."""

    def __init__(self, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = new_param((output_size, input_size), dtype,
                                weight_loader=default_weight_loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class FusedMoE(nn.Module):
    """All experts of one layer; forward returns the all-reduced sum over this rank's slice."""

    layer_kind = "experts"
    """Reports give the share of bytes and time spent on layers of this kind."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *,
                 dtype: torch.dtype, tp: TPGroup, quant_method: MoEMethod) -> None:
        super().__init__()
        self.tp = tp
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.intermediate_per_rank = intermediate_size // tp.size
        self.quant_method = quant_method
        quant_method.create_weights(
            self, num_experts=num_experts, hidden_size=hidden_size,
            intermediate_size_per_partition=self.intermediate_per_rank, params_dtype=dtype,
            weight_loader=self.weight_loader)

    def weight_loader(self, param: torch.Tensor, loaded: Weight, shard_id: Any = None) -> None:
        expert, shard = shard_id if isinstance(shard_id, tuple) else (None, shard_id)
        if shard not in SHARDS or not isinstance(expert, int):
            raise ValueError(f"expert weights need shard_id (expert_id, one of {SHARDS}), "
                             f"got {shard_id!r}")
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} does not exist: the model has "
                             f"{self.num_experts} experts per layer")
        size, start = self.intermediate_per_rank, self.tp.rank * self.intermediate_per_rank
        what = f"expert {expert} {shard} on rank {self.tp.rank}"
        if shard == "w2":  # [H, I]: this rank's input columns
            check_full_extent(loaded, 1, self.intermediate_size, f"expert {expert} w2")
            copy_into(param.data[expert], loaded.narrow(1, start, size), what)
            return
        check_full_extent(loaded, 0, self.intermediate_size, f"expert {expert} {shard}")
        offset = 0 if shard == "w1" else size  # gate rows, then up rows
        copy_into(param.data[expert].narrow(0, offset, size), loaded.narrow(0, start, size),
                   what)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
                ) -> torch.Tensor:
        return self.tp.all_reduce(self.quant_method.apply(self, x, topk_weights, topk_ids))


class SparseMoeBlock(nn.Module):
    """Router + experts. Routing follows both reference implementations: softmax in float32
    over the router logits, top-k, then (Mixtral always, Qwen3-MoE with norm_topk_prob)
    the k weights divided by their sum."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, tp: TPGroup,
                 quant: QuantConfig) -> None:
        super().__init__()
        moe = spec.moe
        assert moe is not None
        self.top_k = moe.top_k
        self.renormalize = moe.renormalize
        self.gate = ReplicatedLinear(spec.hidden_size, moe.num_experts, dtype)
        self.experts = FusedMoE(moe.num_experts, spec.hidden_size, moe.intermediate_size,
                                dtype=dtype, tp=tp, quant_method=quant.moe_method())

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (float32 weights, expert ids), both [T, top_k]."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.route(flat)
        return self.experts(flat, weights, ids).view(x.shape)
