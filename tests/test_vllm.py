"""The vLLM engine: every TP rank of a real vLLM engine is a Ray actor, and reloads land in
it. Oracles: transformers (float32: greedy tokens and log-probs), and for online
quantization a fresh vLLM engine built by vLLM's own loader (``tests.vllm_oracle``)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
import ray
import torch

from actors import node_shm
from orchestrator import ConfigError, EngineConfig, RankError, ReloadOrchestrator
from tests.support import (
    BASE,
    Server,
    expected_rank_bytes,
    generate_fixed,
    load_tensors,
    reference_sample,
    reload_until_paused,
    sample_fixed,
    serving,
    start,
    within,
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
def vsteps(tmp_path_factory, llama32) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-steps")
    steps = dict(llama32)
    steps["shuffled"] = write_shuffled(steps["b"], root / "shuffled", files=6, seed=3)
    for name, seed in (("qa", 43), ("qb", 44)):
        steps[name] = write_checkpoint(root / name, "llama", seed=seed, dtype=torch.bfloat16,
                                       **HEAD)
    return steps


@pytest.fixture
def tp2_at_a(vllm_tp2, vsteps):
    """The session's shared TP=2 engine (``vllm_tp2``), serving step a."""
    return serving(vllm_tp2, vsteps["a"])


def cpu_shm_group_name(rank_actor) -> str:
    """In a vLLM rank: the shared-memory name vLLM's CPU communicator makes for its TP group."""
    from vllm.distributed import get_tp_group
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    return _CPUSHMDistributed.make_group_name(get_tp_group().device_communicator)


def assert_serves(orch, path: Path, prompt: torch.Tensor, engine: int = 0):
    """Greedy tokens equal transformers', their log-probs within LOGPROB_BOUND."""
    samples = sample_fixed(orch, prompt, NEW_TOKENS, temperature=0, engine=engine)
    tokens, logprobs = reference_sample(path, prompt, NEW_TOKENS)
    assert torch.equal(samples.tokens, tokens)
    assert (samples.logprobs - logprobs).abs().max().item() <= LOGPROB_BOUND
    assert torch.equal(generate_fixed(orch, prompt, NEW_TOKENS, engine=engine),
                       torch.cat([prompt, tokens], dim=1))
    return samples


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.shares("vllm_tp2"))])
def test_vllm_engine_serves_and_reloads_like_transformers(ray_cluster, vsteps, prompt, tp,
                                                          request):
    """TP=1 on an engine of its own, TP=2 on the session's shared one."""
    with contextlib.ExitStack() as own:
        orch = (request.getfixturevalue("tp2_at_a") if tp == 2
                else own.enter_context(start(vsteps["a"], tp, engine="vllm")))
        v0 = orch.version
        assert assert_serves(orch, vsteps["a"], prompt).version == v0
        with pytest.raises(NotImplementedError, match="not raw logits"):
            orch.forward(prompt)
        before = orch.inspect()
        report = orch.reload(str(vsteps["shuffled"]))  # 6 files, tensors scattered at random
        assert assert_serves(orch, vsteps["b"], prompt).version == report.version == v0 + 1
        assert orch.inspect() == before, "a kernel tensor moved or changed"
        # About total/TP each (replicated norms on top); together, every byte at least once.
        read = [report.bytes_read[(0, r)] for r in range(tp)]
        print(f"TP={tp}: bytes read per rank {read} of {report.source_bytes}")
        assert max(read) < 1.25 * report.source_bytes / tp and sum(read) >= report.source_bytes
        report = orch.reload(load_tensors(vsteps["a"]))
        assert assert_serves(orch, vsteps["a"], prompt).version == v0 + 2
        assert orch.inspect() == before
        seeded = [sample_fixed(orch, prompt, NEW_TOKENS, temperature=1.0, top_p=0.9, seed=7)
                  for _ in range(2)]
    assert torch.equal(seeded[0].tokens, seeded[1].tokens)
    assert bool((seeded[0].logprobs <= 0).all())


