"""One TP rank of an inference engine, as the rank actor (``actors.rank_actor``) drives it.

The rank actor owns the lifecycle, the reload engine, fault drills and reporting; a runtime
owns the engine: forming the rank's process group, building the model, serving it, and
handing the reload engine its ``ReloadableModel``. Serving calls are SPMD: every rank of an
engine receives the same call, and rank 0 returns the result (other ranks return None).
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from actors.engines.plugin import Capability, EngineOptions, EnginePlugin
from actors.reload import ReloadableModel


@dataclass(frozen=True, slots=True)
class RankContext:
    engine: int
    """Index of the engine (data-parallel replica) this rank belongs to."""
    rank: int
    world_size: int
    """Ranks of the engine (its tensor-parallel size)."""
    timeout_s: float
    """Longest wait for a collective or the rendezvous."""
    log: logging.LoggerAdapter


@dataclass(frozen=True, slots=True)
class SamplingRequest:
    """How one completion is drawn."""

    max_new_tokens: int
    """At most this many new tokens."""
    temperature: float
    """0 picks the most likely token (greedy)."""
    top_p: float
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches it."""
    top_k: int
    """Draw from the ``top_k`` most likely tokens only; 0: from all."""
    stop_token_ids: tuple[int, ...]
    """A completion ends at the first of these it draws (kept as its last token)."""
    logprobs: bool
    """Return each drawn token's log-probability under the model (log-softmax of the raw
    logits, before temperature, top-k and top-p), as vLLM does by default."""


@dataclass(frozen=True, slots=True)
class Request:
    """One completion to generate: what the driver submits and rank 0 admits on every rank."""

    request_id: str
    prompt: list[int]
    sampling: SamplingRequest
    seed: int
    """Chosen by the driver, so every rank draws the same tokens and a call is reproducible."""


class Update(NamedTuple):
    """What one engine step produced for one request."""

    request_id: str
    token_ids: list[int]
    """The new tokens of this step (none for a request that was aborted)."""
    logprobs: list[float]
    """Their log-probs; empty when not asked for."""
    finish_reason: str | None
    """None while it runs; then 'stop' (ends with a stop token), 'length'
    (``max_new_tokens`` tokens) or 'abort'."""
    cached_tokens: int
    """Prompt tokens served from a prefix cache instead of computed again."""


@dataclass(frozen=True, slots=True)
class ServingLimits:
    """What a rollout must respect, as the engine sees it; checked before anything is sent."""

    vocab_size: int
    context_length: int
    """Longest prompt plus new tokens the engine serves."""
    eos_token_ids: tuple[int, ...]
    """The model's end-of-sequence ids (config.json and generation_config.json): the stop
    tokens of a call that names none."""


def read_model_config(model: str | Path, name: str = "config.json") -> dict[str, Any]:
    """A checkpoint directory's ``config.json`` (or another of its JSON config files);
    errors name the file."""
    path = Path(model) / name
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: {name} not found; is '{model}' a Hugging Face "
                         "checkpoint directory?") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")  # noqa: TRY004
    return config


def model_limits(model: str, context_length: int | None = None) -> ServingLimits:
    """``ServingLimits`` from a checkpoint directory's config files (``context_length``
    overrides the config's ``max_position_embeddings``)."""
    config = read_model_config(model)
    text = config.get("text_config", config)
    generation = (read_model_config(model, "generation_config.json")
                  if (Path(model) / "generation_config.json").exists() else {})
    eos: set[int] = set()
    for source in (config, text, generation):
        ids = source.get("eos_token_id")
        eos.update([ids] if isinstance(ids, int) else ids or [])
    return ServingLimits(vocab_size=int(text["vocab_size"]),
                         context_length=int(context_length or text["max_position_embeddings"]),
                         eos_token_ids=tuple(sorted(eos)))


