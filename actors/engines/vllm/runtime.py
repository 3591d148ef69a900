"""One TP rank of a vLLM engine inside a Ray rank actor.

Every rank actor builds its own ``LLM(..., distributed_executor_backend="external_launcher")``
after setting the torch.distributed environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``), with the engine core in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). vLLM
is SPMD in this mode: every rank must receive the same ``generate`` calls, which the driver
guarantees by sending each call to every rank of the engine.

Before it builds, the rank records itself as an owner of its engine instance on its node and
names vLLM's shared memory after it (``actors.engines.vllm.shm``), so the segments go with
the engine.

The engine is built with ``load_format="dummy"``: its kernel tensors exist from the start and
every load, version 0 included, goes through tp-reload's reload engine into them (so a bad
first checkpoint is refused the same way as a bad reload). Every request's prefix-cache
entries are salted with the version it started on, and the cache is reset after each commit
once no request runs: nothing computed with old weights is served to a later request.
"""

from __future__ import annotations

import gc
import os
import random
import socket
from typing import Any

import torch

from actors.engines import EngineOptions
from actors.engines.runtime import (
    RankContext,
    RankRuntime,
    Request,
    ServingLimits,
    Update,
    model_limits,
)
from actors.engines.vllm import shm
from actors.reload import ReloadableModel

# vLLM's CPU build compiles every model with torch.compile unless told otherwise (~40 s per
# engine on a 2-core machine); eager mode builds in seconds.
CPU_DEFAULTS: dict[str, Any] = {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30}
# Rendezvous ports are drawn from here up to the start of the OS's ephemeral range.
PORTS_FROM = 20000


