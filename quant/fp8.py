"""Online FP8 (e4m3fn) weight quantization at three granularities.

Model format: the full-precision weight [N, K] of this rank (TP-sliced and fused exactly as
unquantized), so checkpoint loaders and shard rules are unchanged. Kernel format:
``weight`` float8_e4m3fn [N, K] and ``weight_scale`` float32, the dequantization multiplier:

  * ``fp8``             per tensor, [1]: one scale per rank per fused param (q|k|v share one);
  * ``fp8_per_channel`` per output row, [N, 1];
  * ``fp8_block``       per 128x128 block, [ceil(N/128), ceil(K/128)].

Arithmetic (the tests restate it independently, bit for bit):
  scale = max(amax(|W| over the group), 1e-12) / 448      (float32)
  q     = clamp(W.float() / scale, -448, 448).to(float8_e4m3fn)
Activation precision: weight-only. Forward dequantizes (q.float() * scale) to the engine
dtype and multiplies in that dtype; activations are never quantized.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from quant.base import LayerPolicy, UnquantizedLinearMethod, kernel_slots, register_result

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_AMAX = 1e-12
BLOCK = 128


CPU_CHUNK_ELEMENTS = 512 * 1024
"""Elements quantized at once on the CPU: the float32 temporary (2 MB) stays in cache and
its allocation is recycled. A whole-tensor temporary (40 MB for a 10M-element weight) is
mapped fresh and faulted in page by page on every call: 2-4x slower for the same bits."""


def quantize_fp8(w: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``scale`` (float32) broadcast against ``w``: per row block, the true division into one
    reused float32 buffer (w's float32 value is exact, so dividing w directly is the same
    arithmetic), the clamp in place and the cast straight into the result (``out``, fp8 of
    w's shape, or a new tensor). Elementwise, so the row blocks change no bit; on CUDA one
    block."""
    if out is None:
        out = torch.empty(w.shape, dtype=FP8, device=w.device)
    rows = w.shape[0] if w.is_cuda else max(1, CPU_CHUNK_ELEMENTS // max(1, w[0].numel()))
    per_row = scale.dim() == w.dim() and scale.shape[0] == w.shape[0] > 1
    buffer = torch.empty((min(rows, w.shape[0]), *w.shape[1:]), dtype=torch.float32,
                         device=w.device)
    for start in range(0, w.shape[0], rows):
        part = slice(start, start + rows)
        quotient = buffer[: out[part].shape[0]]
        torch.div(w[part], scale[part] if per_row else scale, out=quotient)
        out[part].copy_(quotient.clamp_(-FP8_MAX, FP8_MAX))
    return out


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    return amax.float().clamp(min=MIN_AMAX) / FP8_MAX


def abs_max(w: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """max |w| (exact: one of w's values), no |w| temporary. Over the whole tensor one
    min/max pass; along a dim separate amin and amax passes, because torch's CPU
    ``aminmax(dim=)`` runs about 5x slower than the two of them (0.6 against 3 GB/s, bf16)."""
    if dim is None:
        low, high = torch.aminmax(w)
    else:
        low, high = w.amin(dim=dim, keepdim=keepdim), w.amax(dim=dim, keepdim=keepdim)
    return torch.maximum(-low, high)


def pad_to_multiple(w: torch.Tensor, block: int, dims: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the trailing ``dims`` of ``w`` up to multiples of ``block`` (no copy when
    they already are): zeros never change an absolute maximum."""
    pads: list[int] = []
    for dim in sorted(dims, reverse=True):
        size = w.shape[dim]
        pads += [0, math.ceil(size / block) * block - size]
    return F.pad(w, pads) if any(pads) else w


def block_amax(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """amax over each ``block`` x ``block`` tile of a 2-D tensor (edge tiles partial)."""
    padded = pad_to_multiple(w, block, (0, 1))
    nb, kb = padded.shape[0] // block, padded.shape[1] // block
    tiles = padded.view(nb, block, kb, block)
    return torch.maximum(-tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3)))


def expand_blocks(scale: torch.Tensor, shape: torch.Size, block: int = BLOCK) -> torch.Tensor:
    """[nb, kb] block scales -> [N, K] element scales."""
    full = scale.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)
    return full[: shape[0], : shape[1]]


def group_scale(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """Scale tensor of a 2-D weight in its kernel shape ([1], [N, 1] or [nb, kb])."""
    if granularity == "tensor":
        return scale_from_amax(abs_max(w)).reshape(1)
    if granularity == "channel":
        return scale_from_amax(abs_max(w, dim=1, keepdim=True))
    return scale_from_amax(block_amax(w))


def element_scale(scale: torch.Tensor, shape: torch.Size, granularity: str) -> torch.Tensor:
    """A kernel-shaped scale broadcastable against the [N, K] weight."""
    return expand_blocks(scale, shape) if granularity == "block" else scale


def quantize_weight(w: torch.Tensor, granularity: str, out: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D weight -> (fp8 weight, written into ``out`` when given; float32 scale), on
    ``w``'s device."""
    scale = group_scale(w, granularity)
    return quantize_fp8(w, element_scale(scale, w.shape, granularity), out), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, granularity: str,
                      dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * element_scale(scale, q.shape, granularity)).to(dtype)


class Fp8LinearMethod(UnquantizedLinearMethod):
    """Reuses the unquantized model format (create_weights); converts it on processing."""

    name = "fp8"
    policy = LayerPolicy(screened_params=("weight",))
    granularity = "tensor"

    def has_nonfinite(self, layer: nn.Module) -> bool:
        # Every element feeds some amax, and NaN/Inf propagate through amax and the scale.
        return not bool(torch.isfinite(layer.weight_scale).all())

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.process_weights_into(layer, {})

    def process_weights_into(self, layer: nn.Module, kernel: Mapping[str, torch.Tensor]
                             ) -> None:
        weight = layer.weight.data
        # The ranks' fused full-precision weight is quantized as one tensor (q|k|v together),
        # its fp8 values straight into the served weight when there is one: no fp8 copy.
        kernel, slots = kernel_slots(kernel, {"weight": (weight.shape, FP8)})
        qweight, scale = quantize_weight(weight, self.granularity, slots["weight"])
        register_result(layer, "weight", qweight, kernel)
        register_result(layer, "weight_scale", scale, kernel)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = dequantize_weight(layer.weight, layer.weight_scale, self.granularity, x.dtype)
        return F.linear(x, w, bias)


class Fp8PerChannelLinearMethod(Fp8LinearMethod):
    name = "fp8_per_channel"
    granularity = "channel"


class Fp8BlockLinearMethod(Fp8LinearMethod):
    name = "fp8_block"
    granularity = "block"
