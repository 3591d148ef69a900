"""Asynchronous rollouts with in-flight weight updates, on the engines' continuous batches:
concurrent ``agenerate`` calls equal the blocking path and transformers; a staged reload
flips between two decode steps while they run, and each mode does what it says, with every
token tagged by the version that drew it; cancelled requests free their slots; a reload
that fails while requests run leaves them on the old weights. The oracle is transformers'
float32 model of each checkpoint (greedy decoding and teacher-forced log-probs)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from tests.support import load_tensors, reference_model, serving

pytestmark = pytest.mark.ray

LOGPROB_BOUND = 1e-4
COUNT = 16


class Oracle:
    def __init__(self, paths: dict) -> None:
        self.models = {name: reference_model(path) for name, path in paths.items()}

    @torch.no_grad()
    def next_token(self, name: str, context: list[int]) -> int:
        return int(self.models[name](torch.tensor([context])).logits[0, -1].argmax())

    def greedy(self, name: str, prompt: list[int], count: int) -> list[int]:
        ids = list(prompt)
        for _ in range(count):
            ids.append(self.next_token(name, ids))
        return ids[len(prompt):]

    @torch.no_grad()
    def logprobs(self, name: str, prompt: list[int], tokens: list[int]) -> torch.Tensor:
        logits = self.models[name](torch.tensor([prompt + tokens])).logits[0].float()
        return torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1).gather(
            -1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.fixture(scope="module")
def oracle(llama32) -> Oracle:
    return Oracle(llama32)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(29)
    return [torch.randint(0, 251, (3 + i,), generator=gen).tolist() for i in range(COUNT)]


@pytest.fixture(params=["native", pytest.param("vllm", marks=[pytest.mark.vllm,
                                                               pytest.mark.shares("vllm_tp2")])])
def engine(request, llama32):
    """An orchestrator serving llama32['a']: the session's shared native TP=2 engine or
    vLLM pair."""
    if request.param == "native":
        return serving(request.getfixturevalue("native_tp2"), llama32["a"])
    return serving(request.getfixturevalue("vllm_tp2"), llama32["a"])


async def gather_generate(orch, calls: list[dict]):
    return await asyncio.gather(*(orch.agenerate(**call) for call in calls))


async def generate_during(orch, calls: list[dict], action) -> tuple[list, object]:
    """``calls`` concurrently; once every one is admitted, ``action()`` on a thread."""
    tasks = [asyncio.ensure_future(orch.agenerate(**call)) for call in calls]
    deadline = time.monotonic() + 60
    while sum(await asyncio.to_thread(orch.running)) < len(calls):
        assert time.monotonic() < deadline, "the requests never all ran"
        await asyncio.sleep(0.01)
    result = await asyncio.to_thread(action)
    return await asyncio.gather(*tasks), result


def assert_spans_cover(completion) -> None:
    spans = completion.versions
    assert spans[0][1] == 0 and spans[-1][2] == len(completion.token_ids)
    assert all(a[2] == b[1] and a[0] != b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert completion.version == spans[0][0]


def test_concurrent_agenerate_calls_equal_the_blocking_path(engine, oracle, prompts):
    """16 concurrent calls of different lengths, half greedy, half sampled with seeds."""
    calls = [dict(prompt=p, max_new_tokens=4 + i, temperature=0.0 if i % 2 else 0.8,
                  seed=100 + i, ignore_eos=True) for i, p in enumerate(prompts)]
    done = asyncio.run(gather_generate(engine, calls))
    version = engine.version
    for call, completion in zip(calls, done, strict=True):
        blocking = engine.sample([call["prompt"]], call["max_new_tokens"],
                                 temperature=call["temperature"], seed=call["seed"],
                                 ignore_eos=True)[0]
        assert completion.token_ids == blocking.token_ids
        assert completion.versions == [(version, 0, call["max_new_tokens"])]
        error = torch.tensor(completion.logprobs) - oracle.logprobs(
            "a", call["prompt"], completion.token_ids)
        assert error.abs().max().item() <= LOGPROB_BOUND
        if call["temperature"] == 0:
            assert completion.token_ids == oracle.greedy("a", call["prompt"],
                                                         call["max_new_tokens"])


def test_astream_yields_tokens_as_they_come_and_a_cancel_frees_the_slot(engine, prompts):
    async def scenario():
        deltas = [d async for d in engine.astream(prompts[0], 12, temperature=0.0,
                                                   ignore_eos=True)]
        whole = await engine.agenerate(prompts[0], 12, temperature=0.0, ignore_eos=True)
        long = asyncio.ensure_future(engine.agenerate(prompts[1], 240, ignore_eos=True))
        while sum(await asyncio.to_thread(engine.running)) == 0:
            await asyncio.sleep(0.01)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        return deltas, whole

    deltas, whole = asyncio.run(scenario())
    assert len(deltas) >= 2 and deltas[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    deadline = time.monotonic() + 30
    while sum(engine.running()) != 0:
        assert time.monotonic() < deadline, "a cancelled request kept its slot"
        time.sleep(0.05)


@pytest.mark.vllm
def test_a_recompute_flip_goes_on_with_the_new_weights_on_the_whole_context(
        vllm_tp2, llama32, oracle, prompts):
    orch = serving(vllm_tp2, llama32["a"])
    old = orch.version
    calls = [dict(prompt=p, max_new_tokens=150 + 5 * i, temperature=0.0, ignore_eos=True,
                  engine=0) for i, p in enumerate(prompts)]
    done, report = asyncio.run(generate_during(
        orch, calls, lambda: orch.reload(str(llama32["b"]), staged=True,
                                         in_flight="recompute")))
    assert report.version == old + 1 == orch.version
    flipped = 0
    for call, completion in zip(calls, done, strict=True):
        tokens, prompt = completion.token_ids, call["prompt"]
        assert len(tokens) == call["max_new_tokens"] and completion.finish_reason == "length"
        assert_spans_cover(completion)
        assert [v for v, _, _ in completion.versions] in ([old], [old, old + 1])
        flip = completion.versions[0][2]
        flipped += flip < len(tokens)
        scores = torch.tensor(completion.logprobs)
        before = oracle.logprobs("a", prompt, tokens)[:flip]
        after = oracle.logprobs("b", prompt, tokens)[flip:]
        assert (scores[:flip] - before).abs().max().item() <= LOGPROB_BOUND
        if flip < len(tokens):
            assert (scores[flip:] - after).abs().max().item() <= LOGPROB_BOUND
            assert tokens[:flip] == oracle.greedy("a", prompt, flip)
            # Greedy on the new weights, each token given everything before it.
            assert tokens[flip:flip + 3] == oracle.greedy("b", prompt + tokens[:flip], 3)
    assert flipped >= COUNT // 2, "the flip should land while most requests run"


@pytest.mark.vllm
@pytest.mark.parametrize("mode", ["keep", "wait", "abort"])
def test_keep_wait_and_abort_flips_do_what_they_say(vllm_tp2, llama32, oracle, prompts, mode):
    orch = serving(vllm_tp2, llama32["a"])
    old = orch.version
    calls = [dict(prompt=p, max_new_tokens=120, temperature=0.0, ignore_eos=True, engine=0)
             for p in prompts[:8]]
    done, _ = asyncio.run(generate_during(
        orch, calls, lambda: orch.reload(str(llama32["b"]), staged=True, in_flight=mode)))
    assert orch.version == old + 1 and len(done) == len(calls), "a request was lost"
    for call, completion in zip(calls, done, strict=True):
        tokens = completion.token_ids
        expected = oracle.greedy("a", call["prompt"], len(tokens))
        if mode == "wait":  # finished on the old weights before the flip
            assert completion.versions == [(old, 0, 120)] and tokens == expected
        elif mode == "abort":  # ended at the flip with the tokens it had
            assert completion.finish_reason == "abort" and 0 < len(tokens) < 120
            assert completion.versions == [(old, 0, len(tokens))] and tokens == expected
        else:  # keep: went on, drawing from the new weights with the old KV cache
            assert_spans_cover(completion)
            flip = completion.versions[0][2]
            assert len(tokens) == 120 and tokens[:flip] == expected[:flip]
            assert [v for v, _, _ in completion.versions] in ([old], [old, old + 1])


@pytest.mark.vllm
def test_a_failed_staged_reload_leaves_running_requests_on_the_old_weights(
        vllm_tp2, llama32, oracle, prompts):
    orch = serving(vllm_tp2, llama32["a"])
    old, before = orch.version, orch.get_tensors()
    bad = load_tensors(llama32["b"])
    bad["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")

    def reload_nan() -> str:
        with pytest.raises(Exception, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as failed:
            orch.reload(bad, staged=True, in_flight="recompute")
        return str(failed.value)

    calls = [dict(prompt=p, max_new_tokens=100, temperature=0.0, ignore_eos=True, engine=0)
             for p in prompts[:8]]
    done, _ = asyncio.run(generate_during(orch, calls, reload_nan))
    for call, completion in zip(calls, done, strict=True):
        assert completion.versions == [(old, 0, 100)]
        assert completion.token_ids == oracle.greedy("a", call["prompt"], 100)
    assert orch.version == old
    after = orch.get_tensors()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
