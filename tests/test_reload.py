"""reload(): new weights into the tensors the engines already serve from, in parent-layer
order, from directories, dicts and iterables; checked against transformers."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from tests.support import (
    generate_fixed,
    largest_layer_rank_bytes,
    load_tensors,
    parent_layer,
    reference_generate,
    reference_logits,
    reference_model,
    rel_l2,
    serving,
    start,
    write_checkpoint,
    write_shuffled,
)

pytestmark = pytest.mark.ray
BOUND = 1e-4


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict[str, Path]:
    """Three llama checkpoints of one architecture with different random weights."""
    root = tmp_path_factory.mktemp("steps")
    return {name: write_checkpoint(root / name, "llama", seed=seed)
            for name, seed in (("a", 10), ("b", 11), ("c", 12))}


@pytest.fixture(scope="module")
def shared(ray_cluster, steps):
    """One TP=2 engine for the tests below that leave it serving (``serving`` brings it to
    step a first)."""
    with start(steps["a"], 2) as orch:
        yield orch


@contextlib.contextmanager
def engine_at_a(request, steps, tp: int = 2, engines: int = 1):
    """The module's shared engine serving step a at TP=2, else one of the test's own."""
    if (tp, engines) == (2, 1):
        yield serving(request.getfixturevalue("shared"), steps["a"])
        return
    with start(steps["a"], tp, num_engines=engines) as orch:
        yield orch


def assert_serves(orch, path: Path, prompt: torch.Tensor, engine: int = 0) -> None:
    assert rel_l2(orch.forward(prompt, engine=engine), reference_logits(path, prompt)) <= BOUND
    tokens = generate_fixed(orch, prompt, 8, engine=engine)
    assert torch.equal(tokens, reference_generate(path, prompt, 8))


@pytest.mark.parametrize(("tp", "engines"), [
    pytest.param(1, 1, marks=pytest.mark.slow), (2, 1), pytest.param(4, 1, marks=pytest.mark.slow),
    pytest.param(2, 2, marks=pytest.mark.slow)])
def test_reload_directory_in_place(ray_cluster, steps, prompt, tp, engines, request):
    with engine_at_a(request, steps, tp, engines) as orch:
        v0 = orch.version
        before = [orch.inspect(engine=e) for e in range(engines)]
        report = orch.reload(str(steps["b"]))
        assert report.version == orch.version == v0 + 1
        for e in range(engines):
            assert orch.inspect(engine=e) == before[e], "a kernel tensor moved or changed"
            assert_serves(orch, steps["b"], prompt, engine=e)
        assert report.layers_kept == []
        # Plan order buffers one layer at a time: the largest layer's share of a rank, by
        # the test's own sharding rules.
        assert report.peak_buffered_bytes == largest_layer_rank_bytes(steps["b"], tp)
        assert set(report.bytes_read) == {(e, r) for e in range(engines) for r in range(tp)}
        if tp > 1:
            assert max(report.bytes_read.values()) < 1.25 * report.source_bytes / tp


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_reload_other_families(ray_cluster, tmp_path, prompt, family):
    a = write_checkpoint(tmp_path / "a", family, seed=1)
    b = write_checkpoint(tmp_path / "b", family, seed=2)
    with start(a, 2) as orch:
        before = orch.inspect()
        orch.reload(str(b))
        assert orch.inspect() == before
        assert_serves(orch, b, prompt)


def test_reload_from_dict_and_iterable(ray_cluster, steps, prompt, request):
    with engine_at_a(request, steps) as orch:
        v0 = orch.version
        before = orch.inspect()
        report = orch.reload(load_tensors(steps["b"]))
        assert report.version == v0 + 1 and report.source.startswith("in-memory dict")
        assert_serves(orch, steps["b"], prompt)
        report = orch.reload(iter(load_tensors(steps["c"]).items()))
        assert report.version == v0 + 2 and report.source.startswith("in-memory iterable")
        assert_serves(orch, steps["c"], prompt)
        assert orch.inspect() == before
        # bf16 in-memory weights (as a trainer would hand them) are converted on load.
        bf16 = {n: t.bfloat16() for n, t in load_tensors(steps["b"]).items()}
        orch.reload(bf16)
        expected = {n: t.float() for n, t in bf16.items()}
        assert torch.equal(orch.get_tensor("model.norm.weight"), expected["model.norm.weight"])


def test_plan_order_buffers_one_layer_and_source_order_more(ray_cluster, tmp_path, prompt):
    base = write_checkpoint(tmp_path / "base", "llama", seed=3, num_hidden_layers=4)
    new = write_checkpoint(tmp_path / "new", "llama", seed=4, num_hidden_layers=4)
    shuffled = write_shuffled(new, tmp_path / "shuffled", files=8, seed=0)
    bucket = 8 << 10
    largest = largest_layer_rank_bytes(new, 2)
    with start(base, 2, bucket_bytes=bucket) as orch:
        planned = orch.reload(str(shuffled), order="plan")
        assert_serves(orch, new, prompt)
        orch.reload(str(base))
        unordered = orch.reload(str(shuffled), order="source")
        assert_serves(orch, new, prompt)
    assert planned.buckets > 10
    assert planned.peak_buffered_bytes == largest
    assert planned.warnings == []
    assert unordered.peak_buffered_bytes > planned.peak_buffered_bytes * 2
    assert any("layers were partly buffered at once" in w for w in unordered.warnings)
    print(f"largest layer {largest}, plan peak {planned.peak_buffered_bytes}, source peak "
          f"{unordered.peak_buffered_bytes}, predicted {planned.predicted_peak_buffered_bytes}/"
          f"{unordered.predicted_peak_buffered_bytes}")
    for report in (planned, unordered):
        predicted, measured = report.predicted_peak_buffered_bytes, report.peak_buffered_bytes
        assert abs(predicted - measured) <= 0.1 * measured


def test_partial_source_reloads_only_its_layers(ray_cluster, steps, prompt, request):
    new = {n: t for n, t in load_tensors(steps["c"]).items() if ".layers.1." in n}
    with engine_at_a(request, steps) as orch:
        untouched = orch.get_tensor("model.layers.0.mlp.gate_up_proj.weight", rank=1)
        embed = orch.get_tensor("model.embed_tokens.weight", rank=0)
        report = orch.reload(new)
        assert set(report.layers_reloaded) == {parent_layer(n) for n in new}
        assert "model.layers.0.mlp.gate_up_proj" in report.layers_kept
        assert torch.equal(orch.get_tensor("model.layers.0.mlp.gate_up_proj.weight", rank=1),
                           untouched)
        assert torch.equal(orch.get_tensor("model.embed_tokens.weight"), embed)
        logits = orch.forward(prompt)
    hybrid = reference_model(steps["a"])
    hybrid.load_state_dict(new, strict=False)
    with torch.no_grad():
        expected = hybrid(prompt).logits
    assert rel_l2(logits, expected) <= BOUND


def test_twenty_reloads_keep_rank_memory_flat(ray_cluster, steps, request):
    """Resident memory after 20 reloads (dir and dict, alternating) stays within 16 MB of
    what it was after the first two; the model itself is ~0.4 MB, so a leak of the buffered
    calls or of transfer buffers would show."""
    sources = [str(steps["b"]), load_tensors(steps["c"])]
    with engine_at_a(request, steps) as orch:
        v0 = orch.version
        for i in range(2):
            orch.reload(sources[i % 2])
        warm = orch.memory()[0]
        for i in range(18):
            orch.reload(sources[i % 2])
        final = orch.memory()[0]
        assert orch.version == v0 + 20
    growth = [f - w for f, w in zip(final, warm, strict=True)]
    print(f"rank RSS after warm-up {warm}, after 20 reloads {final}")
    assert max(growth) <= 16 << 20, f"rank RSS grew by {growth} bytes"
