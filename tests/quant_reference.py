"""Independent reference quantizers and TP slicing for the quantization tests.

Restated from the documented formulas with numpy arithmetic (torch only for the bf16/fp8
casts numpy lacks), and built differently where possible: the W4A8 reference packs the
signed nibbles directly (two's complement) instead of biasing by 8 and converting.
"""

from __future__ import annotations

import math

import numpy as np
import torch

FP8 = torch.float8_e4m3fn


def _fp8(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.clip(values, -448.0, 448.0).astype(np.float32)).to(FP8)


def _scale(amax: np.ndarray) -> np.ndarray:
    return (np.maximum(amax.astype(np.float32), np.float32(1e-12)) / np.float32(448.0)
            ).astype(np.float32)


def fp8_reference(w: torch.Tensor, granularity: str) -> dict[str, torch.Tensor]:
    """Kernel tensors {weight, weight_scale} for fp8 at 'tensor' / 'channel' / 'block'."""
    a = w.float().numpy()
    if granularity == "tensor":
        scale = _scale(np.abs(a).max()).reshape(1)
        full = scale
    elif granularity == "channel":
        scale = _scale(np.abs(a).max(axis=1, keepdims=True))
        full = scale
    else:
        n, k = a.shape
        nb, kb = math.ceil(n / 128), math.ceil(k / 128)
        scale = np.zeros((nb, kb), dtype=np.float32)
        full = np.zeros_like(a)
        for i in range(nb):
            for j in range(kb):
                block = a[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                scale[i, j] = _scale(np.abs(block).max())
                full[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = scale[i, j]
    return {"weight": _fp8(a / full), "weight_scale": torch.from_numpy(scale)}


def fp8_dequantize(kernel: dict[str, torch.Tensor], granularity: str) -> torch.Tensor:
    q = kernel["weight"].float().numpy()
    scale = kernel["weight_scale"].numpy()
    if granularity == "block":
        scale = np.kron(scale, np.ones((128, 128), dtype=np.float32))[: q.shape[0], : q.shape[1]]
    return torch.from_numpy(q * scale)


def w4a8_reference(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Kernel tensors {weight_packed [K/8, N] int32, weight_scale fp8 [N, G],
    weight_chan_scale [N, 1]}."""
    a = w.float().numpy()
    n, k = a.shape
    groups = math.ceil(k / 128)
    amax = np.stack([np.abs(a[:, g * 128:(g + 1) * 128]).max(axis=1) for g in range(groups)], 1)
    bf16 = torch.from_numpy((np.maximum(amax, np.float32(1e-12)) / np.float32(7.0))
                            .astype(np.float32)).to(torch.bfloat16).float().numpy()
    per_element = np.repeat(bf16, 128, axis=1)[:, :k]
    q = np.clip(np.rint(a / per_element), -8, 7).astype(np.int64)
    nibbles = (q & 0xF).astype(np.uint64).reshape(n, k // 8, 8)
    words = np.zeros((n, k // 8), dtype=np.uint64)
    for i in range(8):
        words |= nibbles[:, :, i] << np.uint64(4 * i)
    packed = words.astype(np.uint32).view(np.int32)
    chan = _scale(np.abs(bf16).max(axis=1, keepdims=True))
    first = _fp8(bf16 / chan).float().numpy()
    fp8_scale = _fp8(first / np.float32(8.0))
    return {"weight_packed": torch.from_numpy(np.ascontiguousarray(packed.T)),
            "weight_scale": fp8_scale,
            "weight_chan_scale": torch.from_numpy(chan * np.float32(8.0))}


def w4a8_dequantize(kernel: dict[str, torch.Tensor]) -> torch.Tensor:
    packed = kernel["weight_packed"].numpy().T.view(np.uint32)
    n, words = packed.shape
    values = np.zeros((n, words * 8), dtype=np.float32)
    for i in range(8):
        nib = ((packed >> np.uint32(4 * i)) & np.uint32(0xF)).astype(np.int64)
        values[:, i::8] = np.where(nib >= 8, nib - 16, nib)
    scale = kernel["weight_scale"].float().numpy() * kernel["weight_chan_scale"].numpy()
    return torch.from_numpy(values * np.repeat(scale, 128, axis=1)[:, : words * 8])


def reference_kernel(w: torch.Tensor, method: str) -> dict[str, torch.Tensor]:
    if method == "w4a8":
        return w4a8_reference(w)
    return fp8_reference(w, {"fp8": "tensor", "fp8_per_channel": "channel",
                             "fp8_block": "block"}[method])


def dequantize(kernel: dict[str, torch.Tensor], method: str) -> torch.Tensor:
    if method == "w4a8":
        return w4a8_dequantize(kernel)
    return fp8_dequantize(kernel, {"fp8": "tensor", "fp8_per_channel": "channel",
                                   "fp8_block": "block"}[method])


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def rank_linears(tensors: dict[str, torch.Tensor], config: dict, tp: int, rank: int
                 ) -> dict[str, torch.Tensor]:
    """Model-format weight of every fused linear on ``rank``: q|k|v rows (KV heads
    replicated when tp exceeds them), gate|up rows, o/down columns."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // heads
    q_rows = heads // tp * hd
    kv_rows = max(1, kv // tp) * hd
    kv_rank = rank if tp <= kv else rank // (tp // kv)
    out = {}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        q = tensors[f"{p}.self_attn.q_proj.weight"][rank * q_rows:(rank + 1) * q_rows]
        k = tensors[f"{p}.self_attn.k_proj.weight"][kv_rank * kv_rows:(kv_rank + 1) * kv_rows]
        v = tensors[f"{p}.self_attn.v_proj.weight"][kv_rank * kv_rows:(kv_rank + 1) * kv_rows]
        out[f"{p}.self_attn.qkv_proj"] = torch.cat([q, k, v])
        inter = config["intermediate_size"] // tp
        gate = tensors[f"{p}.mlp.gate_proj.weight"][rank * inter:(rank + 1) * inter]
        up = tensors[f"{p}.mlp.up_proj.weight"][rank * inter:(rank + 1) * inter]
        out[f"{p}.mlp.gate_up_proj"] = torch.cat([gate, up])
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            w = tensors[f"{p}.{name}.weight"]
            cols = w.shape[1] // tp
            out[f"{p}.{name}"] = w[:, rank * cols:(rank + 1) * cols]
    return out


def fake_quantize_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    a = x.float().numpy()
    scale = _scale(np.abs(a).max(axis=-1, keepdims=True))
    return (_fp8(a / scale).float() * torch.from_numpy(scale)).to(x.dtype)


def rank_experts(tensors: dict[str, torch.Tensor], config: dict, tp: int, rank: int
                 ) -> dict[str, dict[str, torch.Tensor]]:
    """Per MoE layer (``<block>.experts``): this rank's model-format ``w13`` [E, 2I/tp, H]
    (its rows of every expert's gate, then up) and ``w2`` [E, H, I/tp] (its columns of
    down), from the per-expert checkpoint names of either family."""
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    rows = slice(rank * inter // tp, (rank + 1) * inter // tp)
    names = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
    layers: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        head, sep, tail = name.partition(".experts.")
        if not sep:
            continue
        expert, proj, _ = tail.split(".")
        role = next(r for r, aliases in names.items() if proj in aliases)
        layers.setdefault(f"{head}.experts", {}).setdefault(int(expert), {})[role] = tensor
    out = {}
    for layer, experts in layers.items():
        ordered = [experts[e] for e in sorted(experts)]
        out[layer] = {
            "w13": torch.stack([torch.cat([x["gate"][rows], x["up"][rows]]) for x in ordered]),
            "w2": torch.stack([x["down"][:, rows] for x in ordered]),
        }
    return out


def reference_expert_kernels(w: torch.Tensor, proj: str, method: str
                             ) -> dict[str, torch.Tensor]:
    """Each expert of [E, N, K] quantized on its own, stacked: ``{proj}_{kernel name}``."""
    per_expert = [reference_kernel(w[e], method) for e in range(w.shape[0])]
    return {f"{proj}_{name}": torch.stack([k[name] for k in per_expert])
            for name in per_expert[0]}
