"""Bit-identical, faster CPU paths for two of vLLM's online-quantization helpers, swapped in
only while our reload processes a layer (``cpu_fast_paths``). vLLM's own loads and its
``reload_weights`` keep vLLM's code, so the benchmark's peer and the tests' oracle engines
run the original.

* ``weight_amax(w, dim=...)``: vLLM takes ``aminmax(dim=)``, whose CPU kernel runs at about
  0.6 GB/s on bf16; separate ``amin`` and ``amax`` passes run at about 3 GB/s together. Both
  are exact reductions (NaN propagates through each), so the values are the same.
* ``_fp8_quant_per_channel`` divides in chunks of 16M elements: a 64 MB float32 temporary,
  mapped fresh and faulted in page by page for every chunk, then an fp8 temporary copied into
  the result. Ours is the native engine's quantizer (``quant.fp8.quantize_fp8``): 512K
  elements at a time (2 MB, cache-resident) into one reused buffer, clamped in place and cast
  straight into the result, 2-4x faster. Same true division, clamp and cast, elementwise, so
  no bit changes.

On CUDA nothing is swapped: there ``aminmax(dim=)`` is one fused pass and big chunks are
what the GPU wants.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from vllm.model_executor.layers.quantization.online import fp8 as online_fp8
from vllm.model_executor.layers.quantization.online import int8 as online_int8
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    weight_amax as vllm_weight_amax,
)

from quant.fp8 import FP8, FP8_MAX, abs_max, quantize_fp8

VLLM_QUANT_PER_CHANNEL = online_fp8._fp8_quant_per_channel
# The modules whose ``weight_amax`` (imported by name) the swap replaces.
AMAX_USERS: tuple[ModuleType, ...] = (online_fp8, online_int8)


def weight_amax(weight: torch.Tensor, *, dim: int | None = None, keepdim: bool = False
                ) -> torch.Tensor:
    """``vllm...quant_utils.weight_amax`` with the same result: max(|weight|)."""
    if dim is None:
        return vllm_weight_amax(weight)  # a whole-tensor aminmax is already fast
    return abs_max(weight, dim=dim, keepdim=keepdim)  # the native engine's amin/amax pair


def fp8_quant_per_channel(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``vllm...online.fp8._fp8_quant_per_channel`` with the same bits: the native engine's
    row-block quantizer (``quant.fp8.quantize_fp8``) does the same true division, clamp and
    cast, for vLLM's CPU fp8 format (e4m3fn, +-448; checked, or vLLM's own code runs)."""
    if (online_fp8.current_platform.fp8_dtype(), online_fp8.get_fp8_min_max()) != (
            FP8, (-FP8_MAX, FP8_MAX)):
        return VLLM_QUANT_PER_CHANNEL(weight, scale)
    return quantize_fp8(weight, scale)


@contextmanager
def cpu_fast_paths(device: torch.device) -> Iterator[None]:
    """Within: vLLM's online quantization on ``device`` uses the fast paths (CPU only)."""
    if device.type != "cpu":
        yield
        return
    saved: list[tuple[ModuleType, str, object]] = []
    swaps: list[tuple[ModuleType, str, object]] = [
        *((module, "weight_amax", weight_amax) for module in AMAX_USERS),
        (online_fp8, "_fp8_quant_per_channel", fp8_quant_per_channel)]
    try:
        for module, name, value in swaps:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)

