"""CUDA path (skipped without a GPU): one rank actor on its own GPU (or sharing it with a
colocated trainer), checked against transformers on the CPU."""

from __future__ import annotations

import pytest
import torch

from orchestrator import EngineConfig, ReloadOrchestrator
from tests.support import (
    TensorTrainer,
    generate_fixed,
    kernel_tensors,
    load_tensors,
    reference_generate,
    reference_logits,
    rel_l2,
    start,
    unequal_tensors,
    write_checkpoint,
)

pytestmark = [pytest.mark.gpu, pytest.mark.ray]


def test_tp1_on_one_gpu(ray_cluster, checkpoints, prompt):
    path = checkpoints["qwen3"]
    cfg = EngineConfig(model=str(path), tensor_parallel_size=1, device="cuda", dtype="float32")
    with ReloadOrchestrator(cfg) as orch:
        logits = orch.forward(prompt)
        tokens = generate_fixed(orch, prompt, 8)
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


def _w4a8_expert_rank(rank: int, tp: int, gate: torch.Tensor, up: torch.Tensor,
                      down: torch.Tensor, ordered: bool) -> dict[str, torch.Tensor]:
    """One TP rank's fused-expert layer on the shared GPU: loaded expert by expert through
    its loader, then converted by the W4A8 MoE method. The conversion's stream is made
    busy (it sleeps before the in-place int4 conversion), so a reorder that is not ordered
    after it reads unconverted nibbles."""
    import quant.moe
    import quant.w4a8
    from quant.sync import DeviceSync

    device = torch.device("cuda", 0)
    convert = quant.w4a8.convert_uint4b8_to_signed_inplace

    def late_convert(packed: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(300_000_000)
        return convert(packed)

    # Patched for this call only: Ray reuses worker processes between tasks.
    saved = quant.w4a8.convert_uint4b8_to_signed_inplace, quant.moe.DeviceSync
    quant.w4a8.convert_uint4b8_to_signed_inplace = late_convert
    if not ordered:
        quant.moe.DeviceSync = lambda dev: DeviceSync(dev, enabled=False)
    try:
        return _convert_expert_rank(rank, tp, gate, up, down, device)
    finally:
        quant.w4a8.convert_uint4b8_to_signed_inplace, quant.moe.DeviceSync = saved


def _convert_expert_rank(rank: int, tp: int, gate: torch.Tensor, up: torch.Tensor,
                         down: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    from actors.engines.native.moe import FusedMoE
    from actors.engines.native.parallel import TPGroup
    from quant.moe import W4A8MoEMethod
    from quant.sync import DeviceSync

    experts, inter, hidden = gate.shape[0], gate.shape[1], gate.shape[2]
    layer = FusedMoE(experts, hidden, inter, dtype=torch.float32, tp=TPGroup(rank, tp),
                     quant_method=W4A8MoEMethod())
    for name in ("w13_weight", "w2_weight"):
        meta = layer._parameters[name]
        param = torch.nn.Parameter(torch.empty(meta.shape, device=device), requires_grad=False)
        param.weight_loader = meta.weight_loader
        layer._parameters[name] = param
    for e in range(experts):
        layer.weight_loader(layer.w13_weight, gate[e], (e, "w1"))
        layer.weight_loader(layer.w13_weight, up[e], (e, "w3"))
        layer.weight_loader(layer.w2_weight, down[e], (e, "w2"))
    DeviceSync(device).synchronize()
    layer.quant_method.process_weights_after_loading(layer)
    DeviceSync(device).synchronize()
    return {n: t.cpu() for n, t in layer.named_parameters()}


def test_w4a8_moe_convert_and_reorder_streams_at_tp2_on_one_gpu(ray_cluster):
    """Two TP ranks share one GPU (half a GPU each, at the same time), each converting its
    slice of every expert with the in-place conversion and the reorder on separate streams.
    With DeviceSync ordering both ranks equal the CPU reference bit for bit; with the
    ordering dropped they do not."""
    import ray

    from tests.quant_reference import rank_experts, reference_expert_kernels

    experts, hidden, inter, tp = 4, 1024, 2048, 2
    gen = torch.Generator().manual_seed(7)
    gate, up = (torch.randn(experts, inter, hidden, generator=gen) for _ in range(2))
    down = torch.randn(experts, hidden, inter, generator=gen)
    task = ray.remote(num_gpus=0.5, num_cpus=0.5)(_w4a8_expert_rank)
    tensors = {f"layers.0.mlp.experts.{e}.{p}.weight": w[e]
               for e in range(experts)
               for p, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down))}
    config = {"moe_intermediate_size": inter}
    refs = {o: [task.remote(r, tp, gate, up, down, o) for r in range(tp)] for o in (True, False)}
    for ordered, calls in refs.items():
        served = ray.get(calls)
        for rank in range(tp):
            weights = rank_experts(tensors, config, tp, rank)["layers.0.mlp.experts"]
            expected = {n: t for proj, w in weights.items()
                        for n, t in reference_expert_kernels(w, proj, "w4a8").items()}
            exact = all(torch.equal(served[rank][n], t) for n, t in expected.items())
            assert exact == ordered, f"rank {rank}, ordered={ordered}"


