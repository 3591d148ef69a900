"""tp-reload driver side: configure, place and drive tensor-parallel engines on Ray."""

from orchestrator.config import EngineConfig
from orchestrator.coordinator import LoadReport, ReloadOrchestrator
from orchestrator.errors import CheckpointError, ConfigError, RankError, TPReloadError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EngineConfig",
    "LoadReport",
    "RankError",
    "ReloadOrchestrator",
    "TPReloadError",
]
