"""Transactional reload: bad input refused, faults survived, nothing half-applied served.

Every case: a clear error, then greedy tokens and their log-probs bit-identical to the last
committed version, ``inspect()`` unchanged, and the next valid reload succeeding. The bad-input
table runs on both engines (native and vLLM)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import save_file

from orchestrator import CheckpointError, RankError, ReloadInProgressError
from tests.support import (
    kill_rank,
    load_tensors,
    reference_logits,
    reference_sample,
    rel_l2,
    reload_until_paused,
    sample_fixed,
    serves,
    serving,
    start,
    write_checkpoint,
)

pytestmark = pytest.mark.ray
ENGINES = ["native", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.shares("vllm_tp2")])]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def steps(llama32) -> dict[str, Path]:
    """Steps a and b of the session's head-size-32 Llama (``llama32``)."""
    return llama32


@pytest.fixture(scope="module", params=ENGINES)
def engine(ray_cluster, steps, request):
    """A TP=2 engine the bad-input table runs on, whatever it serves (each test reloads the
    step it does not serve): the session's shared native or vLLM one."""
    return request.getfixturevalue("vllm_tp2" if request.param == "vllm" else "native_tp2")


@pytest.fixture(scope="module")
def native_drill(ray_cluster, steps):
    """A native TP=2 engine for the drills that kill its ranks (each leaves it rebuilt and
    serving, at a version it checks itself)."""
    with start(steps["a"], 2) as orch:
        yield orch


def serve(orch, prompt: torch.Tensor):
    samples = sample_fixed(orch, prompt, NEW_TOKENS, temperature=0)
    return samples.tokens, samples.logprobs


class Served:
    """What an engine serves now, to compare after a refused or failed reload."""

    def __init__(self, orch, prompt: torch.Tensor) -> None:
        self.tokens, self.logprobs = serve(orch, prompt)
        self.tensors = orch.inspect()
        self.version = orch.version

    def assert_unchanged(self, orch, prompt: torch.Tensor, ranks=None) -> None:
        tokens, logprobs = serve(orch, prompt)
        assert torch.equal(tokens, self.tokens) and torch.equal(logprobs, self.logprobs), \
            "served weights changed"
        assert orch.version == self.version
        now = orch.inspect()
        for rank in ranks if ranks is not None else range(len(now)):
            assert now[rank] == self.tensors[rank], f"rank {rank} kernel tensors changed"


def next_valid_reload(orch, steps, prompt) -> None:
    """Reload the checkpoint not served now; it must commit and be served."""
    target = steps["b" if serves(orch, steps["a"], prompt) else "a"]
    version = orch.version
    report = orch.reload(str(target))
    assert report.version == orch.version == version + 1
    assert serves(orch, target, prompt)


def refused(orch, steps, prompt, source, pattern: str, error=CheckpointError, **kwargs) -> None:
    served = Served(orch, prompt)
    with pytest.raises(error, match=pattern):
        orch.reload(source, **kwargs)
    served.assert_unchanged(orch, prompt)
    next_valid_reload(orch, steps, prompt)


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- bad input ---------------------------------------------------------------------------


def test_missing_tensor_of_one_layer(engine, steps, prompt):
    source = load_tensors(steps["b"])
    del source["model.layers.1.self_attn.v_proj.weight"]
    refused(engine, steps, prompt, source,
            r"layer model\.layers\.1\.self_attn\.qkv_proj is incomplete: .*shards \['k', 'q'\]")


def test_unexpected_name_refused_unless_not_strict(engine, steps, prompt):
    source = load_tensors(steps["b"]) | {"model.layers.0.mlp.extra.weight": torch.ones(2)}
    refused(engine, steps, prompt, source,
            r"'model\.layers\.0\.mlp\.extra\.weight' matches no parameter.*strict=False")
    engine.reload(source, strict=False)
    assert serves(engine, steps["b"], prompt)


def test_wrong_shape(engine, steps, prompt):
    source = load_tensors(steps["b"])
    source["model.layers.0.mlp.up_proj.weight"] = torch.randn(100, 64)
    refused(engine, steps, prompt, source,
            r"'model\.layers\.0\.mlp\.up_proj\.weight'.*shape mismatch")


