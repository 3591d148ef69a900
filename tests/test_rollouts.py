"""Rollouts as RL pipelines draw them, on both engines: prompts of different lengths, ``n``
completions per prompt, stops at the model's EOS ids (or the caller's), every engine serving
a part of one call, and bad input refused by name before anything is sent. The oracle is
transformers: its greedy decoding with the same stop rule, and its teacher-forced
log-probs of whatever the engines drew."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from actors.engines.runtime import ServingLimits, model_limits
from orchestrator.rollouts import Completion, PromptError, Rollouts, as_prompts, spread
from tests.support import reference_logits, reference_model, rel_l2, start

NEW_TOKENS = 10
LOGPROB_BOUND = 1e-4
LENGTHS = (3, 9, 5, 14, 7, 4)


# ---- the oracle ----------------------------------------------------------------------------


class Reference:
    """transformers' float32 model of a checkpoint: greedy decoding with a stop rule, and
    teacher-forced log-probs."""

    def __init__(self, path) -> None:
        self.model = reference_model(path)

    @torch.no_grad()
    def greedy(self, prompt: list[int], new_tokens: int, stops: set[int]
               ) -> tuple[list[int], str]:
        ids, out = list(prompt), []
        for _ in range(new_tokens):
            token = int(self.model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in stops:
                return out, "stop"
        return out, "length"

    @torch.no_grad()
    def logprobs(self, prompt: list[int], tokens: list[int]) -> torch.Tensor:
        logits = self.model(torch.tensor([prompt + tokens])).logits[0].float()
        steps = logits[len(prompt) - 1:-1]
        return torch.log_softmax(steps, dim=-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.fixture(scope="module")
def reference(llama32) -> Reference:
    return Reference(llama32["a"])


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(2024)
    return [torch.randint(0, 251, (n,), generator=gen).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def stops(reference, prompts) -> tuple[int, int]:
    """Two stop ids that some greedy continuations reach within NEW_TOKENS (the 3rd token of
    prompt 0's, the 6th of prompt 3's) and others do not."""
    first = reference.greedy(prompts[0], NEW_TOKENS, set())[0][2]
    second = reference.greedy(prompts[3], NEW_TOKENS, set())[0][5]
    return first, second


@pytest.fixture(scope="module")
def eos_checkpoint(llama32, stops, tmp_path_factory):
    """llama32['a']'s weights, with the two stop ids as the model's EOS ids: one in
    config.json, both in generation_config.json (the engines must take the union)."""
    path = tmp_path_factory.mktemp("eos") / "a"
    shutil.copytree(llama32["a"], path)
    for name, value in (("config.json", stops[0]), ("generation_config.json", list(stops))):
        config = json.loads((path / name).read_text())
        config["eos_token_id"] = value
        (path / name).write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def native_pair(ray_cluster, eos_checkpoint):
    """Two native TP=2 engines on the EOS checkpoint."""
    with start(eos_checkpoint, 2, num_engines=2) as orch:
        yield orch


@pytest.fixture(params=["native", pytest.param("vllm", marks=[pytest.mark.vllm,
                                                               pytest.mark.shares("vllm_tp2")])])
def engines(request, llama32):
    """(orchestrator with two engines, the stop ids its model's config names, or None to pass
    them explicitly). vLLM: the session's shared pair, on llama32['a'] (EOS id 2)."""
    if request.param == "native":
        return request.getfixturevalue("native_pair"), None
    from tests.support import serving

    return serving(request.getfixturevalue("vllm_tp2"), llama32["a"]), "explicit"


def call_stops(mode, stops) -> dict:
    return {} if mode is None else {"stop_token_ids": list(stops)}


# ---- on the engines ---------------------------------------------------------------------------



