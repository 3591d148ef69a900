"""YAML configs (``configs/*.yaml``): an ``engine:`` section of EngineConfig fields and an
optional ``service:`` section of ServiceConfig fields (``tp-reload serve``).

Parsed with ``yaml.safe_load``: plain data only, no tags, no code execution. A key that is
not a field is refused with the closest valid name; a value of the wrong type is named by
the dataclass's own validation, prefixed with the file and section.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from actors.reload.staging_area import STAGING_PLACES
from actors.step_loop import IN_FLIGHT_MODES
from orchestrator.config import EngineConfig
from orchestrator.errors import ConfigError
from orchestrator.fields import check_types

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(kw_only=True, slots=True)
class ServiceConfig:
    name: str = "tp-reload"
    """Name of the detached service actor that RL pipelines ``connect`` to."""
    namespace: str = "tp-reload"
    """Ray namespace of that actor."""
    watch_dir: str | Path | None = None
    """Directory a trainer publishes ``step_<N>`` checkpoints into; None: no watching.
    Every node's ranks read from it, so it must be a path every node can read."""
    marker: str = "COMPLETE"
    """File the trainer writes last inside ``step_<N>``; a step without it is never read."""
    poll_s: float = 1.0
    """Seconds between two scans of ``watch_dir``."""
    staged: bool = False
    """Reload watched steps staged (``reload(staged=True)``): the engines keep serving the
    previous step while the new one streams in, and pause only for the flip."""
    staging: str = "device"
    """Where a staged reload keeps its staging copy: 'device', or 'host' (pinned host
    memory on CUDA: the flip is one host-to-device copy)."""
    in_flight: str = "wait"
    """What requests running at a staged reload's flip do: 'keep', 'recompute', 'wait' or
    'abort' (``reload(in_flight=...)``)."""

    def __post_init__(self) -> None:
        check_types(self)
        for key in ("name", "namespace", "marker"):
            value = getattr(self, key)
            if not NAME_PATTERN.match(value):
                raise ConfigError(f"ServiceConfig.{key} must be a non-empty name of letters, "
                                  f"digits, '_', '.', '-', got {value!r}")
        if self.poll_s <= 0:
            raise ConfigError(f"ServiceConfig.poll_s must be > 0, got {self.poll_s!r}")
        if self.staging not in STAGING_PLACES:
            raise ConfigError(f"ServiceConfig.staging={self.staging!r} is not one of "
                              f"{STAGING_PLACES}")
        if self.in_flight not in IN_FLIGHT_MODES:
            raise ConfigError(f"ServiceConfig.in_flight={self.in_flight!r} is not one of "
                              f"{IN_FLIGHT_MODES}")
        if self.watch_dir is not None:
            self.watch_dir = str(self.watch_dir)


@dataclass(frozen=True, slots=True)
class FileConfig:
    engine: EngineConfig
    service: ServiceConfig


SECTIONS = {"engine": EngineConfig, "service": ServiceConfig}


def _field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.init]


def _unknown_key(where: str, key: Any, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f" (valid: {', '.join(valid)})"
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _section(path: Path, name: str, data: Any, overrides: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: section '{name}' must be a mapping, "
                          f"got {type(data).__name__}")
    valid = _field_names(cls)
    for key in data:
        if key not in valid:
            raise _unknown_key(f"{path}: {name}", key, valid)
    values = {**data, **overrides}
    required = [f.name for f in fields(cls) if f.init and f.default is MISSING
                and f.default_factory is MISSING]
    lacking = [k for k in required if k not in values]
    if lacking:
        raise ConfigError(f"{path}: section '{name}' lacks required key(s) {lacking}")
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {name}: {exc}") from exc


def load_file_config(path: str | Path, **engine_overrides: Any) -> FileConfig:
    """Read and validate ``path``; ``engine_overrides`` replace engine fields (for example
    ``model=`` from the command line)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        # safe_load refuses python/* tags: a config cannot construct objects or run code.
        raise ConfigError(f"{path}: not a plain YAML config ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with an 'engine' section at the top")
    for key in data:
        if key not in SECTIONS:
            raise _unknown_key(str(path), key, list(SECTIONS))
    if "engine" not in data:
        raise ConfigError(f"{path}: the 'engine' section is missing")
    return FileConfig(engine=_section(path, "engine", data["engine"], engine_overrides),
                      service=_section(path, "service", data.get("service"), {}))


def load_engine_config(path: str | Path, **overrides: Any) -> EngineConfig:
    return load_file_config(path, **overrides).engine