def test_two_vllm_engines_reload_together(vllm_tp2, vsteps, prompt):
    """num_engines replicas at TP=2 side by side on one node (the session's shared pair):
    each its own placement group, vLLM group and shared memory (named after its own
    instance: at TP=1 vLLM makes none, so a TP=1 pair could never show a collision); a
    reload reaches both before it commits. Closing removes every segment and temporary
    directory of theirs (checked when the session closes them: ``closed_without_trace``)."""
    orch = serving(vllm_tp2, vsteps["a"])
    v0 = orch.version
    for engine in (0, 1):
        assert_serves(orch, vsteps["a"], prompt, engine=engine)
    report = orch.reload(load_tensors(vsteps["b"]))
    for engine in (0, 1):
        assert assert_serves(orch, vsteps["b"], prompt, engine=engine).version == v0 + 1
    pids = {rank["pid"] for ranks in orch.placements() for rank in ranks}
    instances = [e.instance for e in orch.engines]
    live = node_shm.instances()
    assert len(set(instances)) == 2 and all(any("psm_" in n for n in live[i])
                                            for i in instances)
    assert all(node_shm.temp_dir(i).is_dir() for i in instances)
    # The name vLLM's CPU SHM communicator gives its segments (AVX-512 builds use it;
    # this one falls back to gloo, so ask it): the engine's own, on both of its ranks.
    for engine, instance in zip(orch.engines, instances, strict=True):
        names = ray.get([rank.__ray_call__.remote(cpu_shm_group_name)
                         for rank in engine.ranks])
        assert names == [f"/{instance}-tp:0-[0-1]-cpushm"] * 2
    assert set(report.bytes_read) == {(e, r) for e in (0, 1) for r in (0, 1)}
    assert len(pids) == 4


@pytest.mark.parametrize("method", [pytest.param("fp8_per_channel",
                                                 marks=pytest.mark.shares("vllm_fp8")),
                                    "int8_per_channel_weight_only"])
def test_online_quantized_reload_equals_vllms_own_loader(ray_cluster, vsteps, prompt, method,
                                                         request):
    """After a reload, tokens and log-probs equal those of a fresh engine vLLM itself built
    from the new checkpoint, at the same TP. vLLM's online FP8 reduces each layer's amax
    over the TP group, which a staged reload cannot do beside serving: refused by name,
    before anything moves; int8 (MoE only) leaves a dense model's linears unquantized,
    which stage. fp8_per_channel runs on the session's shared engine (``vllm_fp8``)."""
    with contextlib.ExitStack() as own:
        orch = (serving(request.getfixturevalue("vllm_fp8"), vsteps["qa"])
                if method == "fp8_per_channel" else
                own.enter_context(start(vsteps["qa"], 2, engine="vllm", dtype="bfloat16",
                                        quantization=method)))
        assert orch.config.quantization == method and orch.config.dtype == "bfloat16"
        before = orch.inspect()
        if method == "fp8_per_channel":
            old = sample_fixed(orch, prompt, NEW_TOKENS, temperature=0)
            with pytest.raises(RankError, match=r"processed together with the other ranks "
                                                r"\(collective\).*reload them unstaged"):
                orch.reload(str(vsteps["qb"]), staged=True)
            assert orch.memory(staging=True) == [[0, 0]]
            assert_same_samples(sample_fixed(orch, prompt, NEW_TOKENS, temperature=0), old)
            # Per-row scales reduce amax over the input dim: only row-parallel layers
            # all-reduce it, so only they wait for the failure consensus.
            collective = ray.get(orch.engines[0].ranks[1].__ray_call__.remote(
                lambda rank: [r.name for r in rank.reloader.records if r.collective]))
            layers = json.loads((vsteps["qa"] / "config.json").read_text())["num_hidden_layers"]
            assert sorted(collective) == sorted(f"model.layers.{i}.{proj}" for i in range(layers)
                                                for proj in ("self_attn.o_proj", "mlp.down_proj"))
        orch.reload(str(vsteps["qb"]), staged=method != "fp8_per_channel")
        ours = sample_fixed(orch, prompt, NEW_TOKENS, temperature=0)
        assert orch.inspect() == before
        kernel_dtypes = {t.dtype for t in orch.get_tensors(rank=1).values()}
    assert (torch.float8_e4m3fn in kernel_dtypes) == (method == "fp8_per_channel")
    # vLLM's oracle compiles its integer helpers once (fp8): that shows our ranks' eager
    # helpers give the same bits; the int8 oracle runs them eagerly (a compile costs 10-17 s).
    tokens, logprobs = vllm_greedy(vsteps["qb"], 2, prompt, NEW_TOKENS, dtype="bfloat16",
                                   quantization=method,
                                   compile_helpers=method == "fp8_per_channel")
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
        orch.reload(str(a), staged=True)  # the twin's experts kernel, handed over
        assert_serves(orch, a, prompt)
    tensors = load_tensors(b)
    expert_bytes = sum(t.nbytes for n, t in tensors.items() if ".experts." in n)
    assert report.share("experts")[0] == pytest.approx(
        expert_bytes / sum(t.nbytes for t in tensors.values()))


