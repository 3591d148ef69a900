"""Lazy source windows (what weight loaders of both engines receive) and the planner's
coverage check, against plain tensor indexing. No Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from actors.lazy import TensorWindow
from actors.reload.meta import ProbeWeight
from actors.reload.routes import covers


@pytest.fixture
def source() -> torch.Tensor:
    return torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5)


@pytest.mark.parametrize("ops", [
    lambda t: t.narrow(1, 2, 3).narrow(2, 1, 2),
    lambda t: t.unsqueeze(0).unbind()[0].narrow(0, 1, 2),   # vLLM's per-expert MoE pattern
    lambda t: t[2].narrow(0, 3, 2),
    lambda t: t.select(1, -1).unsqueeze(1).narrow(2, 0, 4),
    lambda t: t.chunk(2, dim=1)[1].narrow(0, 0, 3),
    lambda t: t.narrow(0, 1, 1).squeeze(0),
])
def test_window_algebra_reads_what_tensor_indexing_gives(source, ops):
    lazy = ops(TensorWindow("w", source))
    expected = ops(source)
    assert lazy.shape == expected.shape and lazy.ndim == expected.ndim
    assert lazy.numel() == expected.numel() and lazy.size(-1) == expected.size(-1)
    assert torch.equal(lazy.materialize(), expected)
    # Any torch op reads the window: loaders copy_ it like a tensor.
    target = torch.empty_like(expected)
    target.copy_(lazy)
    assert torch.equal(target, expected)
    assert torch.equal(lazy.reshape(-1), expected.reshape(-1))  # another method: reads too


def test_probe_records_only_the_boxes_read():
    probe = ProbeWeight((8, 4), torch.bfloat16, "model.x.weight")
    rows = probe.narrow(0, 4, 4)
    assert probe.reads == []  # narrowing reads nothing
    torch.empty(4, 4, dtype=torch.bfloat16, device="meta").copy_(rows)
    assert probe.reads == [((4, 8), (0, 4))]
    assert rows.name == "model.x.weight"
    with pytest.raises(ValueError, match=r"has 8 entries along dim 0, cannot take \[6, 10\)"):
        probe.narrow(0, 6, 4)


@pytest.mark.parametrize(("shape", "boxes", "expected"), [
    ((8, 4), [((0, 4), (0, 4)), ((4, 8), (0, 4))], True),           # two row slabs
    ((8, 4), [((0, 4), (0, 4)), ((0, 4), (0, 4))], False),          # a replicated half
    ((8, 4), [((0, 8), (0, 2)), ((0, 8), (2, 4))], True),           # column slabs
    ((8, 4), [((0, 5), (0, 4)), ((3, 8), (0, 4))], True),           # overlapping
    ((8, 4), [((0, 4), (0, 2)), ((4, 8), (0, 4))], False),          # a corner missing
    ((), [()], True),                                              # a scalar
    ((3,), [], False),
])
def test_coverage_of_a_tensor_by_every_ranks_reads(shape, boxes, expected):
    assert covers(shape, boxes) is expected


def test_the_core_imports_without_vllm():
    """Only rank actors hosting a vLLM engine import vLLM."""
    # A None entry makes any import of vllm fail.
    code = ("import sys; sys.modules['vllm'] = None\n"
            "import orchestrator, actors.rank_actor, actors.engines.vllm.platform\n"
            "import orchestrator.reload_orchestrator, benchmarks.reload_bench\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
