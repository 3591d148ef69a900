"""tp-reload driver side: configure, place and drive tensor-parallel engines on Ray.

Names are imported on first use (PEP 562), so ``import orchestrator.errors`` (which rank
processes do, through the transports) does not import the driver."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "EngineConfig": "orchestrator.config",
    "ReloadOrchestrator": "orchestrator.reload_orchestrator",
    "CheckpointError": "orchestrator.errors",
    "ConfigError": "orchestrator.errors",
    "RankError": "orchestrator.errors",
    "RecoveryError": "orchestrator.errors",
    "ReloadInProgressError": "orchestrator.errors",
    "SharedMemoryError": "orchestrator.errors",
    "TPReloadError": "orchestrator.errors",
    "TrainerError": "orchestrator.errors",
    "ReloadReport": "orchestrator.report",
    "Completion": "orchestrator.rollouts",
    "PromptError": "orchestrator.rollouts",
    "Rollouts": "orchestrator.rollouts",
    "ServingAPI": "orchestrator.serving",
    "ServiceClient": "orchestrator.service",
    "connect": "orchestrator.service",
    "TrainerEndpoint": "actors.transports.trainer_stream",
    "TrainerSource": "actors.transports.trainer_stream",
    "ServiceConfig": "orchestrator.yaml_config",
    "load_engine_config": "orchestrator.yaml_config",
    "register_engine": "actors.engines",
    "register_transport": "actors.transports",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
