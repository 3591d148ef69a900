"""Service mode for RL pipelines: a named, detached actor owning the engines (``Service``),
the client RL drivers reach it with (``connect``), and the loop behind
``tp-reload serve`` that starts it and reloads each checkpoint a trainer publishes.

Lifecycle: ``tp-reload serve`` (usually the entrypoint of ``ray job submit``) creates the
actor under ``ServiceConfig.name`` / ``namespace``; the actor places the engines and loads
the first checkpoint (version 0). Clients call the ``ServingAPI`` (``reload``, ``sample``,
``version``, ``status``, ...) from any driver of the cluster. ``ray job stop`` sends the serve
process SIGTERM: it shuts the engines down and kills the actor before exiting, so nothing
outlives the job.
"""

from __future__ import annotations

import abc
import functools
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from orchestrator.config import EngineConfig
from orchestrator.errors import ConfigError, TPReloadError
from orchestrator.metrics import Metrics
from orchestrator.reload_orchestrator import ReloadOrchestrator
from orchestrator.report import ReloadReport
from orchestrator.scratch import local_ray
from orchestrator.serving import SERVING_CALLS, ServingAPI
from orchestrator.yaml_config import FileConfig, ServiceConfig

log = logging.getLogger("tp_reload.serve")
STEP_NAME = re.compile(r"^step_(\d+)$")
# Concurrent calls on the service actor: status and version answer during a reload (the
# orchestrator's own lock orders reloads and serving calls).
SERVICE_CONCURRENCY = 8


class Service(ServingAPI):
    """Runs inside the detached actor: one ReloadOrchestrator, served to clients through
    ``call`` (the ``ServingAPI`` by name), and what the service reports."""

    def __init__(self, config: EngineConfig, service: ServiceConfig) -> None:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s [service] %(message)s")
        self.service = service
        self.started_at = time.time()
        self.orch = ReloadOrchestrator(config, metrics=Metrics(service.name)).start()
        self.last_step: str | None = None

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """One ``ServingAPI`` call of a client."""
        if name == "version":
            return self.version
        if name not in SERVING_CALLS:
            raise AttributeError(f"the service serves {SERVING_CALLS} and version, not {name!r}")
        return getattr(self, name)(*args, **kwargs)

    def ready(self) -> dict[str, Any]:
        return self.status()

    @property
    def version(self) -> int:
        return self.orch.version

    def reload(self, source: Any, order: str = "plan", strict: bool = True,
               staged: bool | None = None, staging: str | None = None,
               in_flight: str | None = None, step: str | None = None) -> ReloadReport:
        """``staged``/``staging``/``in_flight`` None take the service config's; ``step``
        names the watched directory it came from."""
        report = self.orch.reload(
            source, order=order, strict=strict,
            staged=self.service.staged if staged is None else staged,
            staging=staging or self.service.staging,
            in_flight=in_flight or self.service.in_flight)
        if step is not None:
            self.last_step = step
        return report

    def status(self) -> dict[str, Any]:
        return {**self.orch.status(), "name": self.service.name,
                "namespace": self.service.namespace, "watch_dir": self.service.watch_dir,
                "last_step": self.last_step,
                "uptime_s": round(time.time() - self.started_at, 1)}

    def shutdown(self) -> None:
        self.orch.shutdown()


class ServiceClient(ServingAPI):
    """What an RL driver holds: the ``ServingAPI`` of the named service actor; errors arrive
    as the project's exception types (CheckpointError, RankError, ...). A checkpoint
    directory must be readable on every node; a dict name -> tensor travels through the
    object store."""

    def __init__(self, handle: Any, timeout_s: float | None = None) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(self.handle.call.remote(name, *args, **kwargs), timeout=self.timeout_s)

    @property
    def version(self) -> int:
        return self._call("version")

    def shutdown(self) -> None:
        """Stop the service from a client: engines shut down, the actor is killed."""
        stop_service(self.handle)


def _serving_call(name: str, make: Callable[[str], Callable[..., Any]], cls: type) -> None:
    method = functools.wraps(getattr(ServingAPI, name))(make(name))
    method.__qualname__ = f"{cls.__name__}.{name}"
    method.__isabstractmethod__ = False  # wraps copied the interface's abstract marker
    setattr(cls, name, method)


# The service forwards the calls it does not specialize to its orchestrator, the client
# every call to the service: the interface is written once, in ServingAPI.
for _name in ("forward", "generate", "sample", "placements"):
    _serving_call(_name, lambda n: lambda self, *a, **k: getattr(self.orch, n)(*a, **k), Service)
for _name in SERVING_CALLS:
    _serving_call(_name, lambda n: lambda self, *a, **k: self._call(n, *a, **k), ServiceClient)
abc.update_abstractmethods(Service)
abc.update_abstractmethods(ServiceClient)


