"""The native engine's continuous batcher: requests join and leave between steps.

Requests admitted in one step with prompts of one length and one way of drawing form a
cohort: one batch with one KV cache, prefilled together, then decoding one token per step
(a finished row stays in its batch until its cohort is done, as padding costs less than
reshaping the cache). Every row draws from its own generator seeded by the driver, and
logits are all-gathered, so every rank of the engine draws the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from actors.engines.native.layers import KVCache
from actors.engines.runtime import Request, SamplingRequest, Update

# (token_ids [B, T], positions [T], cache) -> logits [B, T, vocab]
Forward = Callable[[torch.Tensor, torch.Tensor, KVCache], torch.Tensor]


def choose_tokens(logits: torch.Tensor, sampling: SamplingRequest,
                  generators: list[torch.Generator]) -> torch.Tensor:
    """[B, vocab] float32 logits -> [B, 1] token ids: argmax when temperature is 0, else
    row b drawn with ``generators[b]`` from its top-k, top-p share of the distribution."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the most likely tokens until their mass reaches top_p (the first always).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > sampling.top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0))
    return torch.cat([torch.multinomial(row, 1, generator=g).unsqueeze(0)
                      for row, g in zip(probs, generators, strict=True)])


@dataclass(slots=True)
class Row:
    request: Request
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def context(self) -> list[int]:
        return self.request.prompt + self.tokens


@dataclass(slots=True)
class Cohort:
    """Rows of one context length and one way of drawing, decoding as one batch."""

    rows: list[Row]
    cache: KVCache | None = None
    """None until prefilled (after admission, or after ``recompute``)."""

    @property
    def sampling(self) -> SamplingRequest:
        return self.rows[0].request.sampling

    @property
    def done(self) -> bool:
        return all(row.finish_reason is not None for row in self.rows)


class ContinuousBatcher:
    """The serving half of ``RankRuntime`` (admit, abort, has_work, running, step,
    recompute) for the native model."""

    def __init__(self, forward: Forward, num_layers: int, device: torch.device) -> None:
        self.forward = forward
        self.num_layers = num_layers
        self.device = device
        self.cohorts: list[Cohort] = []
        self._admitted: list[Request] = []

    def admit(self, request: Request, version: int) -> None:
        # No prefix cache: nothing computed is kept across requests, so versions never mix.
        self._admitted.append(request)

    def abort(self, request_ids: list[str]) -> None:
        dropped = set(request_ids)
        self._admitted = [r for r in self._admitted if r.request_id not in dropped]
        for cohort in self.cohorts:
            for row in cohort.rows:
                if row.request.request_id in dropped and row.finish_reason is None:
                    row.finish_reason = "abort"
        self.cohorts = [c for c in self.cohorts if not c.done]

    def running(self) -> list[str]:
        return [row.request.request_id for cohort in self.cohorts for row in cohort.rows
                if row.finish_reason is None] + [r.request_id for r in self._admitted]

    def has_work(self) -> bool:
        return bool(self._admitted or self.cohorts)

    def recompute(self) -> None:
        """Every running row is prefilled again, with its whole context, at the next step
        (finished rows leave; rows of one cohort keep one context length)."""
        self.cohorts = [Cohort([row for row in cohort.rows if row.finish_reason is None])
                        for cohort in self.cohorts if not cohort.done]

    @torch.inference_mode()
    def step(self) -> list[Update]:
        self._form_cohorts()
        updates = [update for cohort in self.cohorts for update in self._advance(cohort)]
        self.cohorts = [c for c in self.cohorts if not c.done]
        return updates

    def _form_cohorts(self) -> None:
        by_key: dict[tuple, list[Row]] = {}
        for request in self._admitted:
            s = request.sampling
            key = (len(request.prompt), s.temperature, s.top_p, s.top_k)
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
            by_key.setdefault(key, []).append(Row(request, generator))
        self._admitted = []
        self.cohorts.extend(Cohort(rows) for rows in by_key.values())

    def _positions(self, start: int, length: int) -> torch.Tensor:
        return torch.arange(start, start + length, device=self.device)

    def _advance(self, cohort: Cohort) -> list[Update]:
        """One forward of the cohort (its prefill, or its last tokens) and one drawn token
        per running row."""
        length = len(cohort.rows[0].context)
        if cohort.cache is None:
            cohort.cache = KVCache.empty(self.num_layers)
            ids = torch.tensor([row.context for row in cohort.rows], device=self.device)
            logits = self.forward(ids, self._positions(0, length), cohort.cache)
        else:
            ids = torch.tensor([[row.context[-1]] for row in cohort.rows], device=self.device)
            logits = self.forward(ids, self._positions(length - 1, 1), cohort.cache)
        last = logits[:, -1].float()
        chosen = choose_tokens(last, cohort.sampling, [row.generator for row in cohort.rows])
        scores = torch.log_softmax(last, dim=-1).gather(-1, chosen)
        updates = []
        for row, token, score in zip(cohort.rows, chosen[:, 0].tolist(), scores[:, 0].tolist(),
                                     strict=True):
            if row.finish_reason is not None:
                row.tokens.append(token)  # keeps the cohort's rows one length
                continue
            row.tokens.append(token)
            sampling = row.request.sampling
            if token in sampling.stop_token_ids:
                row.finish_reason = "stop"
            elif len(row.tokens) == sampling.max_new_tokens:
                row.finish_reason = "length"
            updates.append(Update(row.request.request_id, [token],
                                  [score] if sampling.logprobs else [], row.finish_reason, 0))
        return updates