def assert_same_samples(actual, expected) -> None:
    assert actual.version == expected.version
    assert torch.equal(actual.tokens, expected.tokens)
    assert torch.equal(actual.logprobs, expected.logprobs)


def test_staged_reload_keeps_vllm_serving_and_switches_exactly(tp2_at_a, vsteps, prompt,
                                                              tmp_path):
    """While a staged reload streams into the ranks' twins, a rollout thread keeps sampling
    from the TP=2 engine, and rollouts complete while rank 1 is held in the middle of
    processing. Each rollout is bit for bit the old version's or the new one's, and says
    which (``Completion.version``); requests in flight finish on the old version (the flip
    waits for them). After the flip the engine serves what transformers computes, from the
    same kernel tensors, with its prefix cache started over."""
    orch = tp2_at_a
    v0 = orch.version
    old = assert_serves(orch, vsteps["a"], prompt)
    before = orch.inspect()
    server = Server(lambda: sample_fixed(orch, prompt, NEW_TOKENS, temperature=0))
    server.start()
    signal = tmp_path / "held"
    orch.inject_fault("process", "hold", rank=1, signal_path=str(signal))
    worker, outcome = reload_until_paused(orch, str(vsteps["shuffled"]), signal,
                                         "rank 1 never held", staged=True)
    begin = time.perf_counter()
    while len(within(server.answers, begin, time.perf_counter())) < 2:
        time.sleep(0.05)  # the test's timeout bounds this: serving must go on
    assert orch.memory(staging=True)[0][0] > 0
    signal.unlink()
    worker.join(timeout=120)
    answers = server.stop()
    (report,) = outcome
    new = assert_serves(orch, vsteps["b"], prompt)
    assert orch.inspect() == before
    assert orch.memory(staging=True) == [[0, 0], [0, 0]]  # both engines staged, both dropped
    again = orch.reload(str(vsteps["a"]), staged=True)  # the twin is reused
    assert_same_samples(sample_fixed(orch, prompt, NEW_TOKENS, temperature=0),
                        old._replace(version=v0 + 2))
    assert report.staged and new.version == report.version == v0 + 1 and again.version == v0 + 2
    print(f"vLLM staged: {report.seconds:.3f} s (rank 1 held part of it), paused "
          f"{report.pause_seconds:.4f} s; {len(answers)} rollouts beside it")
    for answer in answers:
        assert_same_samples(answer.value, old if answer.value.version == v0 else new)
    assert report.pause_seconds < report.seconds / 2
    # vLLM's CPU kernels keep every linear's weight prepacked in a closure (its registered
    # weight is empty) and the embeddings' in one beside their registered weight: staging
    # holds the rank's shard once, plus its embedding tensors a second time. vLLM pads the
    # vocabulary to a multiple of 64 rows (251 -> 256, 128 per rank).
    embedding = 256 // 2 * BASE["hidden_size"] * 4
    shard = expected_rank_bytes(vsteps["b"], 2, 0)
    dense = sum(b for n, b in shard.items() if "embed" not in n and "lm_head" not in n)
    assert report.staging_bytes == dense + 2 * 2 * embedding


def test_prefix_cache_is_dropped_at_every_commit(tp2_at_a, vsteps):
    """A prompt served before a reload is computed again after it, from the new weights."""
    long = torch.randint(0, 250, (1, 140), generator=torch.Generator().manual_seed(9))
    orch = tp2_at_a
    v0 = orch.version
    sample_fixed(orch, long, 4, temperature=0)
    again = sample_fixed(orch, long, 4, temperature=0)
    orch.reload(str(vsteps["b"]))
    after = sample_fixed(orch, long, 4, temperature=0)
    assert again.cached_tokens[0] >= 128, "within a version the prompt's full block is reused"
    assert after.cached_tokens == [0] and after.version == v0 + 1
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
        (dict(kv_cache_dtype="fp8", kv_scales="calibrate"), r"cannot calibrate KV scales"),
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