def test_wrong_dtype(engine, steps, prompt):
    source = load_tensors(steps["b"])
    source["model.norm.weight"] = source["model.norm.weight"].to(torch.int32)
    refused(engine, steps, prompt, source,
            r"'model\.norm\.weight' \(in-memory source\) has dtype I32")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_found_while_streaming_is_rolled_back(engine, steps, prompt, tmp_path, bad):
    """Caught mid-stream, after earlier layers were already written: a real rollback."""
    tensors = load_tensors(steps["b"])
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = bad
    path = copy_dir(steps["b"], tmp_path / "bad")
    for file in path.glob("*.safetensors"):
        file.unlink()
    save_file(tensors, path / "model.safetensors")
    (path / "model.safetensors.index.json").unlink()
    kind = "NaN" if bad != bad else "Inf"
    refused(engine, steps, prompt, str(path),
            rf"'model\.layers\.1\.mlp\.down_proj\.weight' contains {kind}")


def test_truncated_file(engine, steps, prompt, tmp_path):
    path = copy_dir(steps["b"], tmp_path / "truncated")
    victim = sorted(path.glob("*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    refused(engine, steps, prompt, str(path), rf"{victim.name}: tensor .* \(truncated\?\)")


def test_corrupt_header(engine, steps, prompt, tmp_path):
    path = copy_dir(steps["b"], tmp_path / "corrupt")
    victim = sorted(path.glob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[8:24] = b"\xff" * 16
    victim.write_bytes(bytes(data))
    refused(engine, steps, prompt, str(path), rf"{victim.name}: corrupt safetensors header")


def test_index_pointing_outside_the_directory(engine, steps, prompt, tmp_path):
    path = copy_dir(steps["b"], tmp_path / "escape")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../../elsewhere.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(engine, steps, prompt, str(path), rf"tensor '{name}' points outside the checkpoint dir")


def test_duplicate_name_in_two_files(engine, steps, prompt, tmp_path):
    path = copy_dir(steps["b"], tmp_path / "dup")
    (path / "model.safetensors.index.json").unlink()
    save_file({"model.norm.weight": torch.ones(64)}, path / "zz-extra.safetensors")
    refused(engine, steps, prompt, str(path), r"'model\.norm\.weight' appears in both")


def test_pickle_file_is_never_loaded(engine, steps, prompt, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    torch.save(load_tensors(steps["b"]), path / "pytorch_model.bin")
    refused(engine, steps, prompt, str(path), r"pickle files \['pytorch_model\.bin'\]")


def test_empty_source(engine, steps, prompt):
    refused(engine, steps, prompt, {}, r"the source has no tensors")


def test_checkpoint_of_a_different_model(engine, steps, prompt, tmp_path):
    other = write_checkpoint(tmp_path / "other", "llama", hidden_size=96)
    refused(engine, steps, prompt, str(other), r"shape mismatch")


def test_tensor_larger_than_the_models_is_refused(engine, steps, prompt):
    """vLLM's loaders narrow a tensor without checking its full extent: only the planner's
    coverage check (every source element is read by some rank) catches this one there."""
    source = load_tensors(steps["b"])
    source["model.layers.1.mlp.up_proj.weight"] = torch.randn(256, 64)
    refused(engine, steps, prompt, source,
            r"'model\.layers\.1\.mlp\.up_proj\.weight'.*shape mismatch")


# ---- rank failures -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("engine_name", "stage"), [
    ("native", "transfer"), ("native", "process"),
    pytest.param("vllm", "process", marks=[pytest.mark.vllm, pytest.mark.shares("vllm_drill")])])
def test_rank_killed_mid_reload_is_rebuilt(ray_cluster, steps, prompt, tmp_path, engine_name,
                                           stage, request):
    """On the drill engine of each: native, this module's (``native_drill``); vLLM, the
    session's (``vllm_drill``), which the SIGKILL drill of test_node_shm.py uses too; either
    leaves it rebuilt and serving."""
    orch = serving(request.getfixturevalue(f"{engine_name}_drill"), steps["a"])
    served = Served(orch, prompt)
    pids = [p["pid"] for p in orch.placements()[0]]
    signal = tmp_path / "paused"
    orch.inject_fault(stage, "pause", engine=0, rank=1, signal_path=str(signal))
    worker, errors = reload_until_paused(orch, str(steps["b"]), signal,
                                         f"rank 1 never reached the {stage} stage")
    kill_rank(orch, pids[1], rank=1)
    worker.join(timeout=180)
    assert len(errors) == 1 and isinstance(errors[0], RankError)
    assert (errors[0].engine, errors[0].rank) == (0, 1)
    assert f"back on version {served.version}" in "".join(errors[0].__notes__)
    fresh = [p["pid"] != old for p, old in zip(orch.placements()[0], pids, strict=True)]
    if engine_name == "native":
        # Rank 0 kept its process and its tensors; rank 1 rejoined it.
        assert fresh == [False, True]
        served.assert_unchanged(orch, prompt, ranks=[0])
    else:
        # vLLM forms its process group once per process: the whole engine is rebuilt.
        assert fresh == [True, True]
        served.assert_unchanged(orch, prompt, ranks=[])
    rebuilt = orch.inspect()[1]
    assert {n: (t["shape"], t["dtype"]) for n, t in rebuilt.items()} == \
           {n: (t["shape"], t["dtype"]) for n, t in served.tensors[1].items()}
    next_valid_reload(orch, steps, prompt)


def test_only_reload_errors_blame_the_checkpoint(ray_cluster):
    """A rank's own bug (any other exception, a ValueError too) is a RankError with its
    traceback; only the reload engine's ReloadError says the source is at fault."""
    from actors.reload import ReloadError
    from orchestrator.cluster import gather

    @ray.remote
    def raises(error: Exception) -> None:
        raise error

    with pytest.raises(RankError, match=r"engine 0 rank 1 failed:(.|\n)*a bug of ours"):
        gather({(0, 1): raises.remote(ValueError("a bug of ours"))}, 60)
    with pytest.raises(CheckpointError, match=r"engine 0 rank 1: tensor 'x' contains NaN"):
        gather({(0, 1): raises.remote(ReloadError("tensor 'x' contains NaN"))}, 60)


@pytest.mark.parametrize(("engine_name", "quantization", "dtype"), [
    ("native", "fp8", "float32"),
    # vLLM's online FP8 reduces amax over the TP group while processing: without failure
    # consensus rank 0 would wait in that collective for rank 1 forever.
    pytest.param("vllm", "fp8_per_channel", "bfloat16",
                 marks=[pytest.mark.vllm, pytest.mark.shares("vllm_fp8")])])
def test_exception_in_one_ranks_quantization(ray_cluster, steps, prompt, engine_name,
                                             quantization, dtype, request):
    """vLLM: on the session's shared fp8_per_channel engine (``vllm_fp8``)."""
    with contextlib.ExitStack() as own:
        orch = (serving(request.getfixturevalue("vllm_fp8"), steps["a"])
                if engine_name == "vllm" else
                own.enter_context(start(steps["a"], 2, engine=engine_name,
                                        quantization=quantization, dtype=dtype)))
        assert orch.config.quantization == quantization and orch.config.dtype == dtype
        version = orch.version
        served = Served(orch, prompt)
        orch.inject_fault("quantize", "raise", engine=0, rank=1)
        with pytest.raises(RankError, match=r"engine 0 rank 1 failed:(.|\n)*injected fault"):
            orch.reload(str(steps["b"]))
        served.assert_unchanged(orch, prompt)
        orch.reload(str(steps["b"]))
        assert orch.version == version + 1


@pytest.mark.slow
def test_requests_running_through_a_killed_staged_reload_finish_on_the_old_weights(
        native_drill, steps, prompt, tmp_path, caplog):
    """A rank dies while a staged reload streams and requests run on its engine: the reload
    is rolled back, the dead rank rebuilt, and every request goes on as a continuation
    (greedy: exactly) on the old weights; none is lost."""
    requests = torch.randint(0, 251, (4, 6), generator=torch.Generator().manual_seed(3))
    orch = serving(native_drill, steps["a"])
    served = Served(orch, prompt)
    pids = [p["pid"] for p in orch.placements()[0]]
    signal = tmp_path / "paused"
    orch.inject_fault("process", "pause", engine=0, rank=1, signal_path=str(signal))

    async def scenario():
        tasks = [asyncio.ensure_future(orch.agenerate(p, 200, temperature=0.0,
                                                      ignore_eos=True))
                 for p in requests.tolist()]
        while sum(await asyncio.to_thread(orch.running)) < len(requests):
            await asyncio.sleep(0.01)
        worker, errors = reload_until_paused(orch, str(steps["b"]), signal,
                                             "rank 1 never reached the process stage",
                                             staged=True, in_flight="keep")
        kill_rank(orch, pids[1], rank=1)
        await asyncio.to_thread(worker.join, 180)
        return await asyncio.gather(*tasks), errors

    done, errors = asyncio.run(scenario())
    assert len(errors) == 1 and isinstance(errors[0], RankError)
    went_on = [r.message for r in caplog.records if "goes on as" in r.message]
    assert len(went_on) == len(requests), "each request goes on as a continuation"
    expected = reference_sample(steps["a"], requests, 200)[0]
    for row, completion in zip(expected.tolist(), done, strict=True):
        assert completion.versions == [(served.version, 0, 200)]
        assert completion.token_ids == row
    served.assert_unchanged(orch, prompt, ranks=[0])


# ---- concurrency -------------------------------------------------------------------------


def test_reload_waits_for_a_running_generate(engine, steps, prompt):
    """A plain reload lets the requests running on the engines finish on the old weights,
    holds new ones, and serves them the new weights after."""
    before = serve(engine, prompt)
    long_prompt = prompt.repeat(8, 1)
    result: dict[str, object] = {}

    def generate() -> None:
        result["out"] = engine.generate(long_prompt, 120, ignore_eos=True)
        result["done"] = time.monotonic()

    worker = threading.Thread(target=generate)
    worker.start()
    deadline = time.monotonic() + 60
    while sum(engine.running()) < len(long_prompt):  # every request admitted, none finished
        assert time.monotonic() < deadline, "generate never started"
        time.sleep(0.005)
    version = engine.version
    next_valid_reload(engine, steps, prompt)
    reloaded = time.monotonic()
    worker.join()
    assert result["done"] <= reloaded, "the reload ran while generate was still running"
    assert all(c.versions == [(version, 0, 120)] for c in result["out"])
    assert engine.version == version + 1
    assert not torch.equal(serve(engine, prompt)[1], before[1])


@pytest.mark.slow
def test_serving_during_a_reload_fails_fast_when_configured(ray_cluster, steps, prompt, tmp_path):
    with start(steps["a"], 1, serve_during_reload="fail") as orch:
        pid = orch.placements()[0][0]["pid"]
        signal = tmp_path / "paused"
        orch.inject_fault("transfer", "pause", signal_path=str(signal))
        worker, errors = reload_until_paused(orch, str(steps["b"]), signal,
                                             "rank 0 never reached the transfer stage")
        with pytest.raises(ReloadInProgressError):
            orch.forward(prompt)
        kill_rank(orch, pid, rank=0)
        worker.join(timeout=120)
        assert len(errors) == 1 and isinstance(errors[0], RankError)
        assert rel_l2(orch.forward(prompt), reference_logits(steps["a"], prompt)) <= 1e-4


def test_two_reloads_at_once_are_serialized(engine, steps, prompt):
    version = engine.version
    reports = {}
    def reload(key: str) -> None:
        reports[key] = engine.reload(str(steps[key]))

    threads = [threading.Thread(target=reload, args=(k,)) for k in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.version for r in reports.values()) == [version + 1, version + 2]
    last = max(reports, key=lambda k: reports[k].version)
    assert serves(engine, steps[last], prompt)


# ---- soak --------------------------------------------------------------------------------


@pytest.mark.slow
def test_soak_fifty_reloads_with_faults(ray_cluster, steps, prompt):
    """50 reloads alternating two checkpoints, every 5th one faulty (bad data, a missing
    tensor, an exception in a rank): committed versions always serve the right weights, a
    failed one changes nothing, and rank memory stays within 64 MB of its warm level."""
    expected = {k: reference_logits(steps[k], prompt) for k in steps}
    tensors = {k: load_tensors(steps[k]) for k in steps}
    with start(steps["a"], 2) as orch:
        served, committed = "a", 0
        for i in range(1, 51):
            target = "b" if served == "a" else "a"
            if i == 6:
                warm = orch.memory()[0]
            if i % 5 == 0:
                fault = (i // 5) % 3
                if fault == 0:
                    bad = dict(tensors[target])
                    bad["model.layers.0.mlp.gate_proj.weight"] = torch.full((128, 64), float("nan"))
                    with pytest.raises(CheckpointError):
                        orch.reload(bad)
                elif fault == 1:
                    bad = {n: t for n, t in tensors[target].items()
                           if "layers.1.self_attn.q_proj" not in n}
                    with pytest.raises(CheckpointError):
                        orch.reload(bad)
                else:
                    orch.inject_fault("process", "raise", rank=i % 2)
                    with pytest.raises(RankError):
                        orch.reload(str(steps[target]))
            else:
                orch.reload(tensors[target] if i % 2 else str(steps[target]))
                served, committed = target, committed + 1
            assert orch.version == committed
            assert rel_l2(orch.forward(prompt), expected[served]) <= 1e-4
        growth = max(f - w for f, w in zip(orch.memory()[0], warm, strict=True))
    print(f"soak: {committed} committed of 50, rank RSS growth after warm-up {growth / 1e6:.1f} MB")
    assert committed == 40 and growth <= 64 << 20


@pytest.mark.slow
def test_rank_killed_while_serving_is_rebuilt(native_drill, steps, prompt):
    orch = serving(native_drill, steps["b"])
    before, version = orch.forward(prompt), orch.version
    kill_rank(orch, orch.placements()[0][0]["pid"], rank=0)
    with pytest.raises(RankError) as failed:
        orch.forward(prompt)
    assert f"back on version {version}" in "".join(getattr(failed.value, "__notes__", []))
    assert torch.equal(orch.forward(prompt), before)
    next_valid_reload(orch, steps, prompt)


@pytest.mark.parametrize("method", ["fp8", pytest.param("w4a8", marks=pytest.mark.slow)])
def test_nan_in_a_quantized_layer_is_found_through_its_scales(ray_cluster, tmp_path, prompt,
                                                              method):
    """Quantized layers are screened by their scales (no extra pass): still refused, named,
    and rolled back."""
    a = write_checkpoint(tmp_path / "a", "llama", seed=1, hidden_size=256,
                         intermediate_size=512, head_dim=64)
    bad = load_tensors(write_checkpoint(tmp_path / "b", "llama", seed=2, hidden_size=256,
                                        intermediate_size=512, head_dim=64))
    bad["model.layers.1.self_attn.k_proj.weight"][7, 9] = float("nan")
    with start(a, 2, quantization=method) as orch:
        served = Served(orch, prompt)
        with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight'"
                                                  r".*contains NaN or Inf"):
            orch.reload(bad)
        served.assert_unchanged(orch, prompt)


# ---- placement ---------------------------------------------------------------------------


def test_engine_target_is_a_soft_label_selector(ray_cluster, monkeypatch, caplog):
    """SPREAD aims an engine at a node through a public bundle_label_selector: honoured
    when the node exists; when it cannot be met in time, Ray places the engine anywhere."""
    from ray.util.placement_group import placement_group_table, remove_placement_group

    from orchestrator import EngineConfig
    from orchestrator.cluster import _reserve

    monkeypatch.setattr("orchestrator.cluster.TARGET_GRACE_S", 1.0)
    cfg = EngineConfig(model="unused", tensor_parallel_size=2, num_cpus_per_rank=0.25)
    node = ray.get_runtime_context().get_node_id()
    for target, falls_back in ((node, False), ("f" * 56, True)):  # a node that does not exist
        caplog.clear()
        with caplog.at_level("INFO", logger="tp_reload"):
            group = _reserve(0, cfg, target)
        table = placement_group_table(group)
        remove_placement_group(group)
        assert table["state"] == "CREATED"
        assert set(table["bundles_to_node_id"].values()) == {node}
        assert ("has no room for it now" in caplog.text) is falls_back