@pytest.mark.ray
def test_ragged_greedy_stops_like_transformers_on_every_engine(engines, reference, prompts,
                                                               stops):
    orch, mode = engines
    out = orch.generate(prompts, NEW_TOKENS, **call_stops(mode, stops))
    assert isinstance(out, Rollouts) and len(out) == len(prompts)
    reasons = []
    for index, (prompt, completion) in enumerate(zip(prompts, out, strict=True)):
        tokens, reason = reference.greedy(prompt, NEW_TOKENS, set(stops))
        assert completion.prompt_index == index
        assert completion.token_ids == tokens, f"prompt {index}"
        assert completion.finish_reason == reason
        assert len(tokens) == NEW_TOKENS or tokens[-1] in stops
        error = (torch.tensor(completion.logprobs) - reference.logprobs(prompt, tokens)).abs()
        assert error.max().item() <= LOGPROB_BOUND
        reasons.append(reason)
    assert {"stop", "length"} <= set(reasons), "the prompts should cover both endings"
    # Both engines served a part of the call, in prompt order; one engine alone agrees.
    assert [c.engine for c in out] == [0] * 3 + [1] * 3
    assert out.versions == {orch.version}
    alone = orch.generate(prompts, NEW_TOKENS, engine=1, **call_stops(mode, stops))
    assert [c.token_ids for c in alone] == [c.token_ids for c in out]
    assert {c.engine for c in alone} == {1}


@pytest.mark.ray
def test_sampled_groups_of_n_are_seeded_stop_and_score_like_transformers(engines, reference,
                                                                         prompts, stops):
    orch, mode = engines
    kwargs = dict(n=4, temperature=1.0, top_p=0.95, seed=11, **call_stops(mode, stops))
    out = orch.sample(prompts, NEW_TOKENS, **kwargs)
    assert len(out) == 4 * len(prompts)
    assert [c.prompt_index for c in out] == [i for i in range(len(prompts)) for _ in range(4)]
    for completion in out:
        tokens = completion.token_ids
        prompt = prompts[completion.prompt_index]
        early = [t for t in tokens[:-1] if t in stops]
        assert not early, "a completion went on past a stop token"
        if completion.finish_reason == "stop":
            assert tokens[-1] in stops and len(tokens) <= NEW_TOKENS
        else:
            assert completion.finish_reason == "length" and len(tokens) == NEW_TOKENS
        error = (torch.tensor(completion.logprobs) - reference.logprobs(prompt, tokens)).abs()
        assert error.max().item() <= LOGPROB_BOUND
    groups = [tuple(tuple(c.token_ids) for c in out[i:i + 4]) for i in range(0, len(out), 4)]
    assert any(len(set(group)) > 1 for group in groups), "n completions all the same"
    again = orch.sample(prompts, NEW_TOKENS, **kwargs)
    assert [c.token_ids for c in again] == [c.token_ids for c in out], "seeded, not reproducible"
    other = orch.sample(prompts, NEW_TOKENS, **{**kwargs, "seed": 12})
    assert [c.token_ids for c in other] != [c.token_ids for c in out]
    # The seeds follow the prompt, not the engine that served it.
    alone = orch.sample(prompts, NEW_TOKENS, engine=0, **kwargs)
    assert [c.token_ids for c in alone] == [c.token_ids for c in out]
    tokens, logprobs, mask = out.padded()
    lengths = [len(c.token_ids) for c in out]
    assert tokens.shape == logprobs.shape == mask.shape == (len(out), max(lengths))
    assert mask.sum(dim=1).tolist() == lengths
    assert torch.equal(logprobs[mask], torch.tensor([x for c in out for x in c.logprobs]))


@pytest.mark.ray
def test_the_models_eos_ids_are_the_default_stops(engines, reference, prompts, llama32, stops):
    """Without stop_token_ids a call stops at the EOS ids of the model's config files
    (config.json and generation_config.json together); ignore_eos draws on."""
    orch, mode = engines
    expected = (sorted(stops) if mode is None else
                [json.loads((llama32["a"] / "config.json").read_text())["eos_token_id"]])
    assert list(orch.limits().eos_token_ids) == expected
    default = orch.generate(prompts, NEW_TOKENS)
    for prompt, completion in zip(prompts, default, strict=True):
        tokens, reason = reference.greedy(prompt, NEW_TOKENS, set(expected))
        assert (completion.token_ids, completion.finish_reason) == (tokens, reason)
    if mode is None:  # the EOS checkpoint's ids are reached: some completions stop early
        assert any(c.finish_reason == "stop" for c in default)
    ignored = orch.generate(prompts, NEW_TOKENS, ignore_eos=True)
    assert all(len(c.token_ids) == NEW_TOKENS and c.finish_reason == "length" for c in ignored)


