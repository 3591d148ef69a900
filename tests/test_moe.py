"""Mixture-of-experts families (Qwen3-MoE, Mixtral): reloads against transformers, per-expert
online quantization bit for bit against the independent reference, and buffering bounded by
one expert layer however small the buckets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.quant_reference import dequantize, rank_experts, reference_expert_kernels, same_bytes
from tests.support import (
    expected_rank_bytes,
    generate_fixed,
    largest_layer_rank_bytes,
    load_tensors,
    parent_layer,
    reference_generate,
    reference_logits,
    reference_model,
    rel_l2,
    start,
    write_checkpoint,
    write_shuffled,
)

pytestmark = pytest.mark.ray
FLOAT32_BOUND = 1e-4
METHODS = ["fp8", "fp8_per_channel", "fp8_block", "w4a8"]
# Experts of width 320: 160 per rank at TP=2, so w13 has 320 rows (a partial 128-row block)
# and w2 has K = 160 (a partial 128-wide group and block); hidden 256 gives two groups.
QSHAPE = dict(hidden_size=256, intermediate_size=384, moe_intermediate_size=320,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_hidden_layers=2,
              mlp_only_layers=[])


def serves(orch, path: Path, prompt: torch.Tensor) -> None:
    assert rel_l2(orch.forward(prompt), reference_logits(path, prompt)) <= FLOAT32_BOUND
    assert torch.equal(generate_fixed(orch, prompt, 6),
                       reference_generate(path, prompt, 6))


def expert_bytes_share(path: Path) -> float:
    tensors = load_tensors(path)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    experts = sum(t.numel() * t.element_size() for n, t in tensors.items() if ".experts." in n)
    return experts / total


@pytest.mark.parametrize("tp", [pytest.param(1, marks=pytest.mark.slow), 2])
@pytest.mark.parametrize("family", ["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_moe_reload_matches_transformers(ray_cluster, tmp_path, prompt, family, tp):
    a = write_checkpoint(tmp_path / "a", family, seed=31)
    b = write_checkpoint(tmp_path / "b", family, seed=32)
    with start(a, tp) as orch:
        serves(orch, a, prompt)
        before = orch.inspect()
        report = orch.reload(str(b))
        assert orch.inspect() == before, "a kernel tensor moved or changed dtype/shape"
        serves(orch, b, prompt)
    experts = {parent_layer(n) for n in load_tensors(b) if ".experts." in n}
    assert experts and experts <= set(report.layers_reloaded)
    bytes_share, seconds_share = report.share("experts")
    print(f"{family} TP={tp}: expert layers hold {bytes_share:.0%} of the bytes and take "
          f"{seconds_share:.0%} of the rank time")
    assert bytes_share == pytest.approx(expert_bytes_share(b))
    assert 0 < seconds_share < 1


def test_qwen3_moe_dense_layers_follow_the_config(ray_cluster, tmp_path, prompt):
    """decoder_sparse_step=2 and mlp_only_layers=[3]: only layer 1 is sparse."""
    path = write_checkpoint(tmp_path / "a", "qwen3_moe", seed=5, num_hidden_layers=4,
                            decoder_sparse_step=2, mlp_only_layers=[3])
    with start(path, 2) as orch:
        names = set(orch.inspect()[0])
        serves(orch, path, prompt)
    assert {n.split(".mlp.")[0] for n in names if ".experts." in n} == {"model.layers.1"}
    assert "model.layers.0.mlp.gate_up_proj.weight" in names


@pytest.fixture(scope="module")
def qsteps(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-qsteps")
    return {n: write_checkpoint(root / n, "qwen3_moe", seed=s, **QSHAPE)
            for n, s in (("a", 41), ("b", 42))}


def check_expert_kernels(orch, path: Path, method: str, tp: int) -> None:
    config = json.loads((path / "config.json").read_text())
    tensors = load_tensors(path)
    for rank in range(tp):
        served = orch.get_tensors(rank=rank)
        for layer, weights in rank_experts(tensors, config, tp, rank).items():
            for proj, w in weights.items():
                for name, tensor in reference_expert_kernels(w, proj, method).items():
                    assert same_bytes(served[f"{layer}.{name}"], tensor), \
                        f"rank {rank} {layer}.{name}"


@pytest.mark.slow
@pytest.mark.parametrize(("method", "tp"), [(m, 2) for m in METHODS] + [("w4a8", 1)])
def test_per_expert_quantization_is_exact(ray_cluster, qsteps, method, tp):
    with start(qsteps["a"], tp, quantization=method) as orch:
        check_expert_kernels(orch, qsteps["a"], method, tp)
        before = orch.inspect()
        orch.reload(str(qsteps["b"]))
        assert orch.inspect() == before, "a kernel tensor moved or changed dtype/shape"
        check_expert_kernels(orch, qsteps["b"], method, tp)
        orch.reload(load_tensors(qsteps["a"]))
        check_expert_kernels(orch, qsteps["a"], method, tp)


def dequantized_model(path: Path, served: dict[str, torch.Tensor], method: str):
    """transformers model (TP=1 layout) whose linear and expert weights are the dequantized
    kernel tensors; the kernels were checked bit-exact against the reference first."""
    config = json.loads((path / "config.json").read_text())
    q, kv = (config["num_attention_heads"] * config["head_dim"],
             config["num_key_value_heads"] * config["head_dim"])
    state = {}
    for name in served:
        if name.endswith(".experts.w13_weight_scale"):
            layer = name.removesuffix(".w13_weight_scale")
            for proj, hf in (("w13", "gate_up_proj"), ("w2", "down_proj")):
                weight = served[f"{layer}.{proj}_weight"]
                scale = served[f"{layer}.{proj}_weight_scale"]
                state[f"{layer}.{hf}"] = torch.stack([dequantize(
                    {"weight": weight[e], "weight_scale": scale[e]}, method)
                    for e in range(weight.shape[0])])
        elif name.endswith("_proj.weight_scale"):
            layer = name.removesuffix(".weight_scale")
            w = dequantize({"weight": served[f"{layer}.weight"], "weight_scale": served[name]},
                           method)
            if layer.endswith("qkv_proj"):
                head = layer.removesuffix("qkv_proj")
                for part, t in zip("qkv", w.split([q, kv, kv]), strict=True):
                    state[f"{head}{part}_proj.weight"] = t
            else:
                state[f"{layer}.weight"] = w
    model = reference_model(path)
    missing = set(state) - set(model.state_dict())
    assert not missing, f"names transformers does not have: {sorted(missing)[:3]}"
    model.load_state_dict(state, strict=False)
    return model


@pytest.mark.slow
def test_fp8_experts_serve_the_dequantized_reference(ray_cluster, qsteps, prompt):
    with start(qsteps["b"], 1, quantization="fp8") as orch:
        check_expert_kernels(orch, qsteps["b"], "fp8", 1)
        logits = orch.forward(prompt)
        served = orch.get_tensors(rank=0)
    with torch.no_grad():
        expected = dequantized_model(qsteps["b"], served, "fp8")(prompt).logits
    error = rel_l2(logits, expected)
    print(f"fp8 MoE TP=1: rel. L2 vs dequantized transformers {error:.2e}, vs unquantized "
          f"{rel_l2(logits, reference_logits(qsteps['b'], prompt)):.2e}")
    assert error <= 1e-3


def test_small_buckets_stream_an_expert_layer_with_bounded_buffering(ray_cluster, tmp_path,
                                                                      prompt):
    """Buckets far smaller than one expert layer, a source scattered over many files: in
    plan order each rank buffers at most the largest expert layer plus one bucket."""
    a = write_checkpoint(tmp_path / "a", "qwen3_moe", seed=51)
    b_written = write_checkpoint(tmp_path / "b", "qwen3_moe", seed=52)
    b = write_shuffled(b_written, tmp_path / "b-shuffled", files=6, seed=3)
    bucket = 8 << 10
    tp = 2
    expert_layer_bytes = {}
    for rank in range(tp):
        for name, nbytes in expected_rank_bytes(b, tp, rank).items():
            if ".experts." in name:
                key = (parent_layer(name), rank)
                expert_layer_bytes[key] = expert_layer_bytes.get(key, 0) + nbytes
    largest = max(expert_layer_bytes.values())
    assert largest > 4 * bucket, "the test needs expert layers much larger than a bucket"
    with start(a, tp, bucket_bytes=bucket) as orch:
        report = orch.reload(str(b))
        serves(orch, b_written, prompt)
        source_order = orch.plan(str(b), order="source")
    print(f"expert layer {largest} B per rank, bucket {bucket} B: peak buffered "
          f"{report.peak_buffered_bytes} B in {report.buckets} buckets (source order would "
          f"buffer {source_order.predicted_peak_buffered_bytes} B)")
    assert report.buckets > 2 * len({layer for layer, _ in expert_layer_bytes})
    assert report.peak_buffered_bytes == largest_layer_rank_bytes(b, tp) <= largest + bucket
    assert source_order.predicted_peak_buffered_bytes > largest + bucket
