"""The step loop (``actors.step_loop``) over the native continuous batcher, in one process
without Ray (one rank: the GPU machine runs these too): requests that join and leave between
steps decode like transformers; an in-flight flip between two steps does what its mode says,
tagging every token with the weights that drew it. And the step exchange itself, over a gloo
group of two processes."""

from __future__ import annotations

import logging
import multiprocessing
import socket
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from actors.engines.native import load_spec
from actors.engines.native.batcher import ContinuousBatcher
from actors.engines.runtime import Request, SamplingRequest
from actors.reload.staging_area import StagingArea
from actors.step_loop import Delta, Flip, Step, StepLoop, exchange_step
from tests.support import load_tensors, reference_model, write_checkpoint
from tests.test_rank_in_process import DEVICES, InProcessRank

LOGPROB_BOUND = 1e-4
LENGTHS = (3, 9, 5, 14, 7, 4)


def greedy(sampling_tokens: int, logprobs: bool = True) -> SamplingRequest:
    return SamplingRequest(max_new_tokens=sampling_tokens, temperature=0.0, top_p=1.0, top_k=0,
                           stop_token_ids=(), logprobs=logprobs)


class SlowBatcher(ContinuousBatcher):
    """The native runtime's serving half, a little slower per step: a flip's moment stays
    well inside every request (CPU decoding of the small model is fast)."""

    def step(self):
        time.sleep(0.002)
        return super().step()


class Collector:
    """Every delta of a loop, by request."""

    def __init__(self, loop: StepLoop) -> None:
        self.loop = loop
        self.deltas: dict[str, list[Delta]] = {}

    def until_done(self, ids: list[str], timeout_s: float = 60.0) -> dict[str, list[Delta]]:
        deadline = time.monotonic() + timeout_s
        while not all(self.finished(i) for i in ids):
            assert time.monotonic() < deadline, "requests did not finish"
            for delta in self.loop.events(0.2):
                self.deltas.setdefault(delta.request_id, []).append(delta)
        return {i: self.deltas[i] for i in ids}

    def until_tokens(self, request_id: str, count: int) -> None:
        while sum(len(d.token_ids) for d in self.deltas.get(request_id, [])) < count:
            for delta in self.loop.events(0.2):
                self.deltas.setdefault(delta.request_id, []).append(delta)

    def finished(self, request_id: str) -> bool:
        return any(d.finish_reason for d in self.deltas.get(request_id, []))


def tokens(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def logprobs(deltas: list[Delta]) -> torch.Tensor:
    return torch.tensor([s for d in deltas for s in d.logprobs])


def versions(deltas: list[Delta]) -> list[int]:
    return [d.version for d in deltas for _ in d.token_ids]


@torch.no_grad()
def teacher_forced(model, prompt: list[int], out: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([prompt + out])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1).gather(
        -1, torch.tensor(out)[:, None])[:, 0]


@torch.no_grad()
def reference_greedy(model, prompt: list[int], count: int) -> list[int]:
    ids = list(prompt)
    for _ in range(count):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return {name: write_checkpoint(root / name, "llama", seed=seed, num_hidden_layers=2)
            for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def references(two_steps):
    return {name: reference_model(path) for name, path in two_steps.items()}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 251, (n,), generator=gen).tolist() for n in LENGTHS]


def start_loop(path, device: str, staged_from=None):
    rank = InProcessRank(path, device)
    area = None
    if staged_from is not None:
        area = StagingArea(rank.engine.model, rank.device, logging.getLogger("test"), True)
    batcher = SlowBatcher(rank.model, load_spec(path).num_layers, rank.device)
    loop = StepLoop(batcher, 0, 1, lambda version: area.flip(),
                    logging.LoggerAdapter(logging.getLogger("test"), {}), timeout_s=30)
    loop.version = 0
    return rank, area, loop


@pytest.mark.parametrize("device", DEVICES)
def test_requests_joining_between_steps_decode_like_transformers(two_steps, references,
                                                                 prompts, device):
    rank, _, loop = start_loop(two_steps["a"], device)
    try:
        seen = Collector(loop)
        lengths = [6, 11, 4, 9, 7, 12]
        first = [Request(f"r{i}", p, greedy(lengths[i]), 0) for i, p in enumerate(prompts[:3])]
        loop.submit(first)
        seen.until_tokens("r0", 2)  # the others join a batch that is already decoding
        later = [Request(f"r{i}", p, greedy(lengths[i]), 0)
                 for i, p in enumerate(prompts[3:], start=3)]
        loop.submit(later)
        loop.cancel(["r5"])
        done = seen.until_done([r.request_id for r in first + later])
        for index, prompt in enumerate(prompts[:5]):
            got = done[f"r{index}"]
            assert tokens(got) == reference_greedy(references["a"], prompt, lengths[index])
            assert got[-1].finish_reason == "length"
            error = logprobs(got) - teacher_forced(references["a"], prompt, tokens(got))
            assert error.abs().max().item() <= LOGPROB_BOUND
        assert done["r5"][-1].finish_reason == "abort"
        assert not loop.runtime.has_work(), "a cancelled request kept its slot"
    finally:
        loop.stop()


