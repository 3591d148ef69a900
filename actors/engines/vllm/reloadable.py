"""vLLM's model behind the reload interface (``actors.reload.ReloadableModel``).

The reload engine drives vLLM's own modules: their ``weight_loader``s (fusing and TP
slicing), their quant methods' ``process_weights_after_loading`` (online quantization,
CPU weight packing) and their attention layers' scale finalization, in vLLM's order.

Layers: vLLM records every module's model-format tensors on meta when it builds the model
(``record_metadata_for_reloading``, ``LAYERWISE_INFO``), with the device to materialize them
on; those are the placeholders. vLLM leaves ``bias`` out of that record (it is created after
the quant method's weights), so a live bias contributes a meta copy of itself.

Staged reloads (``actors.reload.staging_area``) process into a twin: the module tree cloned with
meta tensors and its own quant methods (``clone_on_meta``; vLLM builds models only through
its engine, and a second build would register its attention layers twice). vLLM's CPU
kernels keep prepacked weights in closures set on the module by processing, so the flip
hands those to the live module with the tensors (``hand_over``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from types import MethodType
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.attention import is_deferred_attention_layer
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.layers.quantization.online.fp8 import (
    Fp8PerTensorOnlineLinearMethod,
    Fp8PtpcOnlineLinearMethod,
    OnlineLinearBase,
    _is_tp_sharded,
)
from vllm.model_executor.layers.quantization.online.moe_base import OnlineMoEMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.model_loader.reload.layerwise import (
    LAYERWISE_INFO,
    get_layerwise_info,
)
from vllm.model_executor.model_loader.reload.meta import SKIP_LOAD_TENSORS
from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from actors.engines.vllm.kernels import cpu_fast_paths
from actors.reload import (
    LayerRecord,
    ReloadError,
    StageableModel,
    UnknownTensorError,
    in_processing_order,
    param_owners,
)
from quant.base import mark_optional

# vLLM's messages for a checkpoint name the model does not have.
UNKNOWN_NAME_MESSAGES = ("There is no module or parameter named", "has no parameter")
# Sentinel of vLLM's attention scales: created as -1 ("not loaded"), resolved on processing.
ATTENTION_SCALE_DEFAULT = -1.0
# What nn.Module keeps in each instance's __dict__ (tensors, children, hooks): never handed
# from a twin to the live model.
MODULE_INTERNALS = frozenset(nn.Module().__dict__)


class VllmReloadable(StageableModel):
    def __init__(self, model: nn.Module, dtype: torch.dtype, tp_size: int) -> None:
        self.model = model
        self.dtype = dtype
        self.tp_size = tp_size
        self._records = record_layers(model, tp_size)
        self._tied_aliases = tied_aliases(model)

    def records(self) -> list[LayerRecord]:
        return self._records

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """vLLM's ``load_weights``, minus tied aliases (vLLM loads the shared tensor through
        its first name only, and refuses an alias whose first name is not in the same call),
        with vLLM's errors for names it lacks and misfits turned into ours."""
        fed = _Tracked((n, w) for n, w in weights if n not in self._tied_aliases)
        try:
            self.model.load_weights(fed)
        except (ValueError, AttributeError) as exc:
            if any(m in str(exc) for m in UNKNOWN_NAME_MESSAGES):
                raise UnknownTensorError(f"checkpoint tensor '{fed.last}' does not match any "
                                         f"model parameter ({exc})") from exc
            raise ReloadError(f"checkpoint tensor '{fed.last}' does not fit the model "
                              f"(shape mismatch: {exc})") from exc
        except (AssertionError, RuntimeError) as exc:  # asserted shapes, copy_ mismatches
            raise ReloadError(f"checkpoint tensor '{fed.last}' does not fit the model "
                              f"(shape mismatch: {exc or 'vLLM loader assertion'})") from exc

    def process(self, record: LayerRecord) -> None:
        module = record.module
        method = getattr(module, "quant_method", None)
        # vLLM's online methods skip a layer they already processed once.
        module.__dict__.pop("_already_called_process_weights_after_loading", None)
        if isinstance(method, QuantizeMethodBase):
            with cpu_fast_paths(record.restore_device):
                method.process_weights_after_loading(module)
            if isinstance(module, RoutedExperts) and record.restore_device.type == "cpu":
                _prepack_cpu_experts(module, method)
        if record.process_last:
            # Attention: scales go from their parameters into the kernel buffers, as
            # vLLM's own finalize does after every other layer.
            module.process_weights_after_loading(self.dtype)

    def twin(self) -> VllmReloadable:
        return VllmReloadable(clone_on_meta(self.model), self.dtype, self.tp_size)

    def hand_over(self, staged: LayerRecord, live: LayerRecord) -> None:
        """Every attribute processing rebound on the twin's module (``cpu_linear`` closures
        over prepacked weights, the quant method with its experts kernel, attention's host
        scales) goes to the live module; the twin keeps a copy of the quant method, so the
        next staged reload never mutates the one serving."""
        twin, served = staged.module.__dict__, live.module.__dict__
        for key, value in list(twin.items()):
            if key in MODULE_INTERNALS or served.get(key, _MISSING) is value:
                continue
            served[key] = value
            if isinstance(value, QuantizeMethodBase):
                twin[key] = copy.copy(value)


