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


def test_w4a8_inplace_conversion_then_reorder_on_another_stream():
    """Seed 004's race: the in-place uint4b8 -> int4 conversion on one stream, the reorder
    that reads the same buffer on another. Ordered by DeviceSync it is exact; without the
    ordering, and with the conversion's stream busy, the reorder reads unconverted nibbles."""
    from quant.sync import DeviceSync
    from quant.w4a8 import (
        convert_uint4b8_to_signed_inplace,
        group_scales,
        pack_uint4b8,
        quantize_int4,
        quantize_w4a8,
        reorder_for_kernel,
    )
    from tests.quant_reference import w4a8_reference

    device = torch.device("cuda", 0)
    w = torch.randn(8192, 4096, generator=torch.Generator().manual_seed(0)).to(device)
    expected = w4a8_reference(w.cpu())["weight_packed"]
    kernel, _, _ = quantize_w4a8(w, DeviceSync(device))
    torch.cuda.synchronize(device)
    assert torch.equal(kernel.cpu(), expected)

    def convert_then_reorder(ordered: bool) -> torch.Tensor:
        sync = DeviceSync(device, enabled=ordered)
        packed = pack_uint4b8(quantize_int4(w, group_scales(w)))
        torch.cuda.synchronize(device)
        convert, reorder = sync.new_stream(), sync.new_stream()
        with sync.on(convert):
            torch.cuda._sleep(300_000_000)  # a busy stream: the conversion runs late
            convert_uint4b8_to_signed_inplace(packed)
        sync.order(convert, reorder, packed)
        with sync.on(reorder):
            out = reorder_for_kernel(packed)
        torch.cuda.synchronize(device)
        return out.cpu()

    assert torch.equal(convert_then_reorder(ordered=True), expected)
    assert not torch.equal(convert_then_reorder(ordered=False), expected), \
        "without the event the reorder should have read unconverted nibbles"


@pytest.mark.parametrize("method", ["fp8", "fp8_per_channel", "fp8_block", "w4a8"])
def test_quantized_engine_on_gpu_is_exact_and_on_device(ray_cluster, tmp_path, method):
    """Scales and packed weights live on the rank's GPU and equal the CPU reference."""
    from tests.test_quant import SHAPE, check_kernels

    a = write_checkpoint(tmp_path / "a", "llama", seed=1, **SHAPE)
    b = write_checkpoint(tmp_path / "b", "llama", seed=2, **SHAPE)
    cfg = EngineConfig(model=str(a), tensor_parallel_size=1, device="cuda", dtype="float32",
                       quantization=method, kv_cache_dtype="fp8")
    with ReloadOrchestrator(cfg) as orch:
        check_kernels(orch, a, method, 1)
        before = orch.inspect()
        orch.reload(str(b))
        assert orch.inspect() == before
        check_kernels(orch, b, method, 1)
        assert {t["device"] for t in before[0].values()} == {"cuda:0"}
