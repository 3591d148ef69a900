"""Fused-expert (MoE) methods: the linear-method contract over all experts of one layer.

Model format (what checkpoint loaders write, one expert at a time): ``w13_weight``
[E, 2*I/tp, H] (gate rows then up rows of every expert) and ``w2_weight`` [E, H, I/tp], in
the engine dtype. Kernel format per method:

  * ``none``             unchanged;
  * ``fp8`` / ``fp8_per_channel`` / ``fp8_block``: each expert quantized on its own with the
    linear rule of ``quant.fp8``: ``{w}_weight`` fp8 [E, N, K] and ``{w}_weight_scale``
    float32 [E, 1] (one scale per expert per rank), [E, N, 1] or [E, ceil(N/128),
    ceil(K/128)];
  * ``w4a8``: each expert by the rule of ``quant.w4a8`` (int4 groups of 128, uint4b8 packed,
    converted to signed in place, reordered to [K/8, N] on another stream ordered by
    DeviceSync, bf16 group scales to FP8): ``{w}_weight_packed`` int32 [E, K/8, N],
    ``{w}_weight_scale`` fp8 [E, N, G], ``{w}_weight_chan_scale`` float32 [E, N, 1].

A reload's fp8 values and w4a8's reordered packed weights are written straight into the
tensors the layer serves from when they fit (``process_weights_into``), chunk by chunk.

Experts are processed in chunks of whole experts, so the float32 temporaries of a
conversion never exceed ``CHUNK_ELEMENTS`` however large the layer.

``apply`` runs the experts each token was routed to (the reference's loop: experts in
ascending order, results weighted and summed with ``index_add_``) and returns this rank's
partial sum; the caller all-reduces it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from quant.base import (
    LayerPolicy,
    WeightLoader,
    WeightProcessing,
    kernel_slots,
    register_result,
)
from quant.fp8 import FP8, dequantize_weight, quantize_weight
from quant.sync import DeviceSync
from quant.w4a8 import NIBBLES, dequantize_w4a8, fake_quantize_fp8_per_token, quantize_w4a8

PROJECTIONS = ("w13", "w2")
CHUNK_ELEMENTS = 1 << 24
"""Most model-format elements converted at once (64 MB of float32 temporaries)."""


def packed_shape(weight: torch.Tensor) -> torch.Size:
    """w4a8's kernel layout of experts [E, N, K]: [E, K/8, N]."""
    experts, n, k = weight.shape
    return torch.Size((experts, k // NIBBLES, n))


def expert_chunks(weight: torch.Tensor) -> list[slice]:
    """Ranges of whole experts of [E, N, K] holding at most CHUNK_ELEMENTS (one at least)."""
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, weight[0].numel()))
    return [slice(e, min(e + per_chunk, weight.shape[0]))
            for e in range(0, weight.shape[0], per_chunk)]


class MoEMethod(WeightProcessing, ABC):
    """How one fused-expert layer stores, converts and applies its weights."""

    def create_weights(self, layer: nn.Module, *, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       weight_loader: WeightLoader) -> None:
        """Register the model-format ``w13_weight`` and ``w2_weight`` on ``layer``."""
        inter = intermediate_size_per_partition
        shapes = {"w13": (num_experts, 2 * inter, hidden_size),
                  "w2": (num_experts, hidden_size, inter)}
        for proj, shape in shapes.items():
            param = nn.Parameter(torch.empty(shape, dtype=params_dtype), requires_grad=False)
            param.weight_loader = weight_loader
            layer.register_parameter(f"{proj}_weight", param)

    @abstractmethod
    def expert_weight(self, layer: nn.Module, proj: str, expert: int, dtype: torch.dtype
                      ) -> torch.Tensor:
        """Expert ``expert``'s [N, K] weight of projection ``proj`` in ``dtype``."""

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Activation precision of the expert matmuls (the engine dtype by default)."""
        return x

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], routing [T, top_k] -> this rank's partial output [T, H]."""
        out = torch.zeros_like(x)
        for expert in torch.unique(topk_ids).tolist():
            token, slot = torch.where(topk_ids == expert)
            gate_up = F.linear(self.quantize_input(x[token]),
                               self.expert_weight(layer, "w13", expert, x.dtype))
            gate, up = gate_up.chunk(2, dim=-1)
            y = F.linear(self.quantize_input(F.silu(gate) * up),
                         self.expert_weight(layer, "w2", expert, x.dtype))
            out.index_add_(0, token, (y * topk_weights[token, slot, None]).to(out.dtype))
        return out


class UnquantizedMoEMethod(MoEMethod):
    name = "none"
    policy = LayerPolicy(converts_weights=False)

    def expert_weight(self, layer: nn.Module, proj: str, expert: int, dtype: torch.dtype
                      ) -> torch.Tensor:
        return getattr(layer, f"{proj}_weight")[expert]


