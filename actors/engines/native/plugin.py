"""The native engine's driver side: option and model checks, and the router that plans a
source on meta copies of every rank (no rank, no Ray)."""

from __future__ import annotations

from functools import partial

import torch

from actors.engines.native.parallel import TPGroup
from actors.engines.native.reloadable import build_reloadable, route_on_meta
from actors.engines.native.spec import ModelSpec, check_tp, load_spec
from actors.engines.plugin import DriverRouter, EngineOptions, EnginePlugin
from quant import KV_CACHE_METHODS, LINEAR_METHODS, QuantConfig


class NativeEngine(EnginePlugin):
    name = "native"
    runtime = "actors.engines.native.runtime:NativeRuntime"
    capabilities = frozenset({"logits", "kv_calibration", "cuda_graphs", "staging", "rejoin"})

    def check_options(self, options: EngineOptions) -> None:
        if options.quantization not in LINEAR_METHODS:
            known = [k for k in LINEAR_METHODS if k is not None]
            raise ValueError(f"quantization={options.quantization!r} is unknown to the native "
                             f"engine (known: None, {known})")
        if options.kv_cache_dtype not in KV_CACHE_METHODS:
            raise ValueError(f"kv_cache_dtype={options.kv_cache_dtype!r} is unknown to the "
                             f"native engine (known: {list(KV_CACHE_METHODS)})")
        if options.engine_args:
            raise ValueError(f"engine_args={options.engine_args!r}: the native engine takes "
                             "none")

    def check_model(self, options: EngineOptions) -> None:
        """ValueError naming what cannot be split or quantized as asked."""
        spec = load_spec(options.model)
        check_tp(spec, options.tensor_parallel_size)
        # Quant methods check their own shape constraints while creating weights; a meta
        # build (no memory) surfaces them here rather than on a rank.
        build_reloadable(spec, tp=TPGroup(0, options.tensor_parallel_size),
                         dtype=torch.float32, device=torch.device("meta"),
                         quant=_quant(options))

    def driver_router(self, options: EngineOptions) -> DriverRouter:
        return partial(route_on_meta, load_spec(options.model), options.tensor_parallel_size,
                       getattr(torch, options.dtype), _quant(options))


def _quant(options: EngineOptions) -> QuantConfig:
    return QuantConfig(options.quantization, options.kv_cache_dtype)


__all__ = ["ModelSpec", "NativeEngine"]