_MISSING = object()


def clone_on_meta(model: nn.Module) -> nn.Module:
    """The module tree again, every parameter and buffer a meta copy (tied ones stay tied)
    and every quant method a shallow copy; other attributes (configs, sizes, closures set up
    at load) are shared until processing the clone rebinds them. Each clone shares vLLM's
    reload record (``LAYERWISE_INFO``) with its original."""
    clones: dict[int, nn.Module] = {}
    metas: dict[int, nn.Parameter] = {}
    for module in model.modules():
        clone = module.__class__.__new__(module.__class__)
        clone.__dict__.update(module.__dict__)
        clone.__dict__["_parameters"] = {
            n: None if p is None else metas.setdefault(id(p), _meta_copy(p, module, clone))
            for n, p in module._parameters.items()}
        clone.__dict__["_buffers"] = {
            n: None if b is None else torch.empty_like(b, device="meta")
            for n, b in module._buffers.items()}
        method = module.__dict__.get("quant_method")
        if isinstance(method, QuantizeMethodBase):
            clone.__dict__["quant_method"] = copy.copy(method)
        if module in LAYERWISE_INFO:
            LAYERWISE_INFO[clone] = LAYERWISE_INFO[module]
        clones[id(module)] = clone
    for clone in clones.values():
        clone.__dict__["_modules"] = {n: None if m is None else clones[id(m)]
                                      for n, m in clone._modules.items()}
    return clones[id(model)]


def _prepack_cpu_experts(module: nn.Module, method: QuantizeMethodBase) -> None:
    """vLLM 0.32 runs the experts kernel's own weight setup only when it first builds the
    kernel; a weight update copies the new weights into the old parameters in the layout the
    quant method produces. On the CPU build that setup is a prepack into the grouped-GEMM
    layout the kernel reads, so an updated layer would serve unpacked weights (vLLM's own
    ``reload_weights`` does, measured with Qwen3-MoE). Run it again on the new weights."""
    kernel = getattr(method, "moe_kernel", None)
    if kernel is not None:
        kernel.fused_experts.process_weights_after_loading(module)


class _Tracked:
    """Pairs passed through, remembering the last name (vLLM's errors do not name it)."""

    def __init__(self, pairs: Iterator[tuple[str, Any]]) -> None:
        self._pairs = iter(pairs)
        self.last = "?"

    def __iter__(self) -> _Tracked:
        return self

    def __next__(self) -> tuple[str, Any]:
        name, weight = next(self._pairs)
        self.last = name
        return name, weight


def tied_aliases(model: nn.Module) -> set[str]:
    """Qualified names of embedding weights that share a tensor with an earlier one
    (``lm_head.weight`` under ``tie_word_embeddings``)."""
    first: dict[int, str] = {}
    aliases = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, VocabParallelEmbedding):
            for name, param in module.named_parameters(remove_duplicate=False):
                qualname = f"{prefix}.{name}" if prefix else name
                if first.setdefault(id(param), qualname) != qualname:
                    aliases.add(qualname)
    return aliases