BAD = [
    ([[1, 2], []], {}, r"prompt 1 is empty"),
    ([[1, 2], [3, 251, 4]], {}, r"prompt 1: token id 251 at position 1 is outside the "
                                r"vocabulary \[0, 251\)"),
    ([[-1]], {}, r"prompt 0: token id -1 at position 0 is outside"),
    ([[1] * 250], {}, r"prompt 0 has 250 tokens: with max_new_tokens=10 it exceeds the "
                      r"model's context of 256 tokens"),
    ([[1, 2]], {"n": 0}, r"n must be >= 1, got 0"),
    ([[1, 2]], {"n": 2, "temperature": 0}, r"n=2 at temperature 0 would draw 2 identical"),
    ([[1, "x"]], {}, r"prompt 0 must be a list of int token ids"),
    ("hello", {}, r"prompts must be a list of token-id lists"),
    ([], {}, r"no prompts"),
    ([[1]], {"stop_token_ids": [999]}, r"stop token id 999 is outside the vocabulary"),
]


@pytest.mark.ray
def test_bad_rollouts_are_refused_by_name_and_the_engines_keep_serving(engines, prompts):
    orch, _ = engines
    version = orch.version
    before = orch.generate(prompts[:2], 4)
    for bad_prompts, kwargs, message in BAD:
        with pytest.raises(ValueError, match=message):
            orch.sample(bad_prompts, NEW_TOKENS, **kwargs)
    with pytest.raises(PromptError):
        orch.generate([[]])
    assert orch.version == version
    after = orch.generate(prompts[:2], 4)
    assert [c.token_ids for c in after] == [c.token_ids for c in before]


@pytest.mark.ray
def test_two_native_engines_are_replicas_in_processes_of_their_own(native_pair, llama32,
                                                                    prompts):
    orch = native_pair
    prompt = torch.tensor([prompts[1][:5], prompts[3][:5]])
    expected = reference_logits(llama32["a"], prompt)
    assert all(rel_l2(orch.forward(prompt, engine=e), expected) <= 1e-4 for e in (0, 1))
    pids = {rank["pid"] for engine in orch.placements() for rank in engine}
    assert len(pids) == 4, "each rank of each engine is its own actor process"
    shapes = [{n: t["shape"] for n, t in orch.inspect(engine=e)[1].items()} for e in (0, 1)]
    assert shapes[0] == shapes[1]


# ---- without engines ------------------------------------------------------------------------


def test_spread_keeps_prompts_in_order_and_engines_even():
    assert spread(6, [0, 1]) == [(0, 0, 3), (1, 3, 6)]
    assert spread(5, [0, 1, 2]) == [(0, 0, 2), (1, 2, 4), (2, 4, 5)]
    assert spread(1, [0, 1]) == [(0, 0, 1)]
    assert spread(3, [1]) == [(1, 0, 3)]


def test_padded_tensors_mask_what_each_completion_drew():
    done = [Completion(0, [5, 6, 7], [-0.1, -0.2, -0.3], "length", 3, 0),
            Completion(0, [8], [-0.5], "stop", 3, 1)]
    out = Rollouts([[1, 2]], done)
    tokens, logprobs, mask = out.padded(pad_token_id=9)
    assert tokens.tolist() == [[5, 6, 7], [8, 9, 9]]
    assert mask.tolist() == [[True] * 3, [True, False, False]]
    assert logprobs[1].tolist() == [-0.5, 0.0, 0.0] and logprobs.dtype == torch.float32
    assert out.versions == {3} and out[1].engine == 1 and len(out) == 2
    unscored = Rollouts([[1]], [Completion(0, [4], None, "length", 0, 0)])
    assert torch.isnan(unscored.padded()[1]).all()


def test_a_tensor_of_prompts_is_one_prompt_per_row():
    assert as_prompts(torch.tensor([[1, 2], [3, 4]])) == [[1, 2], [3, 4]]
    with pytest.raises(PromptError, match="2-D"):
        as_prompts(torch.tensor([1, 2]))


def test_limits_read_both_config_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"vocab_size": 100, "max_position_embeddings": 64, "eos_token_id": [7, 3]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert model_limits(str(tmp_path)) == ServingLimits(100, 64, (3, 7, 9))
    assert model_limits(str(tmp_path), context_length=32).context_length == 32
