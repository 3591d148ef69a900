"""KV-cache storage methods and their attention scales.

``auto``: keys and values cached in the engine dtype; no scales.

``fp8``: keys and values stored as float8_e4m3fn, ``k = k_fp8 * k_scale`` (likewise v), so
the attention reads them back through FP8 whether they come from the cache or were just
computed. The attention layer owns two float32 scalar parameters, ``k_scale`` and
``v_scale``. Checkpoint names: ``self_attn.k_scale`` / ``self_attn.v_scale`` and the aliases
``self_attn.k_proj.output_scale`` / ``self_attn.v_proj.output_scale`` (``q_scale`` and
``prob_scale`` are not used: queries and probabilities stay in the engine dtype, so they are
skipped). Both are optional; a missing one is filled with -1 ("not loaded") and
``process_weights_after_loading`` resolves them:

  * both loaded: each keeps its value;
  * one loaded: it is used for both (a single scale describes the pair);
  * none loaded: 1.0.

The method's ``policy`` asks for its attention layer to be processed last, after every
linear layer, and re-resolved whenever its query/key/value projection is reloaded (the
``qkv`` role); the model declares both to the reload engine. New projections without new
scales go back to the defaults rather than keep scales measured for other weights. With
``kv_scales='calibrate'`` the engine instead measures amax(|k|), amax(|v|) per layer on a
calibration batch after each load (``observe`` / ``observed``; max over TP ranks) and sets
scale = amax / 448.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.base import LayerPolicy, WeightProcessing, mark_optional, replace_parameter
from quant.fp8 import FP8, FP8_MAX, MIN_AMAX

NOT_LOADED = -1.0
KV_SCALE_NAMES = ("k_scale", "v_scale")


def _scalar_loader(param: torch.Tensor, loaded, shard_id=None) -> None:
    """A scale arrives as shape [] or [1]; either fills the scalar parameter."""
    if tuple(loaded.shape) not in ((), (1,)):
        raise ValueError(f"a KV scale must be a scalar, checkpoint tensor has shape "
                         f"{tuple(loaded.shape)}")
    value = loaded if isinstance(loaded, torch.Tensor) else loaded.materialize()
    param.data.fill_(value.reshape(()))


class KVCacheMethod(WeightProcessing):
    """``auto``: the identity."""

    name = "auto"
    has_scales = False

    def __init__(self) -> None:
        self._amax: list[torch.Tensor] | None = None  # [k, v] while calibrating

    def observe(self, device: torch.device) -> None:
        """Calibrating: from now on, record amax(|k|) and amax(|v|) instead of quantizing."""
        self._amax = [torch.zeros((), device=device) for _ in range(2)]

    def observed(self) -> torch.Tensor:
        """Stop observing; [amax(|k|), amax(|v|)] seen since ``observe``."""
        assert self._amax is not None, "observe() first"
        amax, self._amax = torch.stack(self._amax), None
        return amax

    def create_weights(self, layer: nn.Module) -> None:
        """Register the model-format scale parameters on the attention layer."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Resolve loaded scales into their kernel form."""

    def encode(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores."""
        return k, v

    def decode(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention reads."""
        return k, v


class Fp8KVCacheMethod(KVCacheMethod):
    name = "fp8"
    has_scales = True
    policy = LayerPolicy(process_last=True, reset_with="qkv")

    def create_weights(self, layer: nn.Module) -> None:
        for name in KV_SCALE_NAMES:
            param = nn.Parameter(torch.empty((), dtype=torch.float32), requires_grad=False)
            param.weight_loader = _scalar_loader
            mark_optional(param, NOT_LOADED)
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        k, v = layer.k_scale.data, layer.v_scale.data
        k_loaded, v_loaded = k > 0, v > 0
        one = torch.ones((), dtype=torch.float32, device=k.device)
        k_final = torch.where(k_loaded, k, torch.where(v_loaded, v, one))
        v_final = torch.where(v_loaded, v, torch.where(k_loaded, k, one))
        replace_parameter(layer, "k_scale", k_final)
        replace_parameter(layer, "v_scale", v_final)

    def encode(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        observed = self._amax
        if observed is not None:
            # Calibrating: observe the model's own k/v and keep them unquantized, so the
            # measurement does not depend on the scales being replaced.
            observed[0] = torch.maximum(observed[0], k.detach().abs().amax().float())
            observed[1] = torch.maximum(observed[1], v.detach().abs().amax().float())
            return k, v
        return _to_fp8(k, layer.k_scale), _to_fp8(v, layer.v_scale)

    def decode(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if k.dtype != FP8:  # a calibration pass kept them unquantized
            return k, v
        return (k.float() * layer.k_scale).to(dtype), (v.float() * layer.v_scale).to(dtype)


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Calibration: amax [..., 2] -> scales with the same shape."""
    return amax.clamp(min=MIN_AMAX) / FP8_MAX
