"""The independent oracle for the vLLM engine: a fresh vLLM engine that vLLM itself builds
from a checkpoint with its own loader, one plain Ray actor per TP rank, asked for greedy
tokens and their log-probs. The only tp-reload code it runs names its shared memory after
an engine instance of its own (``actors.engines.vllm.shm``) and removes it when it is done, so
oracles never collide with each other or with the engines under test, and leave nothing
behind; vLLM loads and runs the weights alone."""

from __future__ import annotations

import gc
import logging
import os
import socket
from pathlib import Path
from typing import Any

import ray
import torch

from actors.node_shm import new_instance, release
from tests.support import VLLM_ARGS


@ray.remote(num_cpus=0.5)
class OracleRank:
    def __init__(self, rank: int, world_size: int, port: int, path: str, kwargs: dict,
                 instance: str, compile_helpers: bool) -> None:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          VLLM_ENABLE_V1_MULTIPROCESSING="0")
        from actors.engines.vllm.shm import prepare

        self.instance = instance
        prepare(instance, rank, world_size, torch.device("cpu"))  # before vLLM is imported
        from vllm import LLM

        gc.freeze()  # as tp-reload's ranks do: vLLM's collections skip the imports' heap
        if not compile_helpers:
            torch.compiler.set_stance("force_eager")
        self.llm = LLM(model=path, tensor_parallel_size=world_size,
                       distributed_executor_backend="external_launcher",
                       skip_tokenizer_init=True, enforce_eager=True, seed=0, **kwargs)

    def close(self) -> None:
        release(self.instance, logging.getLogger("tests.vllm_oracle"))

    def greedy(self, prompts: list[list[int]], new_tokens: int) -> tuple[list, list]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=new_tokens, logprobs=0,
                                ignore_eos=True, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    use_tqdm=False)
        return ([list(o.outputs[0].token_ids) for o in outputs],
                [[step[t].logprob for t, step in zip(o.outputs[0].token_ids,
                                                     o.outputs[0].logprobs, strict=True)]
                 for o in outputs])


def vllm_greedy(path: Path, tp: int, prompts: torch.Tensor, new_tokens: int,
                compile_helpers: bool = True, **kwargs: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [B, N] and log-probs [B, N] of vLLM's own engine on ``path``. By
    default vLLM compiles its two integer helpers on the first request, as it does unasked
    (about 17 s of Dynamo, Inductor and a C++ compiler here); ``compile_helpers=False`` runs
    them eagerly, as tp-reload's ranks do (``actors.engines.vllm.runtime.skip_helper_compiles``),
    for an oracle whose other half already showed that both give the same bits."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    instance = new_instance(0)
    ranks = [OracleRank.remote(r, tp, port, str(path), {**VLLM_ARGS, **kwargs}, instance,
                               compile_helpers) for r in range(tp)]
    try:
        tokens, logprobs = ray.get([r.greedy.remote(prompts.tolist(), new_tokens)
                                    for r in ranks])[0]
    finally:
        ray.wait([r.close.remote() for r in ranks], num_returns=len(ranks), timeout=60)
        for rank in ranks:
            ray.kill(rank)
    return torch.tensor(tokens), torch.tensor(logprobs)
