"""W4A8: symmetric int4 weights in groups of 128 along K, FP8 activations.

Model format: the full-precision weight [N, K] of this rank (shard rule as unquantized; K of a
rank's slice must be a multiple of 8 to pack). ``process_weights_after_loading``:

  1. group scales   s = bf16(max(amax(|W| per row, per 128 along K), 1e-12) / 7)  [N, G]
  2. int4 values    q = clamp(round_half_even(W.float() / s.float()), -8, 7)
  3. pack           u = q + 8 (uint4b8), 8 per int32 along K, nibble i at bits 4i: [N, K/8]
  4. in place       nibble u -> u - 8 as signed int4 (two's complement: XOR 0x8 per nibble)
  5. reorder        kernel layout [K/8, N] (K-major per output column), on another stream,
                    ordered after step 4 by DeviceSync (seed 004's race: without the ordering
                    the reorder can read nibbles not yet converted)
  6. scales -> FP8  per output row r of s: c_r = max(amax(s[r]), 1e-12) / 448,
                    f = fp8(s / c_r); then f = fp8(f.float() / 8) and c = c * 8 (seed 004)
Kernel tensors: ``weight_packed`` int32 [K/8, N], ``weight_scale`` float8_e4m3fn [N, G],
``weight_chan_scale`` float32 [N, 1]. The dequantized weight is q * f.float() * c.

Activation precision: A8. Each token's activation row is quantized to FP8 on the fly
(per-token dynamic scale amax / 448) and dequantized before the matmul in the engine dtype,
so the numerics are those of an FP8-activation kernel. Under TP each rank quantizes the
input it holds: a row-parallel layer's per-token scale covers only the rank's slice of K.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from quant.base import LayerPolicy, UnquantizedLinearMethod, kernel_slots, register_result
from quant.fp8 import FP8, FP8_MAX, MIN_AMAX, abs_max, pad_to_multiple
from quant.sync import DeviceSync

GROUP = 128
NIBBLES = 8
# 0x88888888 as a signed int32: flips the top bit of every nibble (u -> u - 8 mod 16).
SIGN_FLIP = -0x77777778


def group_scales(w: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """[..., N, K] -> bf16 [..., N, ceil(K/group)]."""
    padded = pad_to_multiple(w, group, (w.dim() - 1,))
    amax = abs_max(padded.view(*w.shape[:-1], -1, group), dim=-1).float()
    return (amax.clamp(min=MIN_AMAX) / 7.0).to(torch.bfloat16)


def expand_groups(scale: torch.Tensor, k: int, group: int = GROUP) -> torch.Tensor:
    return scale.repeat_interleave(group, dim=-1)[..., :k]


def quantize_int4(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int32 values in [-8, 7]."""
    ratio = w.float() / expand_groups(scale.float(), w.shape[-1])
    return torch.round(ratio).clamp(-8, 7).to(torch.int32)


