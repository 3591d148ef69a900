"""The router: from a reload argument to a validated plan. It lists the source with its
transport, routes its tensors through the engine's own loaders (in the driver when the
engine has a driver router, else on the ranks of engine 0), validates it and schedules it,
caching the routing while sources keep the same names, shapes and dtypes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from actors.dtypes import ENGINE_DTYPES, dtype_name
from actors.engines.plugin import DriverRouter
from actors.rank_actor import RankActor
from actors.reload import ReloadError, Routing, TensorSpec, merge_routes
from actors.transports import open_source
from actors.transports.base import Source, TensorInfo
from orchestrator.config import EngineConfig
from orchestrator.errors import CheckpointError, ConfigError
from orchestrator.fleet import Fleet
from orchestrator.plan import Order, Plan, PlannedTensor, make_plan
from orchestrator.validate import validate_source

log = logging.getLogger("tp_reload")


def resolve_dtype(requested: str, infos: list[TensorInfo]) -> str:
    """'auto' -> the dtype the checkpoint stores its embedding in."""
    if requested != "auto":
        return requested
    for info in infos:
        if info.name.endswith("embed_tokens.weight"):
            if info.torch_dtype not in ENGINE_DTYPES:
                raise ConfigError(f"{info.file}: '{info.name}' has dtype {info.dtype}; "
                                  "set EngineConfig.dtype explicitly")
            return dtype_name(info.torch_dtype)
    raise CheckpointError("checkpoint has no '*embed_tokens.weight'; set EngineConfig.dtype")


CachedRouting = tuple[tuple, Routing]
RouteTensors = Callable[[list[TensorSpec]], Routing]
"""Dry-runs source tensors through every rank's loaders; ReloadError names a misfit."""


def build_plan(source: Source, *, route: RouteTensors, bucket_bytes: int, order: Order,
               cached: CachedRouting | None = None, strict: bool = True,
               require_all: bool = False) -> tuple[Plan, CachedRouting]:
    """Route ``source`` through the model (a dry run of its loaders), validate it and
    schedule it. ``cached`` is reused when the source lists the same names, shapes and
    dtypes, as an RL loop's sources do step after step. CheckpointError names what does not
    fit; ``require_all`` (a first load) also refuses a source that leaves a layer empty."""
    if not source.tensors:
        raise CheckpointError(f"{source.description}: the source has no tensors")
    key = tuple((t.name, t.shape, t.dtype) for t in source.tensors)
    if cached is None or cached[0] != key:
        try:
            routing = route([(t.name, t.shape, t.torch_dtype) for t in source.tensors])
        except ReloadError as exc:
            raise CheckpointError(f"{source.description}: {exc}") from exc
        cached = (key, routing)
    routing = cached[1]
    validate_source(source, routing, strict=strict, require_all=require_all)
    tensors = [
        PlannedTensor(t.name, routing.layer_of[t.name], t.nbytes, routing.rank_bytes[t.name],
                      t.file)
        for t in source.tensors if t.name in routing.layer_of
    ]
    plan = make_plan(tensors, routing.layer_order, bucket_bytes=bucket_bytes, order=order,
                     process_last=routing.process_last)
    return plan, cached


class Router:
    def __init__(self, config: EngineConfig, fleet: Fleet) -> None:
        self.config = config
        self.fleet = fleet
        self.dtype = ""
        """The engine dtype, resolved from ``config.model`` by ``prepare``."""
        self._driver_router: DriverRouter | None = None
        self._cached: CachedRouting | None = None
        self._lock = threading.Lock()  # plan() may run beside a staged reload's planning

    @property
    def on_driver(self) -> bool:
        """The engine routes in the driver (plans need no rank)."""
        return self._driver_router is not None

    @property
    def routing(self) -> Routing:
        """The routing of the last planned source."""
        assert self._cached is not None, "nothing planned yet"
        return self._cached[1]

    def prepare(self) -> Source:
        """List ``config.model``, resolve the dtype from it and let the engine check it
        against the model's config.json; ConfigError names the path."""
        cfg = self.config
        first = open_source(cfg.model, cfg.timeout_s)
        self.dtype = resolve_dtype(cfg.dtype, list(first.tensors))
        options = cfg.options(self.dtype)
        try:
            cfg.plugin.check_model(options)
            self._driver_router = cfg.plugin.driver_router(options)
        except ValueError as exc:
            where = "" if cfg.model in str(exc) else f"{cfg.model}/config.json: "
            raise ConfigError(f"{where}{exc}") from exc
        return first

    def open(self, source: Any) -> Source:
        return open_source(source, self.config.timeout_s)

    def plan(self, source: Source, order: Order, *, strict: bool = True,
             require_all: bool = False, staged: bool = False) -> Plan:
        with self._lock:
            plan, self._cached = build_plan(
                source, route=lambda tensors: self._route(tensors, staged),
                bucket_bytes=self.config.bucket_bytes, order=order, cached=self._cached,
                strict=strict, require_all=require_all)
        return plan

    def _route(self, tensors: list[TensorSpec], staged: bool) -> Routing:
        """Dry-run ``tensors`` through every rank's loaders: on meta copies here, or on the
        ranks of engine 0 (every engine is the same) for engines that build their models
        only in a rank (on their twins when ``staged``, as the live models serve)."""
        if self._driver_router is not None:
            return self._driver_router(tensors, log)
        routes = self.fleet.wait(self.fleet.call_engine(0, RankActor.route, tensors, staged))
        return merge_routes([routes[key] for key in sorted(routes)], tensors)
