"""tp-reload driver side: configure, place and drive tensor-parallel engines on Ray."""

from orchestrator.config import EngineConfig
from orchestrator.coordinator import ReloadOrchestrator
from orchestrator.errors import (
    CheckpointError,
    ConfigError,
    RankError,
    RecoveryError,
    ReloadInProgressError,
    TPReloadError,
)
from orchestrator.report import ReloadReport

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EngineConfig",
    "ReloadReport",
    "RankError",
    "RecoveryError",
    "ReloadInProgressError",
    "ReloadOrchestrator",
    "TPReloadError",
]
