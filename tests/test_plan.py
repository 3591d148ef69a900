"""The planner as tables (pure, no Ray), and the routing dry run on meta models."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from actors.engines.native import load_spec
from actors.engines.native.reloadable import route_on_meta
from orchestrator.plan import (
    PlannedTensor,
    cut_buckets,
    make_plan,
    order_tensors,
    predict_peak,
)
from quant import QuantConfig
from tests.support import expected_rank_bytes, parent_layer, write_checkpoint

LOG = logging.getLogger("test")


def t(name: str, layer: str, nbytes: int = 10, ranks: tuple[int, ...] | None = None
      ) -> PlannedTensor:
    return PlannedTensor(name, layer, nbytes, ranks if ranks is not None else (nbytes,))


LAYERS = ["embed", "layers.2.attn", "layers.2.mlp", "layers.10.attn", "layers.10.mlp", "head",
          "layers.2.kv_scales"]


@pytest.mark.parametrize(
    ("stream", "order", "expected"),
    [
        # parent-layer order follows the model's (numeric) order, not string order
        ([t("m10", "layers.10.mlp"), t("a2", "layers.2.attn"), t("e", "embed")], "plan",
         ["e", "a2", "m10"]),
        # stable inside a layer; attention scales (last in the model order) go last
        ([t("s", "layers.2.kv_scales"), t("q", "layers.2.attn"), t("k", "layers.2.attn"),
          t("h", "head")], "plan", ["q", "k", "h", "s"]),
        # source order is the source's own
        ([t("m10", "layers.10.mlp"), t("e", "embed")], "source", ["m10", "e"]),
    ],
)
def test_order(stream, order, expected):
    assert [x.name for x in order_tensors(stream, LAYERS, order)] == expected


def test_order_rejects_unknown_layers_and_orders():
    with pytest.raises(ValueError, match="not in the model's layer order"):
        order_tensors([t("x", "nowhere")], LAYERS, "plan")
    with pytest.raises(ValueError, match="order must be one of"):
        order_tensors([], LAYERS, "random")


@pytest.mark.parametrize(
    ("sizes", "bucket", "expected"),
    [
        # the limit ramps 10, 20, 40, then stays at bucket_bytes (RAMP_STEPS = 3)
        ([10] * 10, 80, [[10], [10, 10], [10] * 4, [10, 10, 10]]),
        ([10] * 16, 80, [[10], [10, 10], [10] * 4, [10] * 8, [10]]),
        ([30, 5, 5, 50], 80, [[30], [5, 5], [50]]),  # larger than its limit: travels alone
        ([100, 1], 80, [[100], [1]]),
        ([5, 5, 5, 5], 400, [[5, 5, 5, 5]]),
        ([1] * 8, 4, [[1], [1, 1], [1] * 4, [1]]),  # the first limit is at least one byte
        ([], 20, []),
    ],
)
def test_cut_buckets(sizes, bucket, expected):
    buckets = cut_buckets([t(str(i), "embed", n) for i, n in enumerate(sizes)], bucket)
    assert [[x.nbytes for x in b.tensors] for b in buckets] == expected


@pytest.mark.parametrize(
    ("stream", "last", "expected"),
    [
        # one layer at a time: the peak is the largest layer
        ([t("a", "L1", 4), t("b", "L1", 6), t("c", "L2", 3)], (), 10),
        # interleaved: L1 and L2 are both partly held at once
        ([t("a", "L1", 4), t("c", "L2", 3), t("b", "L1", 6), t("d", "L2", 3)], (), 13),
        # process_last layers stay buffered until the end
        ([t("s", "S", 2), t("a", "L1", 4), t("b", "L1", 6)], ("S",), 12),
        # per rank: the peak is the worst rank
        ([t("a", "L1", 0, (4, 1)), t("b", "L2", 0, (1, 9))], (), 9),
    ],
)
def test_predict_peak(stream, last, expected):
    assert predict_peak(stream, last) == expected


def test_make_plan_predicts_both_orders():
    stream = [t("a", "layers.2.attn", 4), t("m", "layers.2.mlp", 5), t("b", "layers.2.attn", 6),
              t("n", "layers.2.mlp", 1)]
    plan = make_plan(stream, LAYERS, bucket_bytes=8, order="plan")
    assert [x.name for x in plan.tensors] == ["a", "b", "m", "n"]
    # limits 1, 2, 4, 8 bytes (the ramp): each tensor overflows the bucket before it
    assert [[x.name for x in b.tensors] for b in plan.buckets] == [["a"], ["b"], ["m"], ["n"]]
    assert (plan.plan_order_peak_bytes, plan.source_order_peak_bytes) == (10, 15)
    assert plan.predicted_peak_buffered_bytes == 10 and plan.largest_layer_rank_bytes == 10
    source = make_plan(stream, LAYERS, bucket_bytes=8, order="source")
    assert source.predicted_peak_buffered_bytes == 15
    assert plan.layers == ("layers.2.attn", "layers.2.mlp")


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("deep") / "llama", "llama",
                            num_hidden_layers=12)


def routed(path, tp):
    from actors.transports import open_source

    tensors = [(i.name, i.shape, i.torch_dtype) for i in open_source(str(path)).tensors]
    return route_on_meta(load_spec(path), tp, torch.float32, QuantConfig(), tensors, LOG)


def test_routing_maps_every_tensor_to_its_parent(deep_llama):
    routing = routed(deep_llama, 2)
    assert routing.layer_of == {n: parent_layer(n) for n in routing.layer_of}
    assert set(routing.layer_of) == set(expected_rank_bytes(deep_llama, 2, 0))
    order = list(routing.layer_order)
    assert order.index("model.layers.2.mlp.down_proj") < order.index(
        "model.layers.10.input_layernorm")
    assert order[0] == "model.embed_tokens" and order[-1] == "lm_head"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_routing_rank_bytes_follow_the_shard_rules(deep_llama, tp):
    routing = routed(deep_llama, tp)
    for rank in range(tp):
        expected = expected_rank_bytes(deep_llama, tp, rank)
        assert {n: b[rank] for n, b in routing.rank_bytes.items()} == expected


def test_routing_skips_tied_head_and_rotary_cache(tmp_path):
    path = write_checkpoint(tmp_path / "tied", "qwen2")
    from actors.transports import open_source

    tensors = [(i.name, i.shape, i.torch_dtype) for i in open_source(str(path)).tensors]
    tensors += [("lm_head.weight", (130, 64), torch.float32),
                ("model.layers.0.self_attn.rotary_emb.inv_freq", (8,), torch.float32)]
    routing = route_on_meta(load_spec(path), 2, torch.float32, QuantConfig(), tensors, LOG)
    assert set(routing.skipped) == {"lm_head.weight",
                                    "model.layers.0.self_attn.rotary_emb.inv_freq"}
    assert "lm_head" not in routing.layer_order


@pytest.mark.slow  # a subprocess of its own
def test_plan_cli_prints_schedule_without_ray(deep_llama, tmp_path):
    from tests.support import load_tensors, parent_layer, write_shuffled

    shuffled = write_shuffled(deep_llama, tmp_path / "shuffled", files=6, seed=1)
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "plan", str(shuffled), "--tp", "2",
         "--bucket-bytes", "65536"],
        capture_output=True, text=True, check=True, timeout=120,
    )
    out = result.stdout
    assert "Ray" not in result.stderr, "planning must not start Ray"
    assert "TP=2, order=plan" in out and "shuffled-0" in out
    peaks = {line.split(":")[0].strip(): float(line.split(":")[1].split()[0])
             for line in out.splitlines()
             if line.strip().startswith(("plan order", "source order"))}
    assert peaks["source order (file order)"] > peaks["plan order (parent layer)"] > 0
    layers = {layer.strip() for line in out.splitlines() if line.startswith(" " * 25)
              for layer in line.split(",")}
    assert layers == {parent_layer(name) for name in load_tensors(deep_llama)}, \
        "the schedule names every layer the checkpoint feeds, and only those"
    files = {f"shuffled-{i:02d}.safetensors" for i in range(6)}
    assert {name for name in files if name in out} == files, "every file is read"
