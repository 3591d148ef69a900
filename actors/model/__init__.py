"""The TP shard runtime: model specs from config.json, parallel layers, decoder families."""

from __future__ import annotations

import torch

from actors.model.decoder import DecoderForCausalLM, map_checkpoint_name
from actors.model.layers import KVCache
from actors.model.parallel import TPGroup, materialize_module
from actors.model.spec import FAMILIES, ModelSpec, check_tp, load_spec, padded_vocab


def build_model(spec: ModelSpec, *, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                quantization: str | None = None) -> DecoderForCausalLM:
    """Build this rank's shard on meta (no memory), then materialize it on ``device``."""
    with torch.device("meta"):
        model = DecoderForCausalLM(spec, dtype=dtype, tp=tp, quantization=quantization)
    materialize_module(model, device)
    return model


def process_weights_after_loading(model: torch.nn.Module) -> None:
    """Model format -> kernel format for every layer that has a quant method."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


__all__ = [
    "FAMILIES",
    "DecoderForCausalLM",
    "KVCache",
    "ModelSpec",
    "TPGroup",
    "build_model",
    "check_tp",
    "load_spec",
    "map_checkpoint_name",
    "padded_vocab",
    "process_weights_after_loading",
]
