"""CUDA path (skipped without a GPU): one rank actor on its own GPU, checked against
transformers on the CPU."""

from __future__ import annotations

import pytest
import torch

from orchestrator import EngineConfig, ReloadOrchestrator
from tests.support import reference_generate, reference_logits, rel_l2, write_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.ray]


def test_tp1_on_one_gpu(ray_cluster, checkpoints, prompt):
    path = checkpoints["qwen3"]
    cfg = EngineConfig(model=str(path), tensor_parallel_size=1, device="cuda", dtype="float32")
    with ReloadOrchestrator(cfg) as orch:
        logits = orch.forward(prompt)
        tokens = orch.generate(prompt, max_new_tokens=8)
        placement = orch.placements()[0][0]
        devices = {t["device"] for t in orch.inspect()[0].values()}
    assert len(placement["gpu_ids"]) == 1
    assert devices == {"cuda:0"}
    assert rel_l2(logits, reference_logits(path, prompt)) <= 1e-4
    assert torch.equal(tokens, reference_generate(path, prompt, 8))


def test_cuda_graph_follows_a_reload(ray_cluster, tmp_path, prompt):
    """A graph captured before the reload replays with the new weights: every kernel tensor
    was written in place, so the addresses baked into the graph still hold the weights."""
    a = write_checkpoint(tmp_path / "a", "llama", seed=1)
    b = write_checkpoint(tmp_path / "b", "llama", seed=2)
    cfg = EngineConfig(model=str(a), tensor_parallel_size=1, device="cuda", dtype="float32")
    with ReloadOrchestrator(cfg) as orch:
        orch.capture_cuda_graph(prompt)
        before = orch.replay_cuda_graph()
        orch.reload(str(b))
        after = orch.replay_cuda_graph()
        eager = orch.forward(prompt)
    assert rel_l2(before, reference_logits(a, prompt)) <= 1e-4
    assert rel_l2(after, reference_logits(b, prompt)) <= 1e-4
    assert rel_l2(after, eager) <= 1e-6
