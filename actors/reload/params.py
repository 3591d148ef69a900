"""How the reload engine makes tensors for loaders: params from placeholders (keeping the
engine's parameter class and attributes), and probe or prefetched windows that mirror a
source weight's box."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from actors.lazy import Bounds, LazyWindow, box_numel
from quant.base import fill_value


def geometry(weight: Any) -> tuple:
    if isinstance(weight, LazyWindow):
        return weight.full_shape, weight.bounds, weight._dims
    return tuple(weight.shape)


def mirror(cls: type, weight: Any, *args: Any, **kwargs: Any) -> Any:
    """A ``cls`` window over the same source box as ``weight`` (a window or a tensor), so
    boxes read through it are in the coordinates ``read_window(weight, ...)`` expects."""
    if isinstance(weight, LazyWindow):
        mirror = cls(weight.full_shape, weight.dtype, *args, **kwargs)
        mirror._place(weight.bounds, weight._dims)
    else:
        mirror = cls(tuple(weight.shape), weight.dtype, *args, **kwargs)
    mirror.name = getattr(weight, "name", "")
    return mirror


def read_bytes(dtype: torch.dtype, reads: list[Bounds]) -> int:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return sum(box_numel(b) * itemsize for b in dict.fromkeys(reads))




def materialize(_name: str, placeholder: nn.Parameter, device: torch.device) -> nn.Parameter:
    return param_like(placeholder, empty_like_on(placeholder, device))


def empty_like_on(placeholder: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``torch.empty_like(placeholder, device=device)`` for a meta placeholder, without its
    cost: empty_like of a meta tensor runs torch's Python reference, whose first call imports
    sympy (about half a second per rank process)."""
    return torch.empty_strided(placeholder.shape, placeholder.stride(), dtype=placeholder.dtype,
                               device=device)


def param_like(placeholder: nn.Parameter, storage: torch.Tensor) -> nn.Parameter:
    """``storage`` as a param of the placeholder's class (engines give params methods their
    loaders call) with its attributes (weight_loader, dims), optional params filled with
    their ``fill_value``."""
    param = nn.Parameter(storage, requires_grad=False)
    if type(placeholder) is not nn.Parameter and isinstance(placeholder, nn.Parameter):
        param.__class__ = type(placeholder)
    param.__dict__.update(placeholder.__dict__)
    value = fill_value(placeholder)
    if value is not None:
        param.data.fill_(value)
    return param