def flip_mid_flight(two_steps, prompts, device, mode: str):
    """Requests decoding on step a while step b is staged; the flip happens once every
    request drew 3 tokens. Returns (deltas by request, the loop's version after)."""
    rank, area, loop = start_loop(two_steps["a"], device, staged_from=True)
    try:
        seen = Collector(loop)
        requests = [Request(f"r{i}", p, greedy(10), 0) for i, p in enumerate(prompts)]
        loop.submit(requests)
        area.prepare([r.name for r in rank.engine.records], "device")
        rank.load(two_steps["b"], engine=area.reloader)  # staged while the loop decodes
        for request in requests:
            seen.until_tokens(request.request_id, 3)
        loop.flip(1, mode)
        return seen.until_done([r.request_id for r in requests]), loop.version
    finally:
        loop.stop()


@pytest.mark.parametrize("device", DEVICES)
def test_a_recompute_flip_continues_every_request_on_the_new_weights(two_steps, references,
                                                                     prompts, device):
    done, version = flip_mid_flight(two_steps, prompts, device, "recompute")
    assert version == 1
    for index, prompt in enumerate(prompts):
        got = done[f"r{index}"]
        out, tags = tokens(got), versions(got)
        flip = tags.index(1)
        assert 3 <= flip < len(out) and tags == [0] * flip + [1] * (len(out) - flip)
        # Before the flip: step a's greedy; after: step b's, given the whole context.
        assert out[:flip] == reference_greedy(references["a"], prompt, flip)
        for position in range(flip, len(out)):
            context = prompt + out[:position]
            assert out[position] == reference_greedy(references["b"], context, 1)[0]
        scores = logprobs(got)
        old = teacher_forced(references["a"], prompt, out)[:flip]
        new = teacher_forced(references["b"], prompt, out)[flip:]
        assert (scores[:flip] - old).abs().max().item() <= LOGPROB_BOUND
        assert (scores[flip:] - new).abs().max().item() <= LOGPROB_BOUND


@pytest.mark.parametrize("mode", ["wait", "abort", "keep"])
def test_wait_abort_and_keep_flips_do_what_they_say(two_steps, references, prompts, mode):
    done, version = flip_mid_flight(two_steps, prompts, "cpu", mode)
    assert version == 1
    for index, prompt in enumerate(prompts):
        got = done[f"r{index}"]
        out, tags = tokens(got), versions(got)
        if mode == "wait":  # finished on step a, untouched
            assert tags == [0] * 10 and got[-1].finish_reason == "length"
            assert out == reference_greedy(references["a"], prompt, 10)
        elif mode == "abort":  # ended at the flip with what it had
            assert 3 <= len(out) < 10 and set(tags) == {0}
            assert got[-1].finish_reason == "abort"
            assert out == reference_greedy(references["a"], prompt, len(out))
        else:  # keep: goes on with the KV cache of step a, drawing from step b's weights
            flip = tags.index(1)
            assert len(out) == 10 and tags == [0] * flip + [1] * (10 - flip)
            assert out[:flip] == reference_greedy(references["a"], prompt, flip)


def test_the_staged_weights_served_after_a_flip_are_the_new_checkpoint(two_steps, prompts):
    """After any flip the kernel tensors hold step b exactly (the staging was copied in)."""
    rank, area, loop = start_loop(two_steps["a"], "cpu", staged_from=True)
    try:
        area.prepare([r.name for r in rank.engine.records], "device")
        rank.load(two_steps["b"], engine=area.reloader)
        loop.flip(1, "keep")
        expected = load_tensors(two_steps["b"])
        served = rank.kernel()
        assert torch.equal(served["model.layers.0.mlp.down_proj.weight"],
                           expected["model.layers.0.mlp.down_proj.weight"])
    finally:
        loop.stop()


STEPS = [
    Step(), Step(park=True), Step(stop=True), Step(jobs=3), Step(jobs=2, park=True),
    Step(cancel=("r1", "r2")), Step(flip=Flip(5, "keep"), jobs=1),
    Step(admit=(Request("r3", [1, 2, 3], greedy(4), seed=7),), park=True),
]


def _exchange_rank(rank: int, port: int, received: Any) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=60))
    try:
        got = [exchange_step(step if rank == 0 else None, rank, dist.group.WORLD)
               for step in STEPS]
        received.put((rank, got))
    finally:
        dist.destroy_process_group()


def test_every_rank_receives_the_step_rank_0_decided():
    """Steps of counts and flags travel as a header alone, the others pickled after it:
    over a real gloo group of two processes, every kind arrives whole on rank 1."""
    context = multiprocessing.get_context("spawn")
    received = context.Queue()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [context.Process(target=_exchange_rank, args=(r, port, received)) for r in (0, 1)]
    for process in ranks:
        process.start()
    try:
        got = dict(received.get(timeout=60) for _ in ranks)
    finally:
        for process in ranks:
            process.join(30)
            if process.is_alive():
                process.kill()
    assert got[0] == STEPS and got[1] == STEPS
