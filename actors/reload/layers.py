"""Record: per layer (a module owning parameters), the meta placeholders of its model-format
parameters and the device it was built for. Taken once, at build time, while the model is
still on meta; reloads rebuild layers from these records, never from the ambient device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

Owner = tuple[nn.Module, str]


def is_optional(param: torch.Tensor) -> bool:
    """An optional param is filled with its ``fill_value`` when the source lacks it."""
    return getattr(param, "fill_value", None) is not None


@dataclass(slots=True)
class LayerRecord:
    name: str
    """Module path, e.g. ``model.layers.3.self_attn.qkv_proj``."""
    module: nn.Module
    placeholders: dict[str, nn.Parameter]
    """Model-format meta params with their attributes (weight_loader, output_dim, ...)."""
    owners: dict[str, list[Owner]]
    """Every (module, attribute) holding each param: tied weights are re-registered on all."""
    restore_device: torch.device
    """Where this layer's tensors are materialized."""
    process_last: bool
    """Attention/KV-scale layers: processed in finalize, after every other layer."""
    reset_with: str | None
    """process_last layers: the layer whose reload re-processes this one even when the
    source carries none of its (optional) tensors, e.g. attention scales with qkv_proj."""
    kind: str = "dense"
    """The module's ``layer_kind`` (``experts`` for fused MoE experts), for reports."""

    @property
    def total_numel(self) -> int:
        """Elements the source must write before the layer is complete: optional params
        (those with a ``fill_value``) do not count."""
        return sum(p.numel() for p in self.placeholders.values() if not is_optional(p))

    def register(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put ``tensors`` (params or buffers, by name) on every owner."""
        for name, tensor in tensors.items():
            for module, attr in self.owners.get(name, [(self.module, name)]):
                if isinstance(tensor, nn.Parameter):
                    module._parameters[attr] = tensor
                else:
                    module._buffers[attr] = tensor

    def current(self) -> dict[str, torch.Tensor]:
        """The tensors the layer serves from now: its own params and buffers."""
        tensors = {n: p for n, p in self.module._parameters.items() if p is not None}
        tensors.update({n: b for n, b in self.module._buffers.items() if b is not None})
        return tensors

    def unregister(self, names: list[str]) -> None:
        for name in names:
            for module, attr in self.owners.get(name, [(self.module, name)]):
                module._parameters.pop(attr, None)
                module._buffers.pop(attr, None)


def record_layers(model: nn.Module, device: torch.device) -> list[LayerRecord]:
    """Layers in module (forward) order, ``process_last`` layers at the end."""
    owners: dict[int, list[Owner]] = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, attr))
    records: list[LayerRecord] = []
    claimed: set[int] = set()
    for name, module in model.named_modules():
        own = {a: p for a, p in module._parameters.items()
               if p is not None and id(p) not in claimed}
        if not own:
            continue
        assert all(p.is_meta for p in own.values()), f"{name} must be recorded while on meta"
        claimed.update(id(p) for p in own.values())
        module.restore_device = device
        records.append(LayerRecord(
            name=name, module=module, placeholders=own,
            owners={a: owners[id(p)] for a, p in own.items()}, restore_device=device,
            process_last=bool(getattr(module, "process_last", False)),
            reset_with=(f"{name}.{module.reset_with}" if getattr(module, "reset_with", None)
                        else None),
            kind=getattr(module, "layer_kind", "dense"),
        ))
    return [r for r in records if not r.process_last] + [r for r in records if r.process_last]