def test_w4a8_moe_engine_on_gpu_reloads_in_place(ray_cluster, tmp_path, prompt):
    from tests.test_moe import QSHAPE, check_expert_kernels

    a = write_checkpoint(tmp_path / "a", "qwen3_moe", seed=1, **QSHAPE)
    b = write_checkpoint(tmp_path / "b", "qwen3_moe", seed=2, **QSHAPE)
    cfg = EngineConfig(model=str(a), tensor_parallel_size=1, device="cuda", dtype="float32",
                       quantization="w4a8")
    with ReloadOrchestrator(cfg) as orch:
        check_expert_kernels(orch, a, "w4a8", 1)
        before = orch.inspect()
        orch.reload(str(b))
        assert orch.inspect() == before
        check_expert_kernels(orch, b, "w4a8", 1)
        assert {t["device"] for t in before[0].values()} == {"cuda:0"}
        logits = orch.forward(prompt)
    assert logits.isfinite().all()


def test_colocated_trainer_reloads_over_cuda_ipc_and_rolls_back(ray_cluster, tmp_path, prompt):
    """A trainer actor and the engine's rank share the GPU (half each): the reload goes over
    CUDA IPC and its kernel tensors equal a directory reload's bit for bit; a trainer that
    dies mid-reload rolls back to that version, rebuilt from what the rank kept."""
    import ray

    from orchestrator import TrainerError, TrainerSource

    a, b, c = (write_checkpoint(tmp_path / n, "llama", seed=s)
               for n, s in (("a", 1), ("b", 2), ("c", 3)))
    trainer = ray.remote(num_gpus=0.5, num_cpus=0)(TensorTrainer)
    with start(a, 1, device="cuda", num_gpus_per_rank=0.5, bucket_bytes=32 << 10) as orch:
        report = orch.reload(TrainerSource([trainer.remote(load_tensors(b), device="cuda")]))
        assert report.transport == "cuda_ipc"
        assert rel_l2(orch.forward(prompt), reference_logits(b, prompt)) <= 1e-4
        from_trainer = kernel_tensors(orch)
        orch.reload(str(b))
        assert unequal_tensors(kernel_tensors(orch), from_trainer) == []
        orch.reload(TrainerSource([trainer.remote(load_tensors(b), device="cuda")]))
        served = orch.forward(prompt)
        dying = trainer.remote(load_tensors(c), die_after_buckets=2, device="cuda")
        with pytest.raises(TrainerError, match="trainer rank 0") as info:
            orch.reload(TrainerSource([dying]))
        assert info.value.died
        assert unequal_tensors(kernel_tensors(orch), from_trainer) == []
        assert torch.equal(orch.forward(prompt), served)
