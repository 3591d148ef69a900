"""The benchmark runs end to end on its tiny model (structure and accounting only: speed
targets are the benchmark's business, never a test's): the quick run's cases and rows, with
buckets of about one layer as there."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.reload_bench import Options, run
from benchmarks.reload_report import targets
from tests.support import serving

pytestmark = [pytest.mark.ray, pytest.mark.slow]
FLOOR_NOISE = 1.5
"""How far noise may put the strict floor above the concurrent one: on 2 cores a TP=2
engine's ranks do not contend, so the two are equal but for noise, and on the tiny model
each is a few ms (the minimum of 5 repetitions; 1.29x once with a single repetition while
the suite ran)."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The benchmark's work directory, shared as between two runs of its CLI: the
    checkpoint is written once."""
    return tmp_path_factory.mktemp("bench")


def test_benchmark_measures_every_path(ray_cluster, workdir):
    """Unquantized: an fp8 engine, its floors and peers run the same code with a quantize
    step (the benchmark's own --quick run measures both)."""
    result = run(Options(size="tiny", repeats=1, tps=(2,), workdir=workdir,
                         bucket_bytes=2 << 20, quantizations=(None,)))
    cases = {c["name"]: c for c in result["cases"]}
    assert set(cases) == {f"tp2-none-{s}-{o}" for s in ("dir", "memory", "trainer")
                          for o in ("plan", "source")}
    for case in cases.values():
        assert case["ours_s"] > 0 and case["floor_s"] > 0
        floors_are_measured(case)
        if case["order"] == "plan":  # never more than the same source in its own order
            other = cases[case["name"].replace("-plan", "-source")]
            assert case["peak_buffered_bytes"] <= other["peak_buffered_bytes"]
        if case["source"] == "dir":
            assert set(case["peers"]) == {"dcp", "full"}
            assert set(case["peak_rss_bytes"]) == {"ours", "dcp", "full"}
        if case["source"] == "trainer":  # the same trainer over a process group
            assert set(case["peers"]) == {"process_group"}
    # Serving waits for all of a plain reload, and only for a staged one's flip.
    assert [r["name"] for r in result["staged"]] == ["tp2-none-dir"]
    for row in result["staged"]:
        assert row["plain_s"] > 0
        assert 0 < row["staged_pause_s"] < row["staged_s"] and row["staging_bytes"] > 0
    timelines = result["buffered_timelines"]
    shuffled = max(timelines["shuffled dict, source order"])
    assert shuffled > max(timelines["shuffled dict, plan order"])
    depths = result["depths"]
    assert [d["layers"] for d in depths] == [4, 8] and all(d["holds"] for d in depths)
    rows = targets(result)
    # per case its floor; per dir case the best peer and each peer above the floor; per
    # trainer case the best peer, the peer above the floor and half the stream; plan vs
    # source per pair; the fixed cost; the depth check
    assert len(rows) == 6 + 2 * 3 + 2 * 3 + 3 + 1 + 1
    assert sum("0.5x the trainer's process-group stream" in t for t, _, _ in rows) == 2
    assert sum("the concurrent floor," in t for t, _, _ in rows) == 2
    assert sum("the transport floor," in t for t, _, _ in rows) == 4
    fixed = result["fixed_cost"]
    assert fixed["tp"] == 2 and 0 < fixed["seconds_min"] <= fixed["seconds_median"]


def floors_are_measured(case: dict) -> None:
    """The case names the floor that applies, and each floor is a measurement of its own:
    the strict one (ranks alone) not above the concurrent one (ranks at once) beyond noise,
    and the concurrent one below the transport one (which adds the sender's write)."""
    kind = "concurrent" if case["source"] == "dir" else "transport"
    assert case["floor_kind"] == kind and case["floor_s"] == case[f"{kind}_floor_s"]
    strict, concurrent = case["strict_floor_s"], case["concurrent_floor_s"]
    assert 0 < strict <= concurrent * FLOOR_NOISE, case
    if kind == "transport":
        assert concurrent < case["transport_floor_s"], case
        assert set(case["floor_stage_seconds"]) == {"write", "load", "quantize"}
    else:
        assert case["transport_floor_s"] is None


@pytest.mark.vllm
def test_benchmark_puts_vllms_own_reload_beside_ours(ray_cluster, workdir):
    """--engine vllm: every case is measured against vLLM's reload_weights on the same
    engines, from the same directory or in-memory weights. Unquantized only (each vLLM
    engine costs ~10 s of imports per rank here; quantized cases run the same code)."""
    result = run(Options(size="tiny", repeats=1, tps=(2,), workdir=workdir,
                         bucket_bytes=2 << 20, engine="vllm", quantizations=(None,)))
    cases = {c["name"]: c for c in result["cases"]}
    assert set(cases) == {f"vllm-tp2-none-{s}-{o}" for s in ("dir", "memory", "trainer")
                          for o in ("plan", "source")}
    for case in cases.values():
        peer = "process_group" if case["source"] == "trainer" else "vllm"
        assert set(case["peers"]) == {peer} and case["peers"][peer] > 0
    for case in cases.values():
        floors_are_measured(case)
    compared = [t for t, _, _ in targets(result) if "vLLM's reload_weights" in t]
    assert len(compared) == 4, "dir and memory, both orders"
    assert sum("0.5x vLLM's" in t for t in compared) == 2, "memory: half vLLM's time"


def test_inflight_benchmark_measures_each_mode_while_clients_stream(native_tp2, llama32):
    """Clients stream through every window (on the session's native TP=2 engine); after each
    in-flight reload the tokens they get are drawn from the new version (the flip happened
    while they ran, and none stopped)."""
    from benchmarks.inflight_bench import Options as InflightOptions
    from benchmarks.inflight_bench import measure_windows, summarize

    opts = InflightOptions(engine="native", tp=2, requests=4, window_s=1.2, warmup_s=0.5,
                           max_new_tokens=(8, 32), prompt_tokens=(4, 16))
    orch = serving(native_tp2, llama32["a"])
    result = summarize(*asyncio.run(measure_windows(orch, opts, [llama32["a"], llama32["b"]])))
    assert result["no_reload_tokens_per_s"] > 0 and result["decode_step_s"] > 0
    assert [row["mode"] for row in result["modes"]] == ["keep", "recompute", "wait", "abort"]
    for row in result["modes"]:
        assert row["tokens_per_s"] > 0, f"{row['mode']}: no token during the window"
        assert row["versions_after_reload"] == [row["version"]], row["mode"]
        assert 0 < row["pause_s"] <= row["reload_s"]
