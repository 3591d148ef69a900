"""Serving: the one interface an RL driver programs against (``ServingAPI``), whoever serves
it: a ``ReloadOrchestrator`` in the driver, or the service actor through a
``ServiceClient`` (``orchestrator.service``); and ``EngineServing``, the serving calls over a
fleet: rollouts as requests of the engines' continuous batches (blocking, awaited or
streamed; ``orchestrator.dispatcher``), logits, KV-scale calibration, CUDA graphs,
kernel-tensor inspection, memory and fault drills. Every call passes the gate, so none sees a
half-applied version; requests never wait at it (the engines hold them while a reload writes
the weights). A rank that died while serving is rebuilt before the error reaches the caller,
and the requests running on its engine go on once it is.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch

from actors.engines.runtime import ServingLimits
from actors.rank_actor import RankActor
from actors.step_loop import Delta, InFlight
from actors.transports.object_store import unpack_tensors
from orchestrator.config import EngineConfig
from orchestrator.dispatcher import Dispatcher, Tracked
from orchestrator.errors import RankError
from orchestrator.fleet import Calls, Fleet
from orchestrator.gate import Gate
from orchestrator.metrics import Metrics
from orchestrator.report import ReloadReport
from orchestrator.rollouts import (
    Completion,
    RolloutCall,
    Rollouts,
    TokenDelta,
    completion,
    spread,
)
from orchestrator.transaction import Transaction

log = logging.getLogger("tp_reload")

SERVING_CALLS = ("reload", "forward", "generate", "sample", "status", "placements")
"""The ``ServingAPI`` methods (besides the ``version`` property), as a service carries them."""


def as_token_tensor(token_ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError("token_ids must be [batch, length] with length >= 1, "
                         f"got {tuple(ids.shape)}")
    return ids


class ServingAPI(ABC):
    """What an RL driver calls, in its own process or through a service."""

    @property
    @abstractmethod
    def version(self) -> int:
        """0 after the first load; each committed reload adds one."""

    @abstractmethod
    def reload(self, source: Any, order: str = "plan", strict: bool = True,
               staged: bool | None = None, staging: str | None = None,
               in_flight: InFlight | None = None) -> ReloadReport:
        """Stream new weights into every rank of every engine, all or nothing.
        ``staged``/``staging``/``in_flight`` None: the server's default (unstaged, 'device',
        'wait' for an orchestrator; the service's config for a service). ``in_flight``:
        what requests running at a staged reload's flip do ('keep', 'recompute', 'wait',
        'abort'; ``actors.step_loop``); a plain reload lets them finish first ('wait')."""

    @abstractmethod
    def forward(self, token_ids: Any, engine: int = 0) -> torch.Tensor:
        """float32 CPU logits [B, T, vocab] (engines with the ``logits`` capability)."""

    @abstractmethod
    def generate(self, prompts: Any, max_new_tokens: int = 16,
                 stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                 engine: int | None = None) -> Rollouts:
        """Greedy decoding: ``sample`` at temperature 0, one completion per prompt."""

    @abstractmethod
    def sample(self, prompts: Any, max_new_tokens: int = 256, n: int = 1,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
               seed: int | None = None, stop_token_ids: Sequence[int] | None = None,
               ignore_eos: bool = False, logprobs: bool = True, engine: int | None = None
               ) -> Rollouts:
        """Rollouts: ``n`` completions of each prompt (token-id lists of any lengths, or
        the rows of a 2-D tensor), each ending at its first stop token (default: the
        model's EOS ids; none with ``ignore_eos``) or after ``max_new_tokens``; prompts
        spread over every engine (``engine``: one only), reproducible with ``seed``, with
        each token's log-prob under the model and the version that produced it."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """What is served: model, engines, version and the last reload."""

    @abstractmethod
    def placements(self) -> list[list[dict[str, Any]]]:
        """Per engine, per rank: node id, pid and GPU ids of the rank actor."""


class EngineServing(ServingAPI):
    """The serving calls of a fleet (reloading is the subclass's)."""

    def __init__(self, config: EngineConfig, fleet: Fleet, gate: Gate,
                 transaction: Transaction, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.fleet = fleet
        self.gate = gate
        self.transaction = transaction
        self.dispatcher = Dispatcher(fleet)
        self.dispatcher.on_lost = self._engine_lost
        transaction.on_recovered = self.dispatcher.resubmit
        self._limits: ServingLimits | None = None

    @property
    def version(self) -> int:
        return self.transaction.current

    def _on_engine(self, calls: Calls, by_rank: bool = True) -> dict[Any, Any]:
        """Wait for ``calls`` under the gate: rank -> result for calls to one engine (or
        (engine, rank) -> result without ``by_rank``)."""
        try:
            results = self.fleet.wait(calls)
        except RankError as error:
            self.transaction.recover_if_restarted(error)
            raise
        if not by_rank:
            return results
        return {rank: value for (_, rank), value in sorted(results.items())}

    def _serve(self, engine: int, method: Any, *args: Any) -> dict[int, Any]:
        with self.gate.hold():
            return self._on_engine(self.fleet.call_engine(engine, method, *args))

    def forward(self, token_ids: Any, engine: int = 0) -> torch.Tensor:
        if not self.config.plugin.supports("logits"):
            raise NotImplementedError(
                f"engine={self.config.engine!r} serves tokens and their log-probs, not raw "
                "logits: use generate() or sample(..., logprobs=True)")
        return self._serve(engine, RankActor.forward, as_token_tensor(token_ids))[0]

    def generate(self, prompts: Any, max_new_tokens: int = 16,
                 stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                 engine: int | None = None) -> Rollouts:
        return self.sample(prompts, max_new_tokens, temperature=0.0, seed=0,
                           stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, engine=engine)

    def sample(self, prompts: Any, max_new_tokens: int = 256, n: int = 1,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
               seed: int | None = None, stop_token_ids: Sequence[int] | None = None,
               ignore_eos: bool = False, logprobs: bool = True, engine: int | None = None
               ) -> Rollouts:
        """Blocking: every completion is a request of the continuous batch (``agenerate``),
        submitted at once and waited for together."""
        call = self._checked(prompts, max_new_tokens, n, temperature, top_p, top_k, seed,
                             stop_token_ids, ignore_eos, logprobs)
        requests = call.requests(self.dispatcher.new_id)
        done = threading.Semaphore(0)
        begin = time.perf_counter()
        tracked = []
        for index, start, stop in spread(len(call.prompts), self._serving_engines(engine)):
            part, ref = self.dispatcher.submit(requests[start * n:stop * n], index,
                                               lambda t, d: d.finish_reason and done.release())
            tracked += part
            self._submitted(part, ref)
        for _ in tracked:
            done.acquire()
        out = Rollouts(call.prompts, [self._completion(k // n, t, logprobs)
                                      for k, t in enumerate(tracked)])
        self.metrics.rolled_out(sum(len(c.token_ids) for c in out), time.perf_counter() - begin)
        return out

    async def agenerate(self, prompt: Sequence[int], max_new_tokens: int = 256,
                        temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                        seed: int | None = None, stop_token_ids: Sequence[int] | None = None,
                        ignore_eos: bool = False, logprobs: bool = True,
                        engine: int | None = None) -> Completion:
        """One completion of one prompt, as a request of the engines' continuous batch:
        concurrent calls are batched together and spread over the engines (``engine``: one
        only). Seeded like ``sample``'s first completion of its first prompt. Cancelling the
        awaiting task ends the request on its engine and frees its slot."""
        tracked = None
        async for _, current in self._stream(prompt, max_new_tokens, temperature, top_p,
                                             top_k, seed, stop_token_ids, ignore_eos, logprobs,
                                             engine):
            tracked = current
        return self._completion(0, tracked, logprobs)

    async def astream(self, prompt: Sequence[int], max_new_tokens: int = 256,
                      temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                      seed: int | None = None, stop_token_ids: Sequence[int] | None = None,
                      ignore_eos: bool = False, logprobs: bool = True,
                      engine: int | None = None) -> AsyncIterator[TokenDelta]:
        """``agenerate``'s tokens as they are produced: one ``TokenDelta`` per engine step
        that added any (the last one carries the finish reason)."""
        async for delta, _ in self._stream(prompt, max_new_tokens, temperature, top_p, top_k,
                                           seed, stop_token_ids, ignore_eos, logprobs, engine):
            yield TokenDelta(delta.token_ids, delta.logprobs if logprobs else None,
                             delta.version if delta.token_ids else self.version,
                             delta.finish_reason)

    async def _stream(self, prompt: Sequence[int], max_new_tokens: int, temperature: float,
                      top_p: float, top_k: int | None, seed: int | None,
                      stop_token_ids: Sequence[int] | None, ignore_eos: bool, logprobs: bool,
                      engine: int | None) -> AsyncIterator[tuple[Delta, Tracked]]:
        call = self._checked([list(prompt)], max_new_tokens, 1, temperature, top_p, top_k,
                             seed, stop_token_ids, ignore_eos, logprobs)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        index = self.dispatcher.least_loaded() if engine is None else \
            self._serving_engines(engine)[0]
        begin = time.perf_counter()
        (tracked,), ref = self.dispatcher.submit(
            call.requests(self.dispatcher.new_id), index,
            lambda t, d: loop.call_soon_threadsafe(deltas.put_nowait, d))
        try:
            await self._submitted_async([tracked], ref)
            while True:
                delta = await deltas.get()
                if delta.finish_reason == "error":
                    break
                yield delta, tracked
                if delta.finish_reason is not None:
                    break
        except BaseException:  # cancelled, or the caller stopped iterating
            if tracked.finish_reason is None:
                self.dispatcher.cancel(tracked)
            raise
        if tracked.finish_reason == "error":
            raise RankError(tracked.engine, 0, tracked.error or "the engine failed")
        self.metrics.rolled_out(len(tracked.token_ids), time.perf_counter() - begin)

    def _checked(self, prompts: Any, max_new_tokens: int, n: int, temperature: float,
                 top_p: float, top_k: int | None, seed: int | None,
                 stop_token_ids: Sequence[int] | None, ignore_eos: bool, logprobs: bool
                 ) -> RolloutCall:
        self.gate.check_serving()
        return RolloutCall.checked(
            prompts, self.limits(), max_new_tokens=max_new_tokens, n=n,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, logprobs=logprobs)

    def _submitted(self, tracked: list[Tracked], ref: Any) -> None:
        try:
            self.fleet.wait({(tracked[0].engine, 0): ref})
        except BaseException:
            self.dispatcher.forget(tracked)
            raise

    async def _submitted_async(self, tracked: list[Tracked], ref: Any) -> None:
        try:
            await ref
        except Exception as exc:
            self.dispatcher.forget(tracked)
            raise RankError(tracked[0].engine, 0, str(exc)) from exc

    def _completion(self, prompt_index: int, tracked: Tracked, logprobs: bool) -> Completion:
        if tracked.finish_reason == "error":
            raise RankError(tracked.engine, 0, tracked.error or "the engine failed")
        return completion(prompt_index, tracked, logprobs, self.version)

    def _engine_lost(self, index: int, why: str) -> None:
        """An engine's step loop failed (a pump saw it): recover the fleet if a rank died,
        so its requests go on. If none did, they end with the error and the engine's ranks
        start a new step loop."""
        def recover() -> None:
            with self.gate.hold(reloading=True):
                try:
                    self.transaction.recover_if_restarted(RankError(index, 0, why))
                    failed = self.fleet.wait(self.fleet.call_engine(index,
                                                                    RankActor.loop_failure))
                    if any(failed.values()):
                        self.dispatcher.fail_lost(index)
                        self.fleet.wait(self.fleet.call_engine(index, RankActor.restart_loop))
                except Exception:  # noqa: BLE001 - the next call on the engine raises it
                    log.exception("recovering engine %d failed", index)
                    self.dispatcher.fail_lost(index)

        threading.Thread(target=recover, name=f"tp-reload-recover-{index}", daemon=True).start()

    def running(self) -> list[int]:
        """Per engine: the requests it is generating now (admitted, unfinished)."""
        results = self.fleet.wait({key: ref for e in self.fleet.engines for key, ref in
                                   e.submit(RankActor.running_requests, only_rank=0).items()})
        return [results[(e.index, 0)] for e in self.fleet.engines]

    def limits(self) -> ServingLimits:
        """Vocabulary, context length and EOS ids of the served model (asked once)."""
        if self._limits is None:
            self._limits = self._serve(0, RankActor.limits)[0]
        return self._limits

    def _serving_engines(self, engine: int | None) -> list[int]:
        if engine is None:
            return [e.index for e in self.fleet.engines]
        self.fleet.engine(engine)  # raises naming the range
        return [engine]

    def calibrate_kv_scales(self, token_ids: Any) -> list[list[list[float]]]:
        """kv_cache_dtype='fp8': set every engine's k/v scales from a forward of
        ``token_ids`` (amax / 448 per layer, in place). Returns per engine [[k, v], ...]."""
        with self.gate.hold():
            return self.transaction.calibrate(as_token_tensor(token_ids))

    def capture_cuda_graph(self, token_ids: Any, engine: int = 0) -> None:
        """device='cuda': capture a forward of this shape on every rank of ``engine``."""
        self._serve(engine, RankActor.capture_cuda_graph, as_token_tensor(token_ids))

    def replay_cuda_graph(self, engine: int = 0) -> torch.Tensor:
        """Replay the captured forward: float32 CPU logits of the weights served now."""
        return self._serve(engine, RankActor.replay_cuda_graph)[0]

    def inspect(self, engine: int = 0) -> list[dict[str, dict[str, Any]]]:
        """Per rank: kernel tensor name -> {data_ptr, shape, dtype, device}."""
        ranks = self._serve(engine, RankActor.inspect)
        return [ranks[r] for r in sorted(ranks)]

    def get_tensor(self, name: str, rank: int = 0, engine: int = 0) -> torch.Tensor:
        """A CPU copy of one kernel tensor of one rank."""
        return self.get_tensors([name], rank=rank, engine=engine)[name]

    def get_tensors(self, names: list[str] | None = None, rank: int = 0, engine: int = 0
                    ) -> dict[str, torch.Tensor]:
        """CPU copies of kernel tensors of one rank (every one when ``names`` is None)."""
        with self.gate.hold():
            calls = self.fleet.call_rank((engine, rank), RankActor.get_tensors, names)
            entries, arrays = self.fleet.wait(calls)[(engine, rank)]
        return {name: tensor.clone() for name, tensor in unpack_tensors(entries, arrays)}

    def memory(self, peak: bool = False, staging: bool = False) -> list[list[int]]:
        """Per engine, per rank: resident bytes of the rank process, or with ``peak`` the
        most it held since ``reset_peak_memory``, or with ``staging`` the bytes a staged
        reload holds in staging tensors now (answered while it streams)."""
        key = "staging_bytes" if staging else "peak_rss_bytes" if peak else "rss_bytes"
        with self.gate.hold():
            results = self.fleet.run(RankActor.memory)
        return [[results[(e.index, r)][key] for r in range(len(e.ranks))]
                for e in self.fleet.engines]

    def reset_peak_memory(self) -> None:
        self.fleet.run(RankActor.reset_peak_memory)

    def inject_fault(self, stage: str, action: str, *, engine: int = 0, rank: int = 0,
                     signal_path: str | None = None) -> None:
        """Fault drills: make one rank 'raise' at, 'pause' in (until killed) or 'hold' in
        the next reload's ``stage`` ('transfer', 'process', 'quantize'). A paused or held
        rank touches ``signal_path``; a held one goes on once the file is deleted."""
        if (stage not in ("transfer", "process", "quantize")
                or action not in ("raise", "pause", "hold")):
            raise ValueError(f"unknown fault {stage!r}/{action!r}")
        if action == "hold" and not signal_path:
            raise ValueError("a 'hold' fault needs the signal_path its drill deletes")
        self.fleet.wait(self.fleet.call_rank((engine, rank), RankActor.inject_fault, stage,
                                             action, signal_path))

    def placements(self) -> list[list[dict[str, Any]]]:
        results = self.fleet.run(RankActor.placement)
        return [[results[(e.index, r)] for r in range(len(e.ranks))]
                for e in self.fleet.engines]
