"""The fast CPU quantization paths give the same bits as the arithmetic they stand for.

* ``quant.fp8`` quantizes row blocks (so a float32 temporary stays in cache) and takes a
  per-row absolute max from separate amin/amax passes: checked against the independent
  numpy reference, with blocks small enough that every weight spans several of them, an
  uneven last block included.
* ``process_weights_into`` writes a reload's fp8 results (and w4a8's reordered packed
  weight) straight into the tensors a layer serves from (no copy of them), the same bits as
  the reference, and touches none of them when they do not fit (the reload engine then
  names the mismatch).
* ``actors.engines.vllm.kernels`` swaps two of vLLM's helpers during our processing: checked against
  vLLM's originals, bit for bit, NaN and Inf included, and put back afterwards.
No Ray: these are pure functions.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quant.fp8 as fp8
import quant.moe as moe
import quant.w4a8 as w4a8
from tests.quant_reference import (
    fp8_reference,
    reference_expert_kernels,
    same_bytes,
    w4a8_reference,
)

GRANULARITIES = ("tensor", "channel", "block")


def weight(rows: int = 300, cols: int = 1000, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[3] = 0.0  # a zero row: its scale comes from the 1e-12 floor
    w[7, :5] = torch.tensor([-0.0, 1e-30, -5.0, 448.0, 3e4])  # subnormal, a negative max
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_row_blocks_change_no_bit(monkeypatch, granularity):
    w = weight()
    # 7 rows per block, and 300 = 42 * 7 + 6: an uneven last block.
    monkeypatch.setattr(fp8, "CPU_CHUNK_ELEMENTS", 7 * w.shape[1] + 13)
    qweight, scale = fp8.quantize_weight(w, granularity)
    expected = fp8_reference(w, granularity)
    assert same_bytes(qweight, expected["weight"])
    assert same_bytes(scale, expected["weight_scale"])


def test_abs_max_along_a_dim_is_exact_and_propagates_nan():
    w = weight()
    w[11, 17] = float("nan")
    w[12, 2] = float("-inf")
    amax = fp8.abs_max(w, dim=1, keepdim=True).float()
    expected = w.float().abs().amax(dim=1, keepdim=True)
    assert torch.isnan(amax[11]).all() and torch.isinf(amax[12]).all()
    finite = torch.ones(w.shape[0], dtype=torch.bool)
    finite[11] = finite[12] = False
    assert torch.equal(amax[finite], expected[finite])


def served(tensors: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """Kernel params as a layer serves them, filled with a pattern no result has."""
    return {n: nn.Parameter(torch.full(t.shape, 0.5).to(t.dtype), requires_grad=False)
            for n, t in tensors.items()}


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_linear_results_go_straight_into_the_served_tensors(granularity):
    method = {"tensor": fp8.Fp8LinearMethod, "channel": fp8.Fp8PerChannelLinearMethod,
              "block": fp8.Fp8BlockLinearMethod}[granularity]()
    w = weight()
    expected = fp8_reference(w, granularity)
    kernel = served(expected)
    layer = nn.Module()
    layer.weight = nn.Parameter(w, requires_grad=False)
    method.process_weights_into(layer, kernel)
    for name, tensor in expected.items():
        assert getattr(layer, name) is kernel[name], name  # registered: nothing to copy
        assert same_bytes(kernel[name], tensor), name


def test_w4a8_packed_weight_is_reordered_straight_into_the_served_one():
    """The reorder (step 5) writes the served ``weight_packed``; the scales are copied into
    theirs. Bits equal the independent reference, and a misfit touches nothing."""
    w = weight()
    expected = w4a8_reference(w)
    kernel = served(expected)
    layer = nn.Module()
    layer.weight = nn.Parameter(w, requires_grad=False)
    w4a8.W4A8LinearMethod().process_weights_into(layer, kernel)
    assert "weight" not in layer._parameters
    for name, tensor in expected.items():
        assert getattr(layer, name) is kernel[name], name
        assert same_bytes(kernel[name], tensor), name
    wrong = served({**expected, "weight_packed": expected["weight_packed"][:-1]})
    before = {n: t.clone() for n, t in wrong.items()}
    layer.weight = nn.Parameter(w, requires_grad=False)
    w4a8.W4A8LinearMethod().process_weights_into(layer, wrong)
    assert all(same_bytes(wrong[n], before[n]) for n in wrong)
    assert all(getattr(layer, n) is not wrong[n] for n in wrong)
    assert all(same_bytes(getattr(layer, n), t) for n, t in expected.items())


def test_a_kernel_that_does_not_fit_is_left_untouched():
    w = weight()
    expected = fp8_reference(w, "channel")
    wrong = served({"weight": expected["weight"][:-1], "weight_scale": expected["weight_scale"]})
    before = {n: t.clone() for n, t in wrong.items()}
    layer = nn.Module()
    layer.weight = nn.Parameter(w, requires_grad=False)
    fp8.Fp8PerChannelLinearMethod().process_weights_into(layer, wrong)
    assert all(torch.equal(wrong[n].float(), before[n].float()) for n in wrong)
    assert layer.weight is not wrong["weight"] and layer.weight_scale is not wrong["weight_scale"]
    assert same_bytes(layer.weight, expected["weight"])


EXPERT_METHODS = (moe.Fp8MoEMethod, moe.Fp8PerChannelMoEMethod, moe.Fp8BlockMoEMethod,
                  moe.W4A8MoEMethod)


def expert_layer(method: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Three experts, and their kernel tensors by the independent reference for ``method``.
    w2's K (296) spans an uneven last fp8 block and w4a8 group."""
    layer, expected = nn.Module(), {}
    experts = {"w13": torch.stack([weight(seed=s) for s in range(3)]),
               "w2": torch.stack([weight(rows=200, cols=296, seed=s) for s in range(3, 6)])}
    for proj, w in experts.items():
        layer.register_parameter(f"{proj}_weight", nn.Parameter(w, requires_grad=False))
        expected |= reference_expert_kernels(w, proj, method)
    return layer, expected