class RankRuntime(ABC):
    builds_loaded: bool = False
    """The engine initializes its own weights when built: every load, the first included,
    copies into the kernel tensors it already has."""

    def __init__(self, options: EngineOptions, context: RankContext) -> None:
        self.options = options
        self.context = context
        # Ray gives a cuda rank actor exactly one visible GPU, so its index is always 0.
        self.device = (torch.device("cuda", 0) if options.device == "cuda"
                       else torch.device("cpu"))

    # ---- group and model ---------------------------------------------------------------

    @abstractmethod
    def rendezvous(self) -> tuple[str, int]:
        """Rank 0 only: the address every rank of the engine meets at."""

    @abstractmethod
    def join(self, host: str, port: int, instance: str) -> None:
        """Form (or, after a peer restarted, re-form) the engine's process group; builds
        the engine the first time. ``instance`` names this formation of the group, fresh
        each time (``actors.node_shm``): an engine that creates shared memory on its node
        records itself as its owner and names its segments after it."""

    @abstractmethod
    def reloadable(self) -> ReloadableModel:
        """The model, as the reload engine sees it (after ``join``)."""

    def consensus(self, ok: bool) -> bool:
        """Whether every rank of the engine is ``ok`` (a collective: all ranks call it)."""
        return ok

    def after_commit(self) -> None:  # noqa: B027 - optional: engines without caches
        """A new version is served: drop state computed with the old weights that a later
        request could reuse (running requests keep theirs; ``recompute`` drops them)."""

    # ---- serving: continuous batching, stepped in lockstep on every rank ---------------

    @abstractmethod
    def admit(self, request: Request, version: int) -> None:
        """Add ``request`` to the running batch (it starts at the next ``step``).
        ``version``: the weights it starts on (an engine with a prefix cache keeps the
        versions apart)."""

    @abstractmethod
    def abort(self, request_ids: list[str]) -> None:
        """Drop these requests (unknown or finished ids are ignored), freeing their slots."""

    @abstractmethod
    def has_work(self) -> bool:
        """Whether any admitted request is unfinished."""

    @abstractmethod
    def running(self) -> list[str]:
        """The unfinished requests, in admission order."""

    @abstractmethod
    def step(self) -> list[Update]:
        """One engine step over the running batch: prompts admitted since the last step are
        computed, every running request draws one token. Deterministic given the same
        admissions in the same order, so every rank of the engine draws the same tokens."""

    @abstractmethod
    def recompute(self) -> None:
        """The weights changed under the running requests: drop their KV cache, so the next
        step computes it again from their whole context (prompt and tokens so far)."""

    def limits(self) -> ServingLimits:
        """What a rollout must respect (after ``join``)."""
        return model_limits(self.options.model)

    @abstractmethod
    def kernel_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the engine serves from, by name (parameters and buffers)."""


# ---- capabilities: a runtime implements the mixin of each capability its plugin declares ----

class Rejoins(ABC):
    """``rejoin``: after a peer restarted, leave the group so a new one can form."""

    @abstractmethod
    def leave(self) -> None:
        """Leave the engine's process group (``join`` forms the new one)."""


class ServesLogits(ABC):
    """``logits``: raw logits."""

    @abstractmethod
    def forward(self, token_ids: torch.Tensor) -> torch.Tensor | None:
        """float32 CPU logits [B, T, vocab] on rank 0."""


class CalibratesKvScales(ABC):
    """``kv_calibration``: FP8 KV-cache scales from a forward of calibration tokens."""

    @abstractmethod
    def calibrate_kv_scales(self, token_ids: torch.Tensor) -> list[list[float]]:
        """Set every attention layer's k/v scales in place; returns [[k, v], ...]."""


class CapturesCudaGraphs(ABC):
    """``cuda_graphs``: capture a forward once, replay it on whatever weights are served."""

    @abstractmethod
    def capture_cuda_graph(self, token_ids: torch.Tensor) -> None: ...

    @abstractmethod
    def replay_cuda_graph(self) -> torch.Tensor | None:
        """Rank 0: float32 CPU logits of the replayed forward."""


MIXINS: dict[Capability, type] = {"rejoin": Rejoins, "logits": ServesLogits,
                                  "kv_calibration": CalibratesKvScales,
                                  "cuda_graphs": CapturesCudaGraphs}
"""Capabilities with rank-side calls (``staging`` is the model's: ``actors.reload``)."""


def check_capabilities(plugin: EnginePlugin, runtime: RankRuntime) -> None:
    """A runtime implements exactly the capabilities its plugin declares, so the driver,
    which reads only the declaration, never sends a call the rank cannot serve."""
    for capability, mixin in MIXINS.items():
        if plugin.supports(capability) != isinstance(runtime, mixin):
            declared, has = (("declares", "lacks") if plugin.supports(capability)
                             else ("does not declare", "implements"))
            raise TypeError(f"engine {plugin.name!r} {declared} {capability!r} but its runtime "
                            f"{type(runtime).__name__} {has} {mixin.__name__}")
