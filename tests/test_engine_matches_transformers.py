"""TP engines on real Ray actors with real gloo groups, checked against transformers."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from orchestrator import EngineConfig, RankError, ReloadOrchestrator
from tests.checkpoints import (
    FAMILIES,
    reference_generate,
    reference_logits,
    rel_l2,
    write_checkpoint,
)

pytestmark = pytest.mark.ray
FLOAT32_BOUND = 1e-4
# bf16 engine vs a float32 transformers forward of the same bf16 weights: activations are
# rounded to 8 mantissa bits at every op, so a few parts in a hundred is expected.
BF16_BOUND = 3e-2


def checkpoint_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, element size), read with safetensors directly."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                itemsize = torch.empty(0, dtype=sl.get_dtype() == "BF16" and torch.bfloat16
                                       or torch.float32).element_size()
                out[name] = (tuple(sl.get_shape()), itemsize)
    return out


def expected_rank_bytes(path: Path, tp: int, rank: int) -> int:
    """What rank ``rank`` must read, from first principles: sharded tensors 1/tp, KV heads
    replicated (one head per rank) when tp > num_kv_heads, vocab rows split after padding
    to a multiple of tp, norms and row-parallel biases whole."""
    config = json.loads((path / "config.json").read_text())
    kv_heads = config["num_key_value_heads"]
    total = 0
    for name, (shape, itemsize) in checkpoint_tensors(path).items():
        numel = math.prod(shape)
        if "embed_tokens" in name or "lm_head" in name:
            rows = math.ceil(shape[0] / tp)
            real = max(0, min(rows, shape[0] - rank * rows))
            total += real * shape[1] * itemsize
        elif any(k in name for k in ("k_proj", "v_proj")):
            total += numel // min(tp, kv_heads) * itemsize
        elif any(k in name for k in ("q_proj", "gate_proj", "up_proj")) or (
            name.endswith("weight") and any(k in name for k in ("o_proj", "down_proj"))
        ):
            total += numel // tp * itemsize
        else:
            total += numel * itemsize
    return total


def start(path: Path, tp: int, **kwargs) -> ReloadOrchestrator:
    kwargs.setdefault("dtype", "float32")
    cfg = EngineConfig(model=str(path), tensor_parallel_size=tp, num_cpus_per_rank=0.5, **kwargs)
    return ReloadOrchestrator(cfg)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(ray_cluster, checkpoints, prompt, family, tp):
    path = checkpoints[family]
    with start(path, tp) as orch:
        logits = orch.forward(prompt)
        tokens = orch.generate(prompt, max_new_tokens=8)
        report = orch.load_report
        version = orch.version
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    assert logits.dtype == torch.float32 and logits.shape == (*prompt.shape, vocab)
    assert rel_l2(logits, reference_logits(path, prompt)) <= FLOAT32_BOUND
    assert torch.equal(tokens, reference_generate(path, prompt, 8))
    assert version == 0
    read = [report.bytes_read[(0, r)] for r in range(tp)]
    assert read == [expected_rank_bytes(path, tp, r) for r in range(tp)]
    if tp >= 2:
        assert max(read) < 1.25 * report.checkpoint_bytes / tp


def test_two_engines_serve_identical_replicas(ray_cluster, checkpoints, prompt):
    path = checkpoints["llama"]
    with start(path, 2, num_engines=2) as orch:
        logits = [orch.forward(prompt, engine=e) for e in (0, 1)]
        tokens = orch.generate(prompt, max_new_tokens=8, engine=1)
        placements = orch.placements()
        shapes = [{n: t["shape"] for n, t in orch.inspect(engine=e)[1].items()} for e in (0, 1)]
    expected = reference_logits(path, prompt)
    assert all(rel_l2(x, expected) <= FLOAT32_BOUND for x in logits)
    assert torch.equal(tokens, reference_generate(path, prompt, 8))
    pids = {rank["pid"] for engine in placements for rank in engine}
    assert len(pids) == 4, "each rank of each engine is its own actor process"
    assert shapes[0] == shapes[1]


def test_bfloat16_checkpoint_keeps_its_dtype(ray_cluster, tmp_path, prompt):
    path = write_checkpoint(tmp_path / "qwen3-bf16", "qwen3", seed=7, dtype=torch.bfloat16)
    with start(path, 2, dtype="auto") as orch:
        logits = orch.forward(prompt)
        tensors = orch.inspect()[0]
    # Rotary frequencies are computed in float32, never loaded; everything else is bf16.
    loaded = {n: t["dtype"] for n, t in tensors.items() if not n.endswith("inv_freq")}
    assert set(loaded.values()) == {"torch.bfloat16"}
    assert rel_l2(logits, reference_logits(path, prompt)) <= BF16_BOUND


def test_llama_checkpoint_is_sharded_with_an_index(checkpoints):
    """The llama cases above load through model.safetensors.index.json from several files."""
    path = checkpoints["llama"]
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 3
    assert len(list(path.glob("*.safetensors"))) == len(set(weight_map.values()))


def test_first_load_error_names_tensor_and_frees_resources(ray_cluster, tmp_path):
    import ray

    path = write_checkpoint(tmp_path / "bad", "llama")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96  # tensors on disk are 128 wide
    (path / "config.json").write_text(json.dumps(config))
    before = ray.available_resources().get("CPU")
    with pytest.raises(RankError) as err:
        start(path, 2).start()
    assert re.search(r"checkpoint tensor 'model\.layers\.\d+\.mlp\.\w+_proj\.weight': shape mismatch",
                     str(err.value))
    assert err.value.engine == 0
    groups = ray.util.placement_group_table().values()
    assert all(g["state"] == "REMOVED" for g in groups if g["name"].startswith("tp-reload"))
    # Ray's resource view is eventually consistent: give it a bounded moment to catch up.
    deadline = time.monotonic() + 15
    while ray.available_resources().get("CPU") != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU") == before