def connect(name: str = "tp-reload", namespace: str = "tp-reload", *,
            address: str = "auto", wait_s: float = 60.0,
            timeout_s: float | None = None) -> ServiceClient:
    """Reach the service actor named ``name``; waits up to ``wait_s`` for it to finish its
    first load (a freshly submitted job takes a while). Joins the cluster at ``address``
    when this process is not yet connected to Ray."""
    if not ray.is_initialized():
        join_cluster(address, namespace)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            handle = ray.get_actor(name, namespace=namespace)
            ray.get(handle.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return ServiceClient(handle, timeout_s)
        except ValueError:
            if time.monotonic() >= deadline:
                raise TPReloadError(f"no tp-reload service named '{name}' in namespace "
                                    f"'{namespace}' (is `tp-reload serve` running?)") from None
            time.sleep(0.5)


def join_cluster(address: str, namespace: str) -> None:
    """``ray.init`` to a running cluster. `ray start --head` turns on Ray's token
    authentication, but a client sends the token only in ``RAY_AUTH_MODE=token``: without
    it, Ray's error says only that it could not connect, so this one names the setting."""
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    except ConnectionError as exc:
        if os.environ.get("RAY_AUTH_MODE") == "token":
            raise
        raise TPReloadError(
            f"could not join the Ray cluster at {address!r}: {exc}. A cluster started with "
            "`ray start --head` requires token authentication: set RAY_AUTH_MODE=token in "
            "this process's environment (the token is read from ~/.ray/auth_token on the "
            "head's machine, or from RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN)") from exc


def stop_service(handle: Any, timeout_s: float = 2.0) -> None:
    """Shut the engines down (bounded wait) and kill the actor; its rank actors die with it."""
    try:
        ray.get(handle.shutdown.remote(), timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - stopping goes on whatever the actor says
        log.warning("service shutdown did not finish cleanly: %s", exc)
    ray.kill(handle, no_restart=True)


# ---- the watch loop ------------------------------------------------------------------------


class StepWatcher:
    """``step_<N>`` directories under ``root`` that the trainer has marked complete (the
    marker file is written last, so a marked step is whole), newest last. A step is offered
    once; steps older than one already offered are never offered (versions only advance)."""

    def __init__(self, root: str | Path, marker: str) -> None:
        self.root = Path(root)
        self.marker = marker
        self.last_offered = -1
        self._reported_skips: set[int] = set()

    def steps(self) -> dict[int, Path]:
        if not self.root.is_dir():
            return {}
        found = {}
        for entry in self.root.iterdir():
            match = STEP_NAME.match(entry.name)
            if match and entry.is_dir():
                found[int(match.group(1))] = entry
        return found

    def ready(self) -> list[tuple[int, Path]]:
        steps = self.steps()
        marked = sorted(n for n, p in steps.items()
                        if n > self.last_offered and (p / self.marker).is_file())
        if marked:
            for n in sorted(steps):
                if self.last_offered < n < marked[-1] and n not in marked \
                        and n not in self._reported_skips:
                    self._reported_skips.add(n)
                    log.warning("%s is not marked complete while a later step is; skipping "
                                "it", steps[n].name)
            self.last_offered = marked[-1]
        return [(n, steps[n]) for n in marked]


def serve(config: FileConfig, stop: threading.Event | None = None) -> int:
    """Entrypoint of ``tp-reload serve``: start the service actor, then watch until stopped."""
    # Joinable: its clients connect from processes of their own (Ray's token file).
    with local_ray(joinable=True, namespace=config.service.namespace):
        return _serve(config, stop or threading.Event())


def _serve(config: FileConfig, stop: threading.Event) -> int:
    service = config.service
    # After ray.init, which installs handlers of its own: `ray job stop` sends SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        ray.get_actor(service.name, namespace=service.namespace)
    except ValueError:
        pass
    else:
        raise ConfigError(f"a service named '{service.name}' already runs in namespace "
                          f"'{service.namespace}': stop it or choose another service.name")
    actor = ray.remote(Service).options(
        name=service.name, namespace=service.namespace, lifetime="detached", num_cpus=0,
        max_concurrency=SERVICE_CONCURRENCY)
    handle = actor.remote(config.engine, service)
    try:
        status = ray.get(handle.ready.remote())
        log.info("service %s (namespace '%s') serving %s as version %d: %d engine(s) x "
                 "TP=%d", service.name, service.namespace, status["model"], status["version"],
                 status["num_engines"], status["tensor_parallel_size"])
        watcher = StepWatcher(service.watch_dir, service.marker) if service.watch_dir else None
        if watcher is not None:
            log.info("watching %s for step_* directories marked with '%s'", watcher.root,
                     service.marker)
        while not stop.is_set():
            if watcher is not None:
                for step, path in watcher.ready():
                    if stop.is_set():
                        break
                    _reload_step(handle, step, path)
            stop.wait(service.poll_s)
        log.info("stop requested: shutting the engines down")
    finally:
        stop_service(handle)
    log.info("stopped")
    return 0


def _reload_step(handle: Any, step: int, path: Path) -> None:
    try:
        report: ReloadReport = ray.get(handle.reload.remote(str(path), step=path.name))
    except TPReloadError as exc:
        log.error("%s refused, still serving the previous version: %s",  # noqa: TRY400
                  path.name, exc)
        return
    log.info("%s -> version %d in %.2fs, serving paused %.3fs%s (%.1f MB, peak buffered "
             "%.2f MB per rank)", path.name, report.version, report.seconds,
             report.pause_seconds, " (staged)" if report.staged else "",
             report.source_bytes / 1e6, report.peak_buffered_bytes / 1e6)
    log.debug("reload report:\n%s", report.table())
