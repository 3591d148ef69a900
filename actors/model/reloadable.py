"""The native runtime's side of the reload interface (``actors.reload.ReloadableModel``).

Layers are recorded once, while the model is still on meta (``build_model``): each module
owning parameters is a layer, its meta parameters are the model-format placeholders, and
its quant or KV-cache method declares how it is processed (converts, screened params,
processed last with its ``qkv_proj``). ``route_on_meta`` routes a source for the planner on
meta copies of every rank, in the driver, with no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from actors.model.decoder import DecoderForCausalLM
from actors.model.parallel import TPGroup
from actors.model.spec import ModelSpec
from actors.reload import (
    LayerRecord,
    ReloadableModel,
    ReloadEngine,
    Routing,
    TensorSpec,
    in_processing_order,
    merge_routes,
    param_owners,
    route_rank,
)
from quant import QuantConfig


class NativeReloadable(ReloadableModel):
    # quant/ methods build new kernel tensors and keep nothing of the model format.
    reuses_scratch = True

    def __init__(self, model: DecoderForCausalLM, device: torch.device,
                 build: Callable[[], DecoderForCausalLM]) -> None:
        self.model = model
        self.device = device
        self._build = build
        """Builds the same model on meta again (``twin``)."""
        self._records = record_layers(model, device)

    def records(self) -> list[LayerRecord]:
        return self._records

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        self.model.load_weights(weights)

    def process(self, record: LayerRecord) -> None:
        method = getattr(record.module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(record.module)

    def has_nonfinite(self, record: LayerRecord) -> bool:
        return record.module.quant_method.has_nonfinite(record.module)

    def twin(self) -> NativeReloadable:
        return NativeReloadable(self._build(), self.device, self._build)


def record_layers(model: nn.Module, device: torch.device) -> list[LayerRecord]:
    """Every module owning parameters, recorded while on meta, in processing order."""
    owners = param_owners(model)
    records: list[LayerRecord] = []
    claimed: set[int] = set()
    for name, module in model.named_modules():
        own = {a: p for a, p in module._parameters.items()
               if p is not None and id(p) not in claimed}
        if not own:
            continue
        assert all(p.is_meta for p in own.values()), f"{name} must be recorded while on meta"
        claimed.update(id(p) for p in own.values())
        method = getattr(module, "quant_method", None)
        process_last = bool(getattr(method, "process_last", False))
        reset_with = getattr(method, "reset_with", None) if process_last else None
        records.append(LayerRecord(
            name=name, module=module, placeholders=own,
            owners={a: owners[id(p)] for a, p in own.items()}, restore_device=device,
            process_last=process_last,
            reset_with=f"{name}.{reset_with}" if reset_with else None,
            kind=getattr(module, "layer_kind", "dense"),
            # KV-cache methods always resolve their scales; linear methods say.
            converts=method is not None and bool(getattr(method, "converts_weights", True)),
            screened=tuple(getattr(method, "screened_params", ())),
        ))
    return in_processing_order(records)


def build_reloadable(spec: ModelSpec, *, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                     quant: QuantConfig) -> tuple[DecoderForCausalLM, NativeReloadable]:
    """This rank's model on meta, and its records (parameters materialize on ``device``)."""
    from actors.model import build_model

    build = partial(build_model, spec, tp=tp, dtype=dtype, device=device, quant=quant)
    model = build()
    return model, NativeReloadable(model, device, build)


def route_on_meta(spec: ModelSpec, tp: int, dtype: torch.dtype, quant: QuantConfig,
                  tensors: list[TensorSpec], log: Any) -> Routing:
    """Routing of ``tensors`` from meta models of every rank; ReloadError naming the tensor
    when a shape does not fit."""
    meta = torch.device("meta")
    routes = []
    for rank in range(tp):
        _, reloadable = build_reloadable(spec, tp=TPGroup(rank, tp), dtype=dtype, device=meta,
                                         quant=quant)
        routes.append(route_rank(ReloadEngine(reloadable, meta, log), tensors))
    return merge_routes(routes, tensors)
