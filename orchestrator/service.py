"""Service mode for RL pipelines: a named, detached coordinator actor owning the engines
(``Coordinator``), the client RL drivers reach it with (``connect``), and the loop behind
``tp-reload serve`` that starts it and reloads each checkpoint a trainer publishes.

Lifecycle: ``tp-reload serve`` (usually the entrypoint of ``ray job submit``) creates the
actor under ``ServiceConfig.name`` / ``namespace``; the actor places the engines and loads
the first checkpoint (version 0). Clients call ``reload`` / ``forward`` / ``generate`` /
``version`` / ``status`` from any driver of the cluster. ``ray job stop`` sends the serve
process SIGTERM: it shuts the engines down and kills the actor before exiting, so nothing
outlives the job.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import ray

from orchestrator.config import EngineConfig
from orchestrator.coordinator import ReloadOrchestrator
from orchestrator.errors import ConfigError, TPReloadError
from orchestrator.report import ReloadReport, Samples
from orchestrator.yaml_config import FileConfig, ServiceConfig

log = logging.getLogger("tp_reload.serve")
STEP_NAME = re.compile(r"^step_(\d+)$")
# Concurrent calls on the coordinator: status and version answer during a reload (the
# orchestrator's own lock orders reloads and serving calls).
COORDINATOR_CONCURRENCY = 8


class Coordinator:
    """Runs inside the detached actor: one ReloadOrchestrator and what the service reports."""

    def __init__(self, config: EngineConfig, service: ServiceConfig) -> None:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s [coordinator] %(message)s")
        self.service = service
        self.started_at = time.time()
        self.orch = ReloadOrchestrator(config).start()
        self.last_report: ReloadReport | None = self.orch.load_report
        self.last_step: str | None = None

    def ready(self) -> dict[str, Any]:
        return self.status()

    def reload(self, source: Any, order: str = "plan", strict: bool = True,
               step: str | None = None, staged: bool | None = None) -> ReloadReport:
        """``staged``: None takes the service config's ``staged``."""
        report = self.orch.reload(
            source, order=order, strict=strict,
            staged=self.service.staged if staged is None else staged,
            staging=self.service.staging)
        self.last_report = report
        if step is not None:
            self.last_step = step
        return report

    def forward(self, token_ids: Any, engine: int = 0):
        return self.orch.forward(token_ids, engine=engine)

    def generate(self, token_ids: Any, max_new_tokens: int = 8, engine: int = 0):
        return self.orch.generate(token_ids, max_new_tokens=max_new_tokens, engine=engine)

    def sample(self, token_ids: Any, max_new_tokens: int, **kwargs: Any) -> Samples:
        return self.orch.sample(token_ids, max_new_tokens, **kwargs)

    def version(self) -> int:
        return self.orch.version

    def placements(self) -> list[list[dict[str, Any]]]:
        return self.orch.placements()

    def status(self) -> dict[str, Any]:
        cfg = self.orch.config
        report = self.last_report
        return {
            "name": self.service.name, "namespace": self.service.namespace,
            "version": self.orch.version, "model": cfg.model,
            "tensor_parallel_size": cfg.tensor_parallel_size, "num_engines": cfg.num_engines,
            "engine": cfg.engine, "quantization": cfg.quantization, "dtype": self.orch.dtype,
            "watch_dir": self.service.watch_dir, "last_step": self.last_step,
            "uptime_s": round(time.time() - self.started_at, 1),
            "last_reload": None if report is None else {
                "version": report.version, "seconds": report.seconds,
                "source": report.source, "peak_buffered_bytes": report.peak_buffered_bytes,
                "staged": report.staged, "pause_seconds": report.pause_seconds},
        }

    def shutdown(self) -> None:
        self.orch.shutdown()


class ServiceClient:
    """What an RL driver holds: calls go to the named coordinator actor; errors arrive as
    the project's exception types (CheckpointError, RankError, ...)."""

    def __init__(self, handle: Any, timeout_s: float | None = None) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(getattr(self.handle, method).remote(*args, **kwargs),
                       timeout=self.timeout_s)

    def reload(self, source: Any, order: str = "plan", strict: bool = True,
               staged: bool | None = None) -> ReloadReport:
        """A checkpoint directory (readable on every node) or a dict name -> tensor (sent
        through the object store); ``staged`` (None: the service's config) keeps serving
        while it streams in."""
        return self._call("reload", source, order, strict, None, staged)

    def forward(self, token_ids: Any, engine: int = 0):
        return self._call("forward", token_ids, engine)

    def generate(self, token_ids: Any, max_new_tokens: int = 8, engine: int = 0):
        return self._call("generate", token_ids, max_new_tokens, engine)

    def sample(self, token_ids: Any, max_new_tokens: int, temperature: float = 1.0,
               top_p: float = 1.0, seed: int | None = None, logprobs: bool = True,
               engine: int = 0) -> Samples:
        """Rollouts with their log-probs and the version that produced them (as
        ``ReloadOrchestrator.sample``)."""
        return self._call("sample", token_ids, max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, logprobs=logprobs, engine=engine)

    def version(self) -> int:
        return self._call("version")

    def status(self) -> dict[str, Any]:
        return self._call("status")

    def placements(self) -> list[list[dict[str, Any]]]:
        return self._call("placements")

    def shutdown(self) -> None:
        """Stop the service from a client: engines shut down, the actor is killed."""
        stop_coordinator(self.handle)


def connect(name: str = "tp-reload", namespace: str = "tp-reload", *,
            address: str = "auto", wait_s: float = 60.0,
            timeout_s: float | None = None) -> ServiceClient:
    """Reach the coordinator named ``name``; waits up to ``wait_s`` for it to finish its
    first load (a freshly submitted job takes a while). Joins the cluster at ``address``
    when this process is not yet connected to Ray."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            handle = ray.get_actor(name, namespace=namespace)
            ray.get(handle.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return ServiceClient(handle, timeout_s)
        except ValueError:
            if time.monotonic() >= deadline:
                raise TPReloadError(f"no tp-reload coordinator named '{name}' in namespace "
                                    f"'{namespace}' (is `tp-reload serve` running?)") from None
            time.sleep(0.5)


def stop_coordinator(handle: Any, timeout_s: float = 2.0) -> None:
    """Shut the engines down (bounded wait) and kill the actor; its rank actors die with it."""
    try:
        ray.get(handle.shutdown.remote(), timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - stopping goes on whatever the actor says
        log.warning("coordinator shutdown did not finish cleanly: %s", exc)
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
    """Entrypoint of ``tp-reload serve``: start the coordinator, then watch until stopped."""
    service = config.service
    stop = stop or threading.Event()
    if not ray.is_initialized():
        ray.init(namespace=service.namespace)
    # After ray.init, which installs handlers of its own: `ray job stop` sends SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        ray.get_actor(service.name, namespace=service.namespace)
    except ValueError:
        pass
    else:
        raise ConfigError(f"a coordinator named '{service.name}' already runs in namespace "
                          f"'{service.namespace}': stop it or choose another service.name")
    actor = ray.remote(Coordinator).options(
        name=service.name, namespace=service.namespace, lifetime="detached", num_cpus=0,
        max_concurrency=COORDINATOR_CONCURRENCY)
    handle = actor.remote(config.engine, service)
    try:
        status = ray.get(handle.ready.remote())
        log.info("coordinator '%s' (namespace '%s') serving %s as version %d: %d engine(s) x "
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
        stop_coordinator(handle)
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