def pack_uint4b8(q: torch.Tensor) -> torch.Tensor:
    """[..., K] int4 values -> [..., K/8] int32, each nibble holding q + 8."""
    if q.shape[-1] % NIBBLES:
        raise ValueError(f"W4A8 packs 8 values per int32: K={q.shape[-1]} is not a multiple of 8")
    u = (q + 8).to(torch.int64).view(*q.shape[:-1], -1, NIBBLES)
    shifts = torch.arange(0, 4 * NIBBLES, 4, device=q.device, dtype=torch.int64)
    word = (u << shifts).sum(dim=-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def convert_uint4b8_to_signed_inplace(packed: torch.Tensor) -> torch.Tensor:
    """Step 4, in place: every nibble u (biased by 8) becomes the int4 u - 8."""
    return packed.bitwise_xor_(SIGN_FLIP)


def reorder_for_kernel(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Step 5: [..., N, K/8] -> [..., K/8, N] contiguous, into ``out`` when given."""
    if out is None:
        return packed.transpose(-1, -2).contiguous()
    return out.copy_(packed.transpose(-1, -2))


def unpack_signed(packed_kn: torch.Tensor) -> torch.Tensor:
    """Kernel layout [..., K/8, N] -> int32 values [..., N, K]."""
    packed = packed_kn.transpose(-1, -2)
    shifts = torch.arange(0, 4 * NIBBLES, 4, device=packed.device, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    signed = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return signed.reshape(*packed.shape[:-1], -1)


def convert_bf16_scales_to_fp8(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 6. [..., G] bf16 -> (fp8 [..., G], float32 channel scales [..., 1])."""
    shape = scales.shape
    flat = scales.float().reshape(-1, shape[-1])
    chan = flat.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
    fp8 = (flat / chan).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    fp8 = (fp8.float() / 8.0).to(FP8)
    chan = chan * 8.0
    # view(*shape[:-1], -1): PyTorch >= 2.11 rejects view(tuple, int) (seed 004).
    return fp8.view(*shape), chan.view(*shape[:-1], -1)


def quantize_w4a8(w: torch.Tensor, sync: DeviceSync, into: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-6 on ``w``'s device; returns (weight_packed, weight_scale, weight_chan_scale),
    the packed weight reordered straight into ``into`` when given (a served kernel tensor:
    the reorder stream runs after everything queued on the current one before this call)."""
    scale = group_scales(w)
    current, convert, reorder = sync.current(), sync.new_stream(), sync.new_stream()
    sync.order(current, convert, w, scale)
    with sync.on(convert):
        packed = pack_uint4b8(quantize_int4(w, scale))
        convert_uint4b8_to_signed_inplace(packed)
    sync.order(convert, reorder, packed)  # the in-place conversion before the reorder reads it
    with sync.on(reorder):
        kernel = reorder_for_kernel(packed, into)
    fp8_scale, chan_scale = convert_bf16_scales_to_fp8(scale)
    sync.order(reorder, current, kernel)  # results before the caller's copy into kernel tensors
    return kernel, fp8_scale, chan_scale


def dequantize_w4a8(packed_kn: torch.Tensor, fp8_scale: torch.Tensor, chan_scale: torch.Tensor
                    ) -> torch.Tensor:
    q = unpack_signed(packed_kn).float()
    scale = expand_groups(fp8_scale.float() * chan_scale, q.shape[-1])
    return q * scale


def fake_quantize_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """A8: each row of ``x`` through FP8 with its own dynamic scale, back to x's dtype."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
    x8 = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return (x8.float() * scale).to(x.dtype)


class W4A8LinearMethod(UnquantizedLinearMethod):
    """Reuses the unquantized model format (create_weights); converts it on processing."""

    name = "w4a8"
    policy = LayerPolicy(screened_params=("weight",))

    def has_nonfinite(self, layer: nn.Module) -> bool:
        # NaN/Inf reach the group scale's amax, then the per-channel amax of those scales.
        return not bool(torch.isfinite(layer.weight_chan_scale).all())

    def create_weights(self, layer: nn.Module, *, input_size_per_partition: int,
                       **kwargs) -> None:
        if input_size_per_partition % NIBBLES:
            raise ValueError(
                f"w4a8 packs 8 int4 values per int32 along K: {type(layer).__name__} has "
                f"{input_size_per_partition} input features per rank, not a multiple of 8")
        super().create_weights(layer, input_size_per_partition=input_size_per_partition,
                               **kwargs)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.process_weights_into(layer, {})

    def process_weights_into(self, layer: nn.Module, kernel: Mapping[str, torch.Tensor]
                             ) -> None:
        weight = layer.weight.data
        # The packed weight is reordered straight into the served one when there is one.
        n, k = weight.shape
        kernel, slots = kernel_slots(
            kernel, {"weight_packed": (torch.Size((k // NIBBLES, n)), torch.int32)})
        packed, fp8_scale, chan_scale = quantize_w4a8(weight, DeviceSync(weight.device),
                                                      slots["weight_packed"])
        del layer._parameters["weight"]
        register_result(layer, "weight_packed", packed, kernel)
        register_result(layer, "weight_scale", fp8_scale, kernel)
        register_result(layer, "weight_chan_scale", chan_scale, kernel)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = dequantize_w4a8(layer.weight_packed, layer.weight_scale, layer.weight_chan_scale)
        return F.linear(fake_quantize_fp8_per_token(x), w.to(x.dtype), bias)
