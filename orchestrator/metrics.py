"""What RL users watch, exported through Ray's metrics API (``ray.util.metrics``): Ray's
metrics agent serves them to Prometheus (each node's metrics export port, ``/metrics``) and
the Ray dashboard's Grafana panels, beside the rest of an RL job. Prometheus sees each name
with Ray's ``ray_`` prefix (``ray_tp_reload_version``).

Every series carries the tag ``server``: the service's name, or ``driver`` for an
orchestrator used as a library. Names and meanings:

  * ``tp_reload_version``: the version served (gauge).
  * ``tp_reload_reloads_total``, ``tp_reload_reload_failures_total``: committed and failed
    reloads (counters); a failure leaves the previous version serving.
  * ``tp_reload_reload_seconds``, ``tp_reload_reload_bytes``,
    ``tp_reload_reload_pause_seconds``: the last committed reload's wall seconds, source bytes
    and the seconds serving waited (gauges).
  * ``tp_reload_reload_bytes_total``: source bytes of every committed reload (counter).
  * ``tp_reload_rollout_tokens_total``: tokens drawn by ``sample``/``generate`` (counter).
  * ``tp_reload_rollout_tokens_per_second``: the last rollout call's tokens per wall second
    (gauge).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from orchestrator.report import ReloadReport

TAG = "server"


class Metrics:
    """The orchestrator's series, made on first use (Ray must be initialized)."""

    def __init__(self, server: str = "driver") -> None:
        self.tags = {TAG: server}

    @cached_property
    def _series(self) -> dict[str, Any]:
        from ray.util.metrics import Counter, Gauge

        keys = (TAG,)
        gauges = {
            "version": "The version served.",
            "reload_seconds": "Wall seconds of the last committed reload.",
            "reload_bytes": "Source bytes of the last committed reload.",
            "reload_pause_seconds": "Seconds serving waited in the last committed reload.",
            "rollout_tokens_per_second": "Tokens per wall second of the last rollout call.",
        }
        counters = {
            "reloads_total": "Committed reloads.",
            "reload_failures_total": "Failed reloads (the previous version kept serving).",
            "reload_bytes_total": "Source bytes of every committed reload.",
            "rollout_tokens_total": "Tokens drawn by rollouts.",
        }
        series: dict[str, Any] = {
            name: Gauge(f"tp_reload_{name}", description=text, tag_keys=keys)
            for name, text in gauges.items()}
        series.update({name: Counter(f"tp_reload_{name}", description=text, tag_keys=keys)
                       for name, text in counters.items()})
        return series

    def loaded(self, report: ReloadReport, first: bool = False) -> None:
        series = self._series
        series["version"].set(report.version, tags=self.tags)
        if first:
            return
        series["reloads_total"].inc(1, tags=self.tags)
        series["reload_seconds"].set(report.seconds, tags=self.tags)
        series["reload_bytes"].set(report.source_bytes, tags=self.tags)
        series["reload_pause_seconds"].set(report.pause_seconds, tags=self.tags)
        if report.source_bytes:
            series["reload_bytes_total"].inc(report.source_bytes, tags=self.tags)

    def failed(self) -> None:
        self._series["reload_failures_total"].inc(1, tags=self.tags)

    def rolled_out(self, tokens: int, seconds: float) -> None:
        if tokens:
            self._series["rollout_tokens_total"].inc(tokens, tags=self.tags)
        self._series["rollout_tokens_per_second"].set(tokens / max(seconds, 1e-9),
                                                      tags=self.tags)
