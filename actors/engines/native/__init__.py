"""The native engine: model specs from config.json, parallel layers, decoder families, its
side of the reload interface (``reloadable``) and its rank runtime (``runtime``)."""

from __future__ import annotations

import torch

from actors.engines.native.decoder import DecoderForCausalLM, map_checkpoint_name
from actors.engines.native.layers import KVCache
from actors.engines.native.parallel import TPGroup, place_buffers
from actors.engines.native.spec import FAMILIES, ModelSpec, check_tp, load_spec, padded_vocab
from quant import QuantConfig


def build_model(spec: ModelSpec, *, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                quant: QuantConfig | None = None) -> DecoderForCausalLM:
    """This rank's shard with parameters on meta (no memory) and computed buffers on
    ``device``. Parameters are materialized on ``device`` layer by layer as the first load
    fills them (``actors.reload``)."""
    with torch.device("meta"):
        model = DecoderForCausalLM(spec, dtype=dtype, tp=tp, quant=quant)
    place_buffers(model, device)
    return model


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
]