def free_port_below_ephemeral(host: str) -> int:
    """A port of ``host`` that binds now, drawn at random below the ephemeral range."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    candidates = random.sample(range(PORTS_FROM, max(PORTS_FROM + 1, ephemeral_low)),
                               k=min(64, max(1, ephemeral_low - PORTS_FROM)))
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {host} between {PORTS_FROM} and {ephemeral_low}")


def skip_helper_compiles() -> None:
    """In eager mode vLLM still compiles two small integer functions with torch.compile on
    an engine's first request (the vocabulary mask of a sharded embedding, the rank of each
    sampled token's log-prob): 2-3 s of Dynamo and Inductor per engine on a 2-core CPU, and
    an Inductor cache left in the temporary directory. Run eagerly they give the same bits
    (integer arithmetic; tests/test_vllm.py compares with a vLLM engine that compiles).
    A stance holds for every thread of the process (``torch._dynamo.config`` is per thread,
    and requests run on another thread than the build)."""
    torch.compiler.set_stance("force_eager")


class VllmRuntime(RankRuntime):
    builds_loaded = True

    def __init__(self, options: EngineOptions, context: RankContext) -> None:
        super().__init__(options, context)
        self.llm: Any = None
        self.model: torch.nn.Module | None = None
        self._reloadable: ReloadableModel | None = None

    # ---- group and model ---------------------------------------------------------------

    def rendezvous(self) -> tuple[str, int]:
        """A free port on this node for vLLM's torch.distributed store, which rank 0 binds
        later (vLLM takes only ``MASTER_PORT``, not a bound socket). Chosen below the
        ephemeral range: the OS hands ephemeral ports to outgoing connections (Ray's among
        them), which took a probed port before vLLM bound it in a rebuild."""
        import ray

        host = ray.util.get_node_ip_address()
        return host, free_port_below_ephemeral(host)

    def join(self, host: str, port: int, instance: str) -> None:
        if self.llm is not None:
            raise RuntimeError("a vLLM rank forms its process group once: restart every rank "
                               "of the engine to form a new one")
        rank = self.context.rank
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(self.context.world_size), MASTER_ADDR=host,
            MASTER_PORT=str(port), VLLM_ENABLE_V1_MULTIPROCESSING="0",
            # One visible GPU per rank actor on CUDA; on CPU the rank's own index.
            LOCAL_RANK="0" if self.device.type == "cuda" else str(rank))
        # vLLM forbids set_num_threads once built: give the rank the cores Ray granted it.
        torch.set_num_threads(max(1, int(self.options.num_cpus)))
        shm.prepare(instance, rank, self.context.world_size, self.device)
        from vllm import LLM

        # What the imports allocated (torch, transformers, vLLM: most of the heap) lives as
        # long as the process. Frozen, the full collections vLLM runs while it builds (five
        # here) skip it: about 0.9 s less per rank start on this CPU. vLLM freezes its own
        # startup heap the same way once built (``freeze_gc_heap``).
        gc.freeze()
        args = self._llm_args()
        if self.device.type == "cpu" and args.get("enforce_eager"):
            skip_helper_compiles()
        try:
            self.llm = LLM(**args)
        except Exception as exc:
            unavailable = shm.explain(exc, rank)
            if unavailable is None:
                raise
            raise unavailable from exc
        self.model = self.llm.llm_engine.model_executor.driver_worker.worker.get_model()
        self.context.log.info("built vLLM TP rank %d/%d (%s, quantization=%s)", rank,
                              self.context.world_size, self.options.dtype,
                              self.options.quantization)

    def _llm_args(self) -> dict[str, Any]:
        options = self.options
        args: dict[str, Any] = dict(
            model=options.model, tensor_parallel_size=options.tensor_parallel_size,
            distributed_executor_backend="external_launcher", dtype=options.dtype,
            quantization=options.quantization, kv_cache_dtype=options.kv_cache_dtype,
            skip_tokenizer_init=True, load_format="dummy", seed=0)
        if self.device.type == "cpu":
            args.update(CPU_DEFAULTS)
        args.update(options.engine_args)
        return args

    def reloadable(self) -> ReloadableModel:
        if self._reloadable is None:
            from actors.engines.vllm.reloadable import VllmReloadable

            self._reloadable = VllmReloadable(self.model, getattr(torch, self.options.dtype),
                                              self.context.world_size)
        return self._reloadable

    def consensus(self, ok: bool) -> bool:
        from vllm.distributed import get_tp_group

        flag = torch.tensor([int(ok)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN,
                                     group=get_tp_group().cpu_group)
        return bool(flag.item())

    def after_commit(self) -> None:
        # Prefix-cache blocks hold keys and values computed with the old weights. Requests
        # still running on them (an in-flight 'keep' flip) keep theirs: the version salt
        # already keeps every later request off them, and they go when those finish.
        if not self.has_work() and not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache")

    # ---- serving -----------------------------------------------------------------------

    def admit(self, request: Request, version: int) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = request.sampling
        # Stop tokens are exactly the request's: vLLM would add generation_config.json's EOS
        # ids unless told to ignore EOS (it has no tokenizer here, so no EOS of its own).
        params = SamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens, seed=request.seed,
            stop_token_ids=list(sampling.stop_token_ids), ignore_eos=True,
            logprobs=0 if sampling.logprobs else None, detokenize=False,
            output_kind=RequestOutputKind.DELTA)
        # The version salts the prefix cache: a request never reuses keys and values
        # computed with other weights, even while older requests still hold theirs.
        prompt = {"prompt_token_ids": request.prompt, "cache_salt": f"v{version}"}
        self.llm.llm_engine.add_request(request.request_id, prompt, params)

    def abort(self, request_ids: list[str]) -> None:
        self.llm.llm_engine.abort_request(request_ids, internal=False)

    def has_work(self) -> bool:
        return self.llm.llm_engine.has_unfinished_requests()

    def running(self) -> list[str]:
        states = self.llm.llm_engine.output_processor.request_states.values()
        return [state.external_req_id for state in states]

    def step(self) -> list[Update]:
        return [update(output, completion) for output in self.llm.llm_engine.step()
                for completion in output.outputs]

    def recompute(self) -> None:
        # Preempts every running request: the next step computes its prompt and tokens so
        # far again, on the weights served now.
        self.llm.reset_prefix_cache(reset_running_requests=True)

    def limits(self) -> ServingLimits:
        return model_limits(self.options.model, self.llm.llm_engine.model_config.max_model_len)

    def kernel_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.model.named_parameters())
        tensors.update(self.model.named_buffers())
        return tensors


def update(output: Any, completion: Any) -> Update:
    """A vLLM step's ``RequestOutput`` (delta kind) for one request."""
    tokens = list(completion.token_ids)
    scores = ([step[token].logprob for token, step in zip(tokens, completion.logprobs,
                                                          strict=True)]
              if completion.logprobs is not None else [])
    reason = completion.finish_reason if output.finished else None
    if reason not in (None, "stop", "length"):
        reason = "abort"
    return Update(output.request_id, tokens, scores, reason, output.num_cached_tokens or 0)
