"""tp-reload driver side: configure, place and drive tensor-parallel engines on Ray."""

from orchestrator.config import EngineConfig
from orchestrator.coordinator import ReloadOrchestrator
from orchestrator.errors import (
    CheckpointError,
    ConfigError,
    RankError,
    RecoveryError,
    ReloadInProgressError,
    SharedMemoryError,
    TPReloadError,
    TrainerError,
)
from orchestrator.report import ReloadReport, Samples
from orchestrator.service import ServiceClient, connect
from orchestrator.trainer import TrainerEndpoint, TrainerSource
from orchestrator.yaml_config import ServiceConfig, load_engine_config

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EngineConfig",
    "ReloadReport",
    "RankError",
    "RecoveryError",
    "ReloadInProgressError",
    "ReloadOrchestrator",
    "Samples",
    "ServiceClient",
    "ServiceConfig",
    "SharedMemoryError",
    "TPReloadError",
    "TrainerEndpoint",
    "TrainerError",
    "TrainerSource",
    "connect",
    "load_engine_config",
]
