"""The one home of dtype facts: safetensors codes, torch dtypes, their names, and which
precisions an engine runs in (and converts a trainer's weights from)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype code -> torch dtype (every code a source may hold)."""

SAFETENSORS_CODES: dict[torch.dtype, str] = {d: c for c, d in SAFETENSORS_DTYPES.items()}

ENGINE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
"""Precisions an engine runs in; weights in any of them are converted on load."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'`` (``getattr(torch, name)`` turns it back)."""
    return str(dtype).removeprefix("torch.")


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor`` as a flat uint8 tensor (a view of it when it is contiguous):
    every dtype (bf16, fp8) is copied, sent and received as bytes."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors dtype code."""
    return SAFETENSORS_DTYPES[code].itemsize


ENGINE_DTYPE_NAMES: tuple[str, ...] = tuple(dtype_name(d) for d in ENGINE_DTYPES)


def view_in(buffer: Any, offset: int, dtype: torch.dtype, shape: tuple[int, ...]
            ) -> torch.Tensor:
    """The tensor stored at ``offset`` of ``buffer`` (a mapping), as a view: no copy. A
    read-only buffer gives a view that is only ever read (torch would warn about it)."""
    count = torch.Size(shape).numel() * dtype.itemsize
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=count, offset=offset)
    return raw.view(dtype).reshape(shape)
