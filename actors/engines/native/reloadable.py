"""The native runtime's side of the reload interface (``actors.reload.ReloadableModel``).

Layers are recorded once, while the model is still on meta (``build_model``): each module
owning parameters is a layer, its meta parameters are the model-format placeholders, and
its quant or KV-cache method declares how it is processed (converts, screened params,
processed last with its ``qkv_proj``). ``route_on_meta`` routes a source for the planner on
meta copies of every rank, in the driver, with no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from actors.engines.native.decoder import DecoderForCausalLM
from actors.engines.native.parallel import TPGroup
from actors.engines.native.spec import ModelSpec
from actors.reload import (
    LayerRecord,
    ReloadEngine,
    Routing,
    StageableModel,
    TensorSpec,
    in_processing_order,
    merge_routes,
    param_owners,
    route_rank,
)
from quant import QuantConfig
from quant.base import Role

ROLE_MODULES: dict[Role, str] = {"qkv": "qkv_proj"}
"""The native attention's child module for each role a quant policy names."""


class NativeReloadable(StageableModel):
    # quant/ methods build new kernel tensors and keep nothing of the model format.
    reuses_scratch = True
    # The loaders (engines/native/parallel.py) check shapes, narrow and copy: nothing else.
    replays_copies = True

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
        self.process_into(record, {})

    def process_into(self, record: LayerRecord, kernel: Mapping[str, torch.Tensor]) -> None:
        method = getattr(record.module, "quant_method", None)
        if method is not None:
            method.process_weights_into(record.module, kernel)

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
        policy = method.policy if method is not None else None
        reset_with = policy.reset_with if policy is not None and policy.process_last else None
        records.append(LayerRecord(
            name=name, module=module, placeholders=own,
            owners={a: owners[id(p)] for a, p in own.items()}, restore_device=device,
            process_last=policy is not None and policy.process_last,
            reset_with=f"{name}.{ROLE_MODULES[reset_with]}" if reset_with else None,
            kind=getattr(module, "layer_kind", "dense"),
            converts=policy is not None and policy.converts_weights,
            screened=policy.screened_params if policy is not None else (),
        ))
    return in_processing_order(records)


def build_reloadable(spec: ModelSpec, *, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                     quant: QuantConfig) -> tuple[DecoderForCausalLM, NativeReloadable]:
    """This rank's model on meta, and its records (parameters materialize on ``device``)."""
    from actors.engines.native import build_model

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
