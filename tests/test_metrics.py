"""Reloads and rollouts are exported through Ray's metrics API: read back from the node's
Prometheus endpoint (what Prometheus and the Ray dashboard's Grafana scrape), they equal
the reports'."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from orchestrator import CheckpointError, EngineConfig, ReloadOrchestrator
from orchestrator.metrics import Metrics

pytestmark = pytest.mark.ray
SERVER = "metrics-under-test"  # a tag of its own: the session's other orchestrators export too


def scrape(server: str) -> dict[str, float]:
    """``name -> value`` of the series tagged ``server`` on this node's metrics endpoint."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        match = re.match(r"^ray_(tp_reload_\w+)\{([^}]*)\} (\S+)$", line)
        if match and f'server="{server}"' in match.group(2):
            found[match.group(1)] = float(match.group(3))
    return found


def exported(expected: dict[str, float], timeout_s: float = 60) -> dict[str, float]:
    """The scraped series once they equal ``expected`` (Ray's agent exports every few
    seconds), or what was last scraped."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = scrape(SERVER)
        if all(seen.get(k) == pytest.approx(v) for k, v in expected.items()) \
                or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def test_reloads_and_rollouts_are_exported_as_reported(ray_cluster, llama32, tmp_path):
    config = EngineConfig(model=str(llama32["a"]), tensor_parallel_size=1, dtype="float32",
                          num_cpus_per_rank=0.5)
    with ReloadOrchestrator(config, metrics=Metrics(SERVER)) as orch:
        first = orch.reload(str(llama32["b"]))
        second = orch.reload(str(llama32["a"]), staged=True)
        with pytest.raises(CheckpointError):
            orch.reload(str(tmp_path))  # no safetensors: refused, version 2 keeps serving
        begin = time.perf_counter()
        out = orch.sample([[1, 2, 3], [4, 5]], 6, n=3, seed=0, ignore_eos=True)
        seconds = time.perf_counter() - begin
    tokens = sum(len(c.token_ids) for c in out)
    expected = {
        "tp_reload_version": 2.0,
        "tp_reload_reloads_total": 2.0,
        "tp_reload_reload_failures_total": 1.0,
        "tp_reload_reload_seconds": second.seconds,
        "tp_reload_reload_bytes": second.source_bytes,
        "tp_reload_reload_pause_seconds": second.pause_seconds,
        "tp_reload_reload_bytes_total": first.source_bytes + second.source_bytes,
        "tp_reload_rollout_tokens_total": float(tokens),
    }
    seen = exported(expected)
    for name, value in expected.items():
        assert seen.get(name) == pytest.approx(value), f"{name}: exported {seen.get(name)}"
    assert tokens == 2 * 3 * 6
    # Timed in the driver around the whole call, the gauge's window is inside ours.
    assert seen["tp_reload_rollout_tokens_per_second"] >= tokens / seconds
