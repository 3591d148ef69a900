"""Rollouts as RL pipelines draw them: prompts of any length, ``n`` completions per prompt,
stopping at the model's EOS, spread over every engine, each completion tagged with the
version and the engine that produced it.

The driver's half: checking a call before anything is sent (``RolloutCall``), splitting its
prompts over engines (``spread``), and the result (``Completion``, ``Rollouts``). The
ranks' half is ``RankRuntime.sample`` (``actors.engines.runtime``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch

from actors.engines.runtime import Request, SamplingRequest, ServingLimits

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, slots=True)
class Completion:
    """One completion of one prompt."""

    prompt_index: int
    """Index of its prompt in the call; a prompt's ``n`` completions are adjacent."""
    token_ids: list[int]
    """The new tokens (the prompt not included). One that stopped ends with its stop token."""
    logprobs: list[float] | None
    """Each new token's log-prob under the model (log-softmax of the raw logits, before
    temperature, top-k and top-p); None when not asked for."""
    finish_reason: FinishReason
    """'stop': it drew a stop token; 'length': it reached ``max_new_tokens``; 'abort': an
    in-flight reload with ``in_flight='abort'`` ended it (with the tokens it had)."""
    version: int
    """The version its first token was drawn from (the version served when it ended, for
    a completion with no tokens)."""
    engine: int
    """Index of the engine (data-parallel replica) that served it (last, if a failed
    engine's requests went on elsewhere)."""
    cached_tokens: int = 0
    """Prompt tokens served from the engine's prefix cache instead of computed again (vLLM;
    prefix-cache entries are salted with the version, so never across versions)."""
    versions: list[tuple[int, int, int]] = field(default_factory=list)
    """``(version, start, end)`` spans covering ``token_ids`` exactly, in order: tokens
    ``start:end`` were drawn from that version's weights (more than one span when an
    in-flight reload flipped the weights while it ran)."""


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """What ``astream`` yields: the tokens one engine step added to one completion."""

    token_ids: list[int]
    logprobs: list[float] | None
    version: int
    """The weights these tokens were drawn from."""
    finish_reason: FinishReason | None
    """None until the last delta."""