class Fp8MoEMethod(MoEMethod):
    """Weight-only FP8 per expert; forward dequantizes the experts a batch uses."""

    name = "fp8"
    granularity = "tensor"
    policy = LayerPolicy(screened_params=("w13_weight", "w2_weight"))

    def has_nonfinite(self, layer: nn.Module) -> bool:
        return not all(bool(torch.isfinite(getattr(layer, f"{p}_weight_scale")).all())
                       for p in PROJECTIONS)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.process_weights_into(layer, {})

    def process_weights_into(self, layer: nn.Module, kernel: Mapping[str, torch.Tensor]
                             ) -> None:
        kernel, slots = kernel_slots(kernel, {
            f"{proj}_weight": (getattr(layer, f"{proj}_weight").shape, FP8)
            for proj in PROJECTIONS})
        for proj in PROJECTIONS:
            weight = getattr(layer, f"{proj}_weight").data
            # Each expert's fp8 values straight into the served weight when there is one.
            qweight = slots[f"{proj}_weight"]
            if qweight is None:
                qweight = torch.empty(weight.shape, dtype=FP8, device=weight.device)
            scales = [quantize_weight(weight[expert], self.granularity, qweight.data[expert])[1]
                      for expert in range(weight.shape[0])]
            register_result(layer, f"{proj}_weight", qweight, kernel)
            register_result(layer, f"{proj}_weight_scale", torch.stack(scales), kernel)

    def expert_weight(self, layer: nn.Module, proj: str, expert: int, dtype: torch.dtype
                      ) -> torch.Tensor:
        return dequantize_weight(getattr(layer, f"{proj}_weight")[expert],
                                 getattr(layer, f"{proj}_weight_scale")[expert],
                                 self.granularity, dtype)


class Fp8PerChannelMoEMethod(Fp8MoEMethod):
    name = "fp8_per_channel"
    granularity = "channel"


class Fp8BlockMoEMethod(Fp8MoEMethod):
    name = "fp8_block"
    granularity = "block"


class W4A8MoEMethod(MoEMethod):
    """int4 experts with FP8 activations, converted chunk by chunk on side streams."""

    name = "w4a8"
    policy = LayerPolicy(screened_params=("w13_weight", "w2_weight"))

    def has_nonfinite(self, layer: nn.Module) -> bool:
        return not all(bool(torch.isfinite(getattr(layer, f"{p}_weight_chan_scale")).all())
                       for p in PROJECTIONS)

    def create_weights(self, layer: nn.Module, *, hidden_size: int,
                       intermediate_size_per_partition: int, **kwargs) -> None:
        for what, k in (("hidden_size (w13 input)", hidden_size),
                        ("moe_intermediate_size per rank (w2 input)",
                         intermediate_size_per_partition)):
            if k % NIBBLES:
                raise ValueError(f"w4a8 packs 8 int4 values per int32 along K: experts' {what} "
                                 f"is {k}, not a multiple of 8")
        super().create_weights(layer, hidden_size=hidden_size,
                               intermediate_size_per_partition=intermediate_size_per_partition,
                               **kwargs)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.process_weights_into(layer, {})

    def process_weights_into(self, layer: nn.Module, kernel: Mapping[str, torch.Tensor]
                             ) -> None:
        weights = {proj: getattr(layer, f"{proj}_weight").data for proj in PROJECTIONS}
        kernel, slots = kernel_slots(kernel, {
            f"{proj}_weight_packed": (packed_shape(weight), torch.int32)
            for proj, weight in weights.items()})
        for proj, weight in weights.items():
            sync, into = DeviceSync(weight.device), slots[f"{proj}_weight_packed"]
            # Each chunk's packed weight is reordered straight into its experts of the served
            # tensor when there is one; quantize_w4a8 orders its results before this stream.
            parts = [quantize_w4a8(weight[chunk], sync, None if into is None else into.data[chunk])
                     for chunk in expert_chunks(weight)]
            packed, fp8_scales, chan_scales = zip(*parts, strict=True)
            del layer._parameters[f"{proj}_weight"]
            register_result(layer, f"{proj}_weight_packed",
                            torch.cat(packed) if into is None else into, kernel)
            register_result(layer, f"{proj}_weight_scale", torch.cat(fp8_scales), kernel)
            register_result(layer, f"{proj}_weight_chan_scale", torch.cat(chan_scales), kernel)

    def expert_weight(self, layer: nn.Module, proj: str, expert: int, dtype: torch.dtype
                      ) -> torch.Tensor:
        return dequantize_w4a8(getattr(layer, f"{proj}_weight_packed")[expert],
                               getattr(layer, f"{proj}_weight_scale")[expert],
                               getattr(layer, f"{proj}_weight_chan_scale")[expert]).to(dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_fp8_per_token(x)
