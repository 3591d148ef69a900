"""The one interface between the reload engine and an engine's model.

The reload engine (``actors.reload.reload_engine``) knows nothing about model families, quantization
or inference engines. A model takes part in layerwise reloading by implementing
``ReloadableModel``:

  * ``records()``: every layer (a module owning loadable parameters) in forward order, each a
    ``LayerRecord`` with its model-format placeholders (meta tensors carrying their
    ``weight_loader``), the device it materializes on, whether it is finalized last, and
    whether processing converts it;
  * ``load_weights(pairs)``: route checkpoint-format ``(name, weight)`` pairs to the
    placeholders' ``weight_loader``s (through whatever params are registered at the time);
    names the model does not have raise ``UnknownTensorError``; a weight that does not fit
    raises ``ReloadError`` naming it (``actors.reload.errors``);
  * ``process(record)``: turn a complete layer's model-format tensors, registered on
    ``record.module``, into its kernel-format tensors (quantization, repacking); a model
    that can write them straight into the tensors the layer serves from also overrides
    ``process_into(record, kernel)``;
  * ``has_nonfinite(record)``: after ``process``, whether the params in ``record.screened``
    held NaN or Inf (the processed scales reveal it, so they need no scan of their own);
  * ``twin()`` and ``hand_over(staged, live)`` (``StageableModel``, an engine's ``staging``
    capability): the same model again on meta, for staged reloads, and what processing
    left on a twin's layer besides its tensors, given to the live layer at the flip.

The native engine implements it in ``actors/engines/native/``, vLLM in ``actors/engines/vllm/``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quant.base import fill_value

Owner = tuple[nn.Module, str]


def is_optional(param: torch.Tensor) -> bool:
    """An optional param is filled with its ``fill_value`` when the source lacks it."""
    return fill_value(param) is not None


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
    """Where this layer's tensors are materialized: the device it was built for, never the
    ambient default device."""
    process_last: bool = False
    """Attention/KV-scale layers: processed in finalize, after every other layer."""
    reset_with: str | None = None
    """process_last layers: the layer whose reload re-processes this one even when the
    source carries none of its (optional) tensors, e.g. attention scales with qkv_proj."""
    kind: str = "dense"
    """``dense``, or ``experts`` for fused MoE expert layers (reports give their share)."""
    converts: bool = False
    """``process`` changes the tensors (kernel format differs from model format). When
    False and the kernel tensors match the placeholders, loads are replayed straight into
    the kernel tensors."""
    screened: tuple[str, ...] = ()
    """Params whose NaN/Inf ``has_nonfinite`` reports after ``process``."""
    collective: bool = False
    """``process`` communicates with the engine's other ranks (all of them must process
    the layer together): the reload engine agrees with them first (failure consensus)."""

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

    def unregister(self, names: Iterable[str]) -> None:
        for name in names:
            for module, attr in self.owners.get(name, [(self.module, name)]):
                module._parameters.pop(attr, None)
                module._buffers.pop(attr, None)


def param_owners(model: nn.Module) -> dict[int, list[Owner]]:
    """id(param) -> every (module, attribute) that holds it (tied weights have several)."""
    owners: dict[int, list[Owner]] = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, attr))
    return owners


def in_processing_order(records: list[LayerRecord]) -> list[LayerRecord]:
    """Forward order, ``process_last`` layers at the end."""
    return [r for r in records if not r.process_last] + [r for r in records if r.process_last]


class ReloadableModel(ABC):
    """What the reload engine needs from a model (see the module docstring)."""

    replays_copies: bool = False
    """Its weight loaders have no effect but their writes into the param (shape checks
    aside): a call whose writes were all copies of whole source boxes is replayed from the
    copies its dry run recorded, without the loader's Python (``meta.RecordedCopy``).
    False: every call runs its loader again (vLLM's loaders may keep state of their own)."""

    reuses_scratch: bool = False
    """``process`` keeps no reference to the model-format tensors it is handed, so the
    reload engine may reuse their storage for the next layer of the same shape. False when
    processing may capture them (vLLM's CPU kernels capture weights in closures)."""

    @abstractmethod
    def records(self) -> list[LayerRecord]:
        """Every reloadable layer in processing order (``in_processing_order``)."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Checkpoint-format pairs -> ``weight_loader`` calls on the registered params."""

    @abstractmethod
    def process(self, record: LayerRecord) -> None:
        """Model format -> kernel format for one complete layer, in place on its module."""

    def process_into(self, record: LayerRecord, kernel: Mapping[str, torch.Tensor]) -> None:
        """``process``, given the tensors the layer serves from (``kernel``), which this
        reload writes in place anyway: a result written straight into one of them and
        registered as that very tensor costs the reload engine no copy; any other result
        is copied into it afterwards. Default: ``process``."""
        self.process(record)

    def has_nonfinite(self, record: LayerRecord) -> bool:
        """After ``process``: whether a ``screened`` param held NaN or Inf."""
        return False


class StageableModel(ReloadableModel):
    """A model that can build its twin: the ``staging`` capability of an engine."""

    @abstractmethod
    def twin(self) -> ReloadableModel:
        """The same model built again on meta, sharing no module or tensor with this one:
        staged reloads load and process into it while this one serves
        (``actors.reload.staging_area``)."""

    def hand_over(self, staged: LayerRecord, live: LayerRecord) -> None:  # noqa: B027
        """Called on a twin at the flip, after ``staged``'s tensors were copied into
        ``live``'s kernel tensors: give the live module what else processing set up on the
        twin's (kernel closures, prepacked handles). Default: nothing, processing leaves
        only tensors."""