@pytest.mark.parametrize("method", EXPERT_METHODS, ids=[m.name for m in EXPERT_METHODS])
def test_expert_results_go_straight_into_the_served_tensors(monkeypatch, method):
    """Chunk by chunk (two experts, then one), each into its experts of the served tensor."""
    layer, expected = expert_layer(method.name)
    kernel = served(expected)
    monkeypatch.setattr(moe, "CHUNK_ELEMENTS", 2 * 300 * 1000)
    method().process_weights_into(layer, kernel)
    for name, tensor in expected.items():
        assert getattr(layer, name) is kernel[name], name
        assert same_bytes(kernel[name], tensor), name


@pytest.mark.parametrize("method", EXPERT_METHODS, ids=[m.name for m in EXPERT_METHODS])
def test_experts_that_do_not_fit_leave_every_served_tensor_untouched(method):
    """w2's served weight has one expert too few: w13's, which fits, is not written either."""
    layer, expected = expert_layer(method.name)
    big = "w2_weight_packed" if method.name == "w4a8" else "w2_weight"
    wrong = served({**expected, big: expected[big][:-1]})
    before = {n: t.clone() for n, t in wrong.items()}
    method().process_weights_into(layer, wrong)
    for name in wrong:
        assert same_bytes(wrong[name], before[name]), name
        assert getattr(layer, name) is not wrong[name], name
    assert all(same_bytes(getattr(layer, n), t) for n, t in expected.items())


@pytest.fixture
def vllm_kernels():
    """Imported by the tests that use it, not at collection: importing vLLM takes 5 s here,
    which every pytest run (the inner loop's too) would pay."""
    return pytest.importorskip("actors.engines.vllm.kernels", reason="vLLM is not installed")


@pytest.mark.slow  # imports vLLM
def test_vllm_fast_paths_match_vllm_bit_for_bit(vllm_kernels):
    from vllm.model_executor.layers.quantization.online import fp8 as online_fp8

    w = weight(rows=700, cols=1536)
    w[5, 9] = float("nan")
    w[6, 1] = float("inf")
    w[8, 4] = float("-inf")
    original_amax, original_quant = online_fp8.weight_amax, online_fp8._fp8_quant_per_channel
    amax = online_fp8.weight_amax(w, dim=-1, keepdim=True)
    clean = w.nan_to_num(posinf=0.0, neginf=0.0)
    scale = online_fp8._fp8_channel_scale(online_fp8.weight_amax(clean, dim=-1, keepdim=True))
    # vLLM's own: one chunk of 16M elements; the fast path: three of 512K.
    quantized = online_fp8._fp8_quant_per_channel(clean, scale)
    with vllm_kernels.cpu_fast_paths(torch.device("cpu")):
        assert online_fp8.weight_amax is not original_amax
        assert fp8.CPU_CHUNK_ELEMENTS < clean.numel()  # several chunks
        fast_amax = online_fp8.weight_amax(w, dim=-1, keepdim=True)
        fast_quantized = online_fp8._fp8_quant_per_channel(clean, scale)
        whole, whole_clean = online_fp8.weight_amax(w), online_fp8.weight_amax(clean)
    assert same_bytes(fast_amax, amax)  # NaN and Inf rows included, bit for bit
    assert same_bytes(fast_quantized, quantized)
    # The whole-tensor amax is vLLM's own there; against plain torch, NaN propagated.
    assert torch.isnan(whole) and torch.isnan(w.float().abs().amax())
    assert same_bytes(whole_clean.float().reshape(1), clean.float().abs().amax().reshape(1))
    # Put back on exit, and on an exception inside.
    assert online_fp8.weight_amax is original_amax
    assert online_fp8._fp8_quant_per_channel is original_quant
    with pytest.raises(RuntimeError), vllm_kernels.cpu_fast_paths(torch.device("cpu")):
        raise RuntimeError("processing failed")
    assert online_fp8.weight_amax is original_amax


@pytest.mark.slow  # imports vLLM
def test_vllm_fast_paths_leave_cuda_alone(vllm_kernels):
    from vllm.model_executor.layers.quantization.online import fp8 as online_fp8

    original = online_fp8.weight_amax
    with vllm_kernels.cpu_fast_paths(torch.device("cuda")):
        assert online_fp8.weight_amax is original