def _meta_copy(tensor: torch.Tensor, module: nn.Module, clone: nn.Module | None = None
               ) -> nn.Parameter:
    """A meta parameter of ``tensor``'s class, shape and attributes, its bound loaders
    pointing at ``module`` (vLLM stores them detached from the module), or at ``clone``
    instead of ``module`` when cloning."""
    meta = nn.Parameter(torch.empty_like(tensor, device="meta"), requires_grad=False)
    if isinstance(tensor, nn.Parameter) and type(tensor) is not nn.Parameter:
        meta.__class__ = type(tensor)
    meta.__dict__.update(tensor.__dict__)
    restore_layer_refs(meta, module)
    if clone is not None:
        for key, value in meta.__dict__.items():
            if isinstance(value, MethodType) and value.__self__ is module:
                meta.__dict__[key] = value.__func__.__get__(clone)
    # vLLM's loaders fall back to its default loader the same way.
    meta.weight_loader = _original_loader(getattr(meta, "weight_loader", default_weight_loader))
    return meta


def _original_loader(loader: Callable) -> Callable:
    """Online quant methods wrap a weight's loader in vLLM's own layerwise machinery
    (``online_process_loader``, which ignores loads outside vLLM's reload): unwrap it."""
    while getattr(loader, "__name__", "") == "online_process_loader":
        loader = loader.__wrapped__
    return loader


def _placeholders(module: nn.Module, live: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    recorded, _ = get_layerwise_info(module).restore_metadata
    names = [n for n in recorded if n not in SKIP_LOAD_TENSORS]
    # vLLM does not record bias (created after the quant method's weights): use the live one.
    names += [n for n in ("bias",) if n in live and n not in recorded]
    return {n: _meta_copy(recorded[n] if n in recorded else live[n], module) for n in names}


def processes_collectively(module: nn.Module, method: Any, tp_size: int) -> bool:
    """Whether processing ``module`` all-reduces over the TP group. vLLM 0.32's online FP8
    reduces a weight's amax across ranks when the weight is sharded along a dim the amax
    spans; its own predicate (``_is_tp_sharded``) says when, for the two methods that do it:
    per-channel scales span only the input dim (row-parallel layers), a per-tensor scale both.
    Every other online method is assumed to communicate (failure consensus costs one tiny
    all-reduce; a wrong 'no' could hang a rank)."""
    if tp_size == 1:
        return False
    if isinstance(method, Fp8PtpcOnlineLinearMethod):
        return _is_tp_sharded(module, reduces_output_dim=False)
    if isinstance(method, Fp8PerTensorOnlineLinearMethod):
        return _is_tp_sharded(module)
    return isinstance(method, (OnlineLinearBase, OnlineMoEMethodBase))


def record_layers(model: nn.Module, tp_size: int) -> list[LayerRecord]:
    owners = param_owners(model)
    claimed: set[int] = set()
    records = []
    for name, module in model.named_modules():
        live = {a: p for a, p in module._parameters.items() if p is not None}
        if any(id(p) in claimed for p in live.values()):
            continue  # a tied module (lm_head): its tensor belongs to an earlier layer
        placeholders = _placeholders(module, live)
        if not placeholders:
            continue
        claimed.update(id(p) for p in live.values())
        method = getattr(module, "quant_method", None)
        process_last = is_deferred_attention_layer(module)
        if process_last:
            for placeholder in placeholders.values():
                mark_optional(placeholder, ATTENTION_SCALE_DEFAULT)
        records.append(LayerRecord(
            name=name, module=module, placeholders=placeholders,
            owners={a: owners[id(live[a])] for a in placeholders if a in live},
            restore_device=get_layerwise_info(module).restore_device,
            process_last=process_last,
            kind="experts" if isinstance(module, RoutedExperts) else "dense",
            converts=isinstance(method, QuantizeMethodBase) or process_last,
            collective=processes_collectively(module, method, tp_size),
        ))
    return in_processing_order(records)
