"""The vLLM engine: every TP rank of a real vLLM engine is a Ray actor, and reloads land in
it. Oracles: transformers (float32: greedy tokens and log-probs), and for online
quantization a fresh vLLM engine built by vLLM's own loader (``tests.vllm_oracle``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator import ConfigError, EngineConfig, ReloadOrchestrator
from tests.support import (
    load_tensors,
    reference_sample,
    start,
    write_checkpoint,
    write_shuffled,
)
from tests.vllm_oracle import vllm_greedy

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
NEW_TOKENS = 8
LOGPROB_BOUND = 1e-4
# vLLM's CPU attention supports head sizes 32, 64, ...: the test models use 32.
HEAD = dict(head_dim=32)


@pytest.fixture(scope="module")
def vsteps(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-steps")
    steps = {name: write_checkpoint(root / name, "llama", seed=seed, **HEAD)
             for name, seed in (("a", 41), ("b", 42))}
    steps["shuffled"] = write_shuffled(steps["b"], root / "shuffled", files=6, seed=3)
    for name, seed in (("qa", 43), ("qb", 44)):
        steps[name] = write_checkpoint(root / name, "llama", seed=seed, dtype=torch.bfloat16,
                                       **HEAD)
    return steps


def assert_serves(orch, path: Path, prompt: torch.Tensor, engine: int = 0):
    """Greedy tokens equal transformers', their log-probs within LOGPROB_BOUND."""
    samples = orch.sample(prompt, NEW_TOKENS, temperature=0, engine=engine)
    tokens, logprobs = reference_sample(path, prompt, NEW_TOKENS)
    assert torch.equal(samples.tokens, tokens)
    assert (samples.logprobs - logprobs).abs().max().item() <= LOGPROB_BOUND
    assert torch.equal(orch.generate(prompt, NEW_TOKENS, engine=engine),
                       torch.cat([prompt, tokens], dim=1))
    return samples


@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_engine_serves_and_reloads_like_transformers(ray_cluster, vsteps, prompt, tp):
    with start(vsteps["a"], tp, engine="vllm") as orch:
        assert assert_serves(orch, vsteps["a"], prompt).version == 0
        with pytest.raises(NotImplementedError, match="not raw logits"):
            orch.forward(prompt)
        before = orch.inspect()
        report = orch.reload(str(vsteps["shuffled"]))  # 6 files, tensors scattered at random
        assert assert_serves(orch, vsteps["b"], prompt).version == report.version == 1
        assert orch.inspect() == before, "a kernel tensor moved or changed"
        # About total/TP each (replicated norms on top); together, every byte at least once.
        read = [report.bytes_read[(0, r)] for r in range(tp)]
        print(f"TP={tp}: bytes read per rank {read} of {report.source_bytes}")
        assert max(read) < 1.25 * report.source_bytes / tp and sum(read) >= report.source_bytes
        report = orch.reload(load_tensors(vsteps["a"]))
        assert assert_serves(orch, vsteps["a"], prompt).version == 2
        assert orch.inspect() == before
        seeded = [orch.sample(prompt, NEW_TOKENS, temperature=1.0, top_p=0.9, seed=7)
                  for _ in range(2)]
    assert torch.equal(seeded[0].tokens, seeded[1].tokens)
    assert bool((seeded[0].logprobs <= 0).all())


def test_two_vllm_engines_reload_together(ray_cluster, vsteps, prompt):
    """num_engines replicas: each its own placement group and vLLM group; a reload reaches
    both before it commits."""
    with start(vsteps["a"], 1, engine="vllm", num_engines=2) as orch:
        report = orch.reload(load_tensors(vsteps["b"]))
        for engine in (0, 1):
            assert assert_serves(orch, vsteps["b"], prompt, engine=engine).version == 1
        pids = {rank["pid"] for ranks in orch.placements() for rank in ranks}
    assert set(report.bytes_read) == {(0, 0), (1, 0)} and len(pids) == 2


@pytest.mark.parametrize("method", ["fp8_per_channel", "int8_per_channel_weight_only"])
def test_online_quantized_reload_equals_vllms_own_loader(ray_cluster, vsteps, prompt, method):
    """After a reload, tokens and log-probs equal those of a fresh engine vLLM itself built
    from the new checkpoint, at the same TP."""
    with start(vsteps["qa"], 2, engine="vllm", dtype="bfloat16", quantization=method) as orch:
        before = orch.inspect()
        orch.reload(str(vsteps["qb"]))
        ours = orch.sample(prompt, NEW_TOKENS, temperature=0)
        assert orch.inspect() == before
        kernel_dtypes = {t.dtype for t in orch.get_tensors(rank=1).values()}
    assert (torch.float8_e4m3fn in kernel_dtypes) == (method == "fp8_per_channel")
    tokens, logprobs = vllm_greedy(vsteps["qb"], 2, prompt, NEW_TOKENS, dtype="bfloat16",
                                   quantization=method)
    print(f"{method}: ours vs vLLM's loader, max log-prob difference "
          f"{(ours.logprobs - logprobs).abs().max().item():.2e}")
    assert torch.equal(ours.tokens, tokens)
    assert torch.allclose(ours.logprobs, logprobs, rtol=0, atol=1e-6)


