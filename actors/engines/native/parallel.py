"""Tensor-parallel layers with the vLLM-style loader contract.

Every parameter carries ``weight_loader(param, loaded_weight, shard_id=None)`` and, where it
is sharded, ``output_dim`` / ``input_dim``. ``loaded_weight`` is the full checkpoint tensor,
or a lazy checkpoint slice with the same ``shape`` / ``narrow`` surface whose bytes are read
only when ``materialize()`` is called: a loader narrows first, so a rank reads only its own
slice from disk.

Parameters are created wherever the caller's device context puts them (the engine builds on
``meta``) and are materialized layer by layer by the reload engine (``actors.reload``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from quant import LinearMethod


class LazyWeight(Protocol):
    """A checkpoint tensor not yet read: narrowing is free, ``materialize`` reads the bytes."""

    shape: torch.Size
    dtype: torch.dtype

    def narrow(self, dim: int, start: int, length: int) -> LazyWeight: ...

    def materialize(self) -> torch.Tensor: ...


Weight = torch.Tensor | LazyWeight


@dataclass(frozen=True, slots=True)
class TPGroup:
    """This rank's place in its engine's tensor-parallel group: the default process group,
    since each rank actor hosts one rank of one engine."""

    rank: int
    size: int

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, op=op)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


def to_tensor(weight: Weight) -> torch.Tensor:
    return weight if isinstance(weight, torch.Tensor) else weight.materialize()


def set_weight_attrs(param: torch.Tensor, **attrs: Any) -> None:
    for key, value in attrs.items():
        setattr(param, key, value)


def new_param(shape: tuple[int, ...], dtype: torch.dtype, **attrs: Any) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(param, **attrs)
    return param


def _check_shape(param: torch.Tensor, loaded: Weight, what: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(
            f"shape mismatch for {what}: model expects {tuple(param.shape)}, "
            f"checkpoint slice has {tuple(loaded.shape)}"
        )


def check_full_extent(loaded: Weight, dim: int, expected: int, what: str) -> None:
    """A loader narrows to its shard; first make sure the whole tensor is the size the model
    was built for, or a larger checkpoint tensor would be silently cut."""
    if loaded.shape[dim] != expected:
        raise ValueError(
            f"shape mismatch for {what}: model expects {expected} along dim {dim} before "
            f"sharding, checkpoint tensor has shape {tuple(loaded.shape)}"
        )


def copy_into(dest: torch.Tensor, loaded: Weight, what: str) -> None:
    _check_shape(dest, loaded, what)
    # A window is passed as it is: the reload engine's windows see the copy (torch function
    # dispatch) and choose how it is done (a DMA from pinned memory, a screened copy).
    dest.copy_(loaded)


def default_weight_loader(param: torch.Tensor, loaded: Weight, shard_id: Any = None) -> None:
    """Replicated parameter: every rank holds the whole tensor. A single value fills a
    single-element param whether stored as [] or [1]."""
    if param.numel() == 1 and tuple(loaded.shape) in ((), (1,)):
        param.data.fill_(to_tensor(loaded).reshape(()))
        return
    copy_into(param.data, loaded, "replicated parameter")


def load_sharded(tp: TPGroup, param: torch.Tensor, loaded: Weight, dim_attr: str) -> None:
    """Even split along the param's ``dim_attr`` (``output_dim`` or ``input_dim``); a param
    without that attribute (a row-parallel bias) is replicated."""
    dim = getattr(param, dim_attr, None)
    if dim is None or tp.size == 1:
        copy_into(param.data, loaded, "parameter")
        return
    size = param.shape[dim]
    check_full_extent(loaded, dim, size * tp.size, "sharded parameter")
    copy_into(param.data, loaded.narrow(dim, tp.rank * size, size), f"rank {tp.rank} shard")


class ParallelLinear(nn.Module):
    """Base of the TP linear layers: weight created by the quant method, optional bias."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        *,
        bias: bool,
        dtype: torch.dtype,
        quant_method: LinearMethod,
        tp: TPGroup,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        self.output_sizes = output_sizes
        self.quant_method = quant_method
        self.input_size_per_partition, self.output_partition_sizes = self.partition_sizes()
        quant_method.create_weights(
            self,
            input_size_per_partition=self.input_size_per_partition,
            output_partition_sizes=self.output_partition_sizes,
            params_dtype=dtype,
            weight_loader=self.weight_loader,
        )
        self.bias = None
        if bias:
            self.bias = new_param(
                (self.bias_size(),), dtype, output_dim=0, weight_loader=self.bias_loader()
            )

    def partition_sizes(self) -> tuple[int, list[int]]:
        raise NotImplementedError

    def bias_size(self) -> int:
        return sum(self.output_partition_sizes)

    def bias_loader(self):
        return self.weight_loader

    def weight_loader(self, param: torch.Tensor, loaded: Weight, shard_id: Any = None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(ParallelLinear):
    """Output features split across ranks; no communication in forward."""

    def partition_sizes(self) -> tuple[int, list[int]]:
        return self.input_size, [s // self.tp.size for s in self.output_sizes]

    def weight_loader(self, param: torch.Tensor, loaded: Weight, shard_id: Any = None) -> None:
        load_sharded(self.tp, param, loaded, "output_dim")


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one param (gate|up); ``shard_id`` is the index."""

    def weight_loader(self, param: torch.Tensor, loaded: Weight, shard_id: Any = None) -> None:
        if shard_id is None:
            raise ValueError("merged column weights must be loaded one shard at a time (shard_id)")
        dim = param.output_dim
        size = self.output_partition_sizes[shard_id]
        offset = sum(self.output_partition_sizes[:shard_id])
        check_full_extent(loaded, dim, self.output_sizes[shard_id], f"shard {shard_id}")
        dest = param.data.narrow(dim, offset, size)
        src = loaded.narrow(dim, self.tp.rank * size, size)
        copy_into(dest, src, f"shard {shard_id} on rank {self.tp.rank}")


class QKVParallelLinear(ColumnParallelLinear):
    """q|k|v fused. Query heads split across ranks; KV heads split, or replicated when
    tp > num_kv_heads (rank r then holds KV head r // (tp / num_kv_heads))."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 **kwargs: Any) -> None:
        tp: TPGroup = kwargs["tp"]
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        super().__init__(
            hidden_size,
            [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
            **kwargs,
        )

    def partition_sizes(self) -> tuple[int, list[int]]:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return self.input_size, [q, kv, kv]

    def weight_loader(self, param: torch.Tensor, loaded: Weight, shard_id: Any = None) -> None:
        index = {"q": 0, "k": 1, "v": 2}.get(shard_id)
        if index is None:
            raise ValueError(f"QKV shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        dim = param.output_dim
        size = self.output_partition_sizes[index]
        offset = sum(self.output_partition_sizes[:index])
        check_full_extent(loaded, dim, self.output_sizes[index], f"{shard_id} shard")
        source_rank = self.tp.rank if index == 0 else self.tp.rank // self.kv_replicas
        dest = param.data.narrow(dim, offset, size)
        copy_into(dest, loaded.narrow(dim, source_rank * size, size),
                   f"{shard_id} shard on rank {self.tp.rank}")


class RowParallelLinear(ParallelLinear):
    """Input features split across ranks; partial outputs summed with an all-reduce."""

    def partition_sizes(self) -> tuple[int, list[int]]:
        return self.input_size // self.tp.size, list(self.output_sizes)

    def bias_loader(self):
        return default_weight_loader

    def weight_loader(self, param: torch.Tensor, loaded: Weight, shard_id: Any = None) -> None:
        load_sharded(self.tp, param, loaded, "input_dim")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(self.quant_method.apply(self, x, None))
        # Bias after the reduction: every rank holds it, and it is added exactly once.
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across ranks; the vocab is padded to a multiple of tp and the
    padding rows are zero."""

    def __init__(self, vocab_size: int, padded_vocab_size: int, hidden_size: int, *,
                 dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = padded_vocab_size // tp.size
        self.vocab_start = tp.rank * self.rows_per_rank
        self.weight = new_param((self.rows_per_rank, hidden_size), dtype, output_dim=0,
                                weight_loader=self.weight_loader)

    def weight_loader(self, param: torch.Tensor, loaded: Weight, shard_id: Any = None) -> None:
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(
                f"vocab mismatch: model has vocab_size={self.vocab_size}, checkpoint tensor has "
                f"{loaded.shape[0]} rows"
            )
        real_rows = max(0, min(self.rows_per_rank, self.vocab_size - self.vocab_start))
        if real_rows:
            copy_into(param.data[:real_rows], loaded.narrow(0, self.vocab_start, real_rows),
                       f"vocab rows on rank {self.tp.rank}")
        param.data[real_rows:].zero_()

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection over the vocab shard; logits gathered on every rank, padding cut."""

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight)
        return self.tp.all_gather_last_dim(local)[..., : self.vocab_size]


def place_buffers(model: nn.Module, device: torch.device) -> None:
    """Move computed buffers (rotary frequencies, built on the CPU explicitly) to ``device``."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                assert not buf.is_meta, f"buffer {name} of {type(module).__name__} is on meta"
                module._buffers[name] = buf.to(device)
