"""The two-verb contract every quantization method implements, plus the unquantized method.

``create_weights`` registers model-format parameters (what checkpoint loaders write: full
precision, TP-sliced and fused) on a layer. ``process_weights_after_loading`` turns them into
kernel format (what ``apply`` reads). A method owns its shard rule through the
``weight_loader`` it is handed and the ``output_dim``/``input_dim`` it sets, so TP code never
inspects quantized layouts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

WeightLoader = Callable[..., None]
Role = Literal["qkv"]
"""A layer named by what it does, not by any engine's module name: ``qkv`` is an attention
layer's query/key/value projection. Each engine maps roles to its own modules."""


@dataclass(frozen=True, slots=True)
class LayerPolicy:
    """How the reload engine treats a layer whose weights a quant method owns: declared
    once per method (``policy``), read by every engine when it records its layers."""

    converts_weights: bool = True
    """False when kernel format equals model format (``process_weights_after_loading`` is
    the identity): the reload engine then replays loads straight into the kernel tensors."""
    screened_params: tuple[str, ...] = ()
    """Model-format params whose NaN/Inf the processed scales always reveal (an amax over
    them): the reload engine asks ``has_nonfinite`` instead of scanning them again."""
    process_last: bool = False
    """Processed in finalize, after every other layer (attention/KV scales)."""
    reset_with: Role | None = None
    """A ``process_last`` layer's sibling, by role, whose reload re-processes this one even
    when the source carries none of its (optional) tensors."""


def mark_optional(param: torch.Tensor, fill_value: float) -> None:
    """A param the source may omit: it is filled with ``fill_value`` instead (the same
    param-attribute convention as ``weight_loader``)."""
    param.fill_value = fill_value


def fill_value(param: torch.Tensor) -> float | None:
    """What an optional param is filled with when the source lacks it (None: required)."""
    return getattr(param, "fill_value", None)


class WeightProcessing:
    """The processing verbs every method family (linear, fused experts, KV cache) shares."""

    name: str = ""
    policy: ClassVar[LayerPolicy] = LayerPolicy()

    def has_nonfinite(self, layer: nn.Module) -> bool:
        """After processing: whether a screened param held NaN or Inf."""
        return False

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027
        """Convert model format to kernel format in place. Identity by default."""

    def process_weights_into(self, layer: nn.Module, kernel: Mapping[str, torch.Tensor]
                             ) -> None:
        """``process_weights_after_loading``, given the tensors the layer serves from
        (``kernel``, by param name; written in place by this reload anyway): a method may
        write its results straight into them and register them, saving the caller a copy
        of each. Default: it does not."""
        self.process_weights_after_loading(layer)


class LinearMethod(WeightProcessing, ABC):
    """How one linear layer stores, converts and applies its weight."""

    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        *,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
        weight_loader: WeightLoader,
    ) -> None:
        """Register the model-format parameters on ``layer``."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` with the kernel-format tensors."""


def replace_parameter(layer: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` as the kernel-format parameter ``name`` of ``layer``."""
    layer._parameters[name] = nn.Parameter(tensor, requires_grad=False)


def kernel_slot(kernel: Mapping[str, torch.Tensor], name: str, shape: torch.Size,
                dtype: torch.dtype) -> nn.Parameter | None:
    """``kernel[name]`` when a result of ``shape`` and ``dtype`` can be written into it
    (``process_weights_into``); None otherwise, and the result goes to a tensor of its own
    (the caller's kernel copy then names any mismatch)."""
    target = kernel.get(name)
    if (not isinstance(target, nn.Parameter) or target.shape != shape
            or target.dtype != dtype):
        return None
    return target


def kernel_slots(kernel: Mapping[str, torch.Tensor],
                 wanted: Mapping[str, tuple[torch.Size, torch.dtype]]
                 ) -> tuple[Mapping[str, torch.Tensor], dict[str, nn.Parameter | None]]:
    """The kernel tensors a method writes its large results straight into (``wanted``: name
    -> shape and dtype), all of them or none: when one does not fit, every slot is None and
    the kernel returned is empty, so ``register_result`` writes nothing into any kernel
    tensor, small results included."""
    slots = {name: kernel_slot(kernel, name, *spec) for name, spec in wanted.items()}
    if any(slot is None for slot in slots.values()):
        return {}, dict.fromkeys(wanted)
    return kernel, slots


def register_result(layer: nn.Module, name: str, result: torch.Tensor,
                    kernel: Mapping[str, torch.Tensor]) -> None:
    """Register kernel-format ``result`` as param ``name``: ``kernel[name]`` itself when
    ``result`` was written into it or fits it (copied: small results, scales), so the caller
    copies nothing; a param of its own otherwise."""
    target = kernel_slot(kernel, name, result.shape, result.dtype)
    if target is None:
        replace_parameter(layer, name, result)
        return
    if result is not target:
        target.data.copy_(result)
    layer._parameters[name] = target


class UnquantizedLinearMethod(LinearMethod):
    """Weights kept in the engine dtype; model format equals kernel format."""

    name = "none"
    policy = LayerPolicy(converts_weights=False)

    def create_weights(
        self,
        layer: nn.Module,
        *,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        params_dtype: torch.dtype,
        weight_loader: WeightLoader,
    ) -> None:
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        weight.output_dim = 0
        weight.input_dim = 1
        weight.weight_loader = weight_loader
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)