def test_qwen3_moe_reload_matches_transformers(ray_cluster, tmp_path, prompt):
    """vLLM's own reload_weights serves wrong tokens here (its CPU experts kernel is not
    re-packed after a weight update); ours re-runs that packing."""
    a = write_checkpoint(tmp_path / "a", "qwen3_moe", seed=5, **HEAD)
    b = write_checkpoint(tmp_path / "b", "qwen3_moe", seed=6, **HEAD)
    with start(a, 2, engine="vllm") as orch:
        assert_serves(orch, a, prompt)
        report = orch.reload(str(b))
        assert_serves(orch, b, prompt)
    tensors = load_tensors(b)
    expert_bytes = sum(t.nbytes for n, t in tensors.items() if ".experts." in n)
    assert report.share("experts")[0] == pytest.approx(
        expert_bytes / sum(t.nbytes for t in tensors.values()))


def test_prefix_cache_is_dropped_at_every_commit(ray_cluster, vsteps):
    """A prompt served before a reload is computed again after it, from the new weights."""
    long = torch.randint(0, 250, (1, 140), generator=torch.Generator().manual_seed(9))
    with start(vsteps["a"], 2, engine="vllm") as orch:
        orch.sample(long, 4, temperature=0)
        again = orch.sample(long, 4, temperature=0)
        orch.reload(str(vsteps["b"]))
        after = orch.sample(long, 4, temperature=0)
    assert again.cached_tokens[0] >= 128, "within a version the prompt's full block is reused"
    assert after.cached_tokens == [0] and after.version == 1
    tokens, logprobs = reference_sample(vsteps["b"], long, 4)
    assert torch.equal(after.tokens, tokens)
    assert (after.logprobs - logprobs).abs().max().item() <= LOGPROB_BOUND


AVX512 = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def refused_before_placing(message: str, **kwargs: object) -> None:
    """A value no engine takes is refused by the config itself; what this platform cannot
    run with this model, by start() before any placement group exists."""
    import ray

    groups = len(ray.util.placement_group_table())
    with pytest.raises(ConfigError, match=message):
        ReloadOrchestrator(EngineConfig(**{"engine": "vllm", **kwargs})).start()
    assert len(ray.util.placement_group_table()) == groups


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(quantization="fp8", dtype="bfloat16"),
         r"quantization='fp8' cannot run on vLLM's CPU build for this dense model; names that "
         r"work here: \[None, 'fp8_per_channel', 'int8_per_channel_weight_only'\]"),
        (dict(quantization="fp8_per_block", dtype="bfloat16"), r"'fp8_per_block' cannot run"),
        (dict(quantization="w4a8", dtype="bfloat16"),
         r"'w4a8' is not an online quantization of vLLM 0\.32"),
        (dict(quantization="fp8_per_channel", dtype="float32"),
         r"needs dtype 'bfloat16' or 'float16', got 'float32'"),
        pytest.param(dict(kv_cache_dtype="fp8"), r"needs AVX-512 or AMX",
                     marks=pytest.mark.skipif(AVX512, reason="this CPU runs an FP8 KV cache")),
        (dict(kv_cache_dtype="fp8", kv_scales="calibrate"), r"native-engine option"),
        (dict(engine_args={"enforce_eager": False}, engine="native"), r"takes none"),
    ],
)
def test_what_vllm_cannot_run_here_is_refused_before_placing(ray_cluster, vsteps, kwargs,
                                                             message):
    refused_before_placing(message, model=str(vsteps["a"]), tensor_parallel_size=2, **kwargs)


def test_moe_and_head_size_limits_are_refused_before_placing(ray_cluster, tmp_path):
    moe = write_checkpoint(tmp_path / "moe", "qwen3_moe", **HEAD)
    refused_before_placing(r"for this MoE model; names that work here: \[None\]",
                           model=str(moe), dtype="bfloat16", quantization="fp8_per_channel")
    narrow = write_checkpoint(tmp_path / "narrow", "llama")  # head_dim 16
    refused_before_placing(r"head size 16 .* not supported by vLLM's CPU", model=str(narrow))