class Rollouts(Sequence[Completion]):
    """The completions of one ``sample`` or ``generate`` call, prompt-major: prompt 0's
    ``n``, then prompt 1's, and so on."""

    def __init__(self, prompts: list[list[int]], completions: list[Completion]) -> None:
        self.prompts = prompts
        """The call's prompts, as token-id lists."""
        self.completions = completions

    @overload
    def __getitem__(self, index: int) -> Completion: ...

    @overload
    def __getitem__(self, index: slice) -> list[Completion]: ...

    def __getitem__(self, index: int | slice) -> Completion | list[Completion]:
        return self.completions[index]

    def __len__(self) -> int:
        return len(self.completions)

    def __iter__(self) -> Iterator[Completion]:
        return iter(self.completions)

    def __repr__(self) -> str:
        return (f"Rollouts({len(self.prompts)} prompts, {len(self)} completions, "
                f"versions {sorted(self.versions)})")

    @property
    def versions(self) -> set[int]:
        return {c.version for c in self.completions}

    def padded(self, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded tensors for a loss, one row per completion: token ids [N, L] int64
        (``pad_token_id`` past the end), log-probs [N, L] float32 (0 past the end; NaN
        throughout when not asked for) and a mask [N, L] bool (True on real tokens)."""
        width = max((len(c.token_ids) for c in self.completions), default=0)
        shape = (len(self.completions), width)
        tokens = torch.full(shape, pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(shape, dtype=torch.float32)
        mask = torch.zeros(shape, dtype=torch.bool)
        for row, completion in enumerate(self.completions):
            length = len(completion.token_ids)
            tokens[row, :length] = torch.tensor(completion.token_ids, dtype=torch.long)
            mask[row, :length] = True
            if completion.logprobs is None:
                logprobs[row] = float("nan")
            else:
                logprobs[row, :length] = torch.tensor(completion.logprobs)
        return tokens, logprobs, mask


class PromptError(ValueError):
    """A prompt the engines cannot serve; the message names it and what is wrong."""


def as_prompts(prompts: Any) -> list[list[int]]:
    """Token-id lists from a list of lists (any lengths) or a 2-D tensor (one row each)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise PromptError(f"a tensor of prompts must be 2-D [batch, length], got shape "
                              f"{tuple(prompts.shape)}")
        return prompts.tolist()
    if not isinstance(prompts, Sequence) or isinstance(prompts, str | bytes):
        raise PromptError("prompts must be a list of token-id lists or a 2-D tensor, got "
                          f"{type(prompts).__name__}")
    out = []
    for index, prompt in enumerate(prompts):
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt
        if not isinstance(ids, Sequence) or isinstance(ids, str | bytes) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise PromptError(f"prompt {index} must be a list of int token ids, got "
                              f"{str(prompt)[:80]}")
        out.append(list(ids))
    return out


@dataclass(frozen=True, slots=True)
class RolloutCall:
    """One ``sample``/``generate``/``agenerate`` call, checked against what the engines can
    serve."""

    prompts: list[list[int]]
    n: int
    sampling: SamplingRequest
    seed: int
    """Completion j of prompt i draws with ``seed + i * n + j``, whichever engine serves
    it (for n > 1, vLLM's own rule for a prompt's completions)."""

    @classmethod
    def checked(cls, prompts: Any, limits: ServingLimits, *, max_new_tokens: int, n: int,
                temperature: float, top_p: float, top_k: int | None, seed: int | None,
                stop_token_ids: Sequence[int] | None, ignore_eos: bool,
                logprobs: bool) -> RolloutCall:
        """Raises ``ValueError`` (``PromptError`` for a prompt) naming what is wrong."""
        ids = as_prompts(prompts)
        if not ids:
            raise PromptError("no prompts")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n > 1 and temperature == 0:
            raise ValueError(f"n={n} at temperature 0 would draw {n} identical greedy "
                             "completions: sample with n=1 (or temperature > 0)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if (not math.isfinite(temperature) or temperature < 0 or not 0 < top_p <= 1
                or (top_k is not None and top_k < 1)):
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and top_k None or >= 1, "
                             f"got temperature={temperature}, top_p={top_p}, top_k={top_k}")
        for index, prompt in enumerate(ids):
            check_prompt(index, prompt, limits, max_new_tokens)
        stops = limits.eos_token_ids if stop_token_ids is None else tuple(stop_token_ids)
        for token in stops:
            if not 0 <= token < limits.vocab_size:
                raise ValueError(f"stop token id {token} is outside the vocabulary "
                                 f"[0, {limits.vocab_size})")
        sampling = SamplingRequest(
            max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
            top_k=top_k or 0, stop_token_ids=() if ignore_eos else tuple(sorted(set(stops))),
            logprobs=logprobs)
        # Every rank must draw the same tokens: seeds are chosen here, never on a rank.
        return cls(ids, n, sampling, random.getrandbits(31) if seed is None else seed)

    def requests(self, new_id: Callable[[], str]) -> list[Request]:
        """One request per completion, prompt-major."""
        return [Request(new_id(), prompt, self.sampling, self.seed + i * self.n + j)
                for i, prompt in enumerate(self.prompts) for j in range(self.n)]


def check_prompt(index: int, prompt: list[int], limits: ServingLimits,
                 max_new_tokens: int) -> None:
    if not prompt:
        raise PromptError(f"prompt {index} is empty")
    bad = next((t for t in prompt if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise PromptError(f"prompt {index}: token id {bad} at position {prompt.index(bad)} is "
                          f"outside the vocabulary [0, {limits.vocab_size})")
    if len(prompt) + max_new_tokens > limits.context_length:
        raise PromptError(f"prompt {index} has {len(prompt)} tokens: with max_new_tokens="
                          f"{max_new_tokens} it exceeds the model's context of "
                          f"{limits.context_length} tokens")


def spread(num_prompts: int, engines: list[int]) -> list[tuple[int, int, int]]:
    """Contiguous ranges of prompts, as even as counts allow, one per engine (a prompt's
    ``n`` completions stay on one engine): ``(engine, start, stop)``, empty ones left out."""
    share, extra = divmod(num_prompts, len(engines))
    ranges, start = [], 0
    for position, engine in enumerate(engines):
        stop = start + share + (position < extra)
        if stop > start:
            ranges.append((engine, start, stop))
        start = stop
    return ranges


def completion(prompt_index: int, tracked: Any, logprobs: bool, version: int) -> Completion:
    """A finished request (``orchestrator.dispatcher.Tracked``) as a ``Completion``."""
    if logprobs and len(tracked.logprobs) != len(tracked.token_ids):
        raise RuntimeError(f"engine {tracked.engine} returned {len(tracked.logprobs)} "
                           f"log-probs for {len(tracked.token_ids)} tokens (its runtime must "
                           "score every token it draws when asked to)")
    return Completion(prompt_index=prompt_index, token_ids=list(tracked.token_ids),
                      logprobs=list(tracked.logprobs) if logprobs else None,
                      finish_reason=tracked.finish_reason,
                      version=tracked.spans[0][0] if tracked.spans else version,
                      engine=tracked.engine, cached_tokens=tracked.cached_tokens,
                      versions=list(tracked.spans))
