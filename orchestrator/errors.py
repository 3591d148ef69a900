"""Project exception types. User mistakes subclass ValueError so plain handlers still work."""

from __future__ import annotations


class TPReloadError(Exception):
    """Base of every error tp-reload raises on purpose."""


class ConfigError(TPReloadError, ValueError):
    """An EngineConfig field, or the model's config.json, is invalid; the message names it."""


class CheckpointError(TPReloadError, ValueError):
    """A checkpoint file or tensor is unusable; the message names the file and tensor."""


class ReloadInProgressError(TPReloadError, RuntimeError):
    """A serving call arrived during a reload with ``serve_during_reload='fail'``."""


class RecoveryError(TPReloadError, RuntimeError):
    """After a failed reload the engines could not be restored (the message says why); the
    orchestrator refuses to serve until it is restarted."""


class SharedMemoryError(TPReloadError, RuntimeError):
    """A node's shared memory (/dev/shm) cannot take an engine's rank: full, or a segment
    name held by a process tp-reload does not own. One line naming the engine, rank,
    segment or space, and what to do."""


class RankError(TPReloadError, RuntimeError):
    """A rank actor failed; carries the engine, the rank and the rank's traceback text."""

    def __init__(self, engine: int, rank: int, detail: str) -> None:
        super().__init__(f"engine {engine} rank {rank} failed:\n{detail}")
        self.engine = engine
        self.rank = rank
        self.detail = detail


class TrainerError(TPReloadError, RuntimeError):
    """A trainer rank failed or died while listing or streaming its weights; carries the
    trainer rank and its error text. The engines were rolled back before it is raised."""

    def __init__(self, rank: int, detail: str, died: bool = False) -> None:
        super().__init__(f"trainer rank {rank} failed:\n{detail}")
        self.rank = rank
        self.detail = detail
        self.died = died
        """The trainer's process died (rather than raised)."""
