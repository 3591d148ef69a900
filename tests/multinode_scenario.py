"""Run as a subprocess by test_service.py (its own Ray, apart from the session's): a
simulated cluster of a head and two worker nodes (``ray.cluster_utils.Cluster``), two vLLM
engines x TP=2 placed from the multi-node YAML preset, a directory reload, an in-memory
reload and a ``TrainerSource`` reload (a trainer actor streaming to every engine rank across
the nodes), each checked on both engines against transformers (greedy tokens and their
log-probs), and one ``sample`` call served by both. Prints one JSON line with what the
test asserts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
import torch
from ray.cluster_utils import Cluster

from orchestrator import ReloadOrchestrator, TrainerEndpoint, TrainerSource
from tests.support import VLLM_ARGS, load_tensors, reference_sample, write_checkpoint

NEW_TOKENS = 4


class Trainer(TrainerEndpoint):
    """A one-rank trainer holding full tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def tp_reload_weights(self) -> dict[str, torch.Tensor]:
        return self.tensors


def errors(orch: ReloadOrchestrator, path: Path, prompt: torch.Tensor) -> list[float]:
    """Per engine: the largest |log-prob - transformers'| of its greedy tokens, or inf when
    the tokens differ from transformers' greedy ones."""
    tokens, logprobs = reference_sample(path, prompt, NEW_TOKENS)
    out = []
    for engine in range(len(orch.engines)):
        served = orch.generate(prompt, NEW_TOKENS, ignore_eos=True, engine=engine)
        got, scores, _ = served.padded()
        same = torch.equal(got, tokens)
        out.append((scores - logprobs).abs().max().item() if same else float("inf"))
    return out


def main(workdir: str, preset: str) -> None:
    root = Path(workdir)
    a, b, c = (write_checkpoint(root / name, "llama", seed=seed, head_dim=32)
               for name, seed in (("a", 61), ("b", 62), ("c", 63)))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    prompt = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    trainer = ray.remote(num_cpus=0)(Trainer).remote(load_tensors(c))
    try:
        # The preset is for GPUs; the simulated nodes have CPUs only.
        orch = ReloadOrchestrator.from_yaml(
            preset, model=str(a), engine="vllm", device="cpu", tensor_parallel_size=2,
            num_cpus_per_rank=0.5, dtype="float32", quantization=None, engine_args=VLLM_ARGS)
        with orch:
            placements = orch.placements()
            first = errors(orch, a, prompt)
            dir_report = orch.reload(str(b))
            after_dir = errors(orch, b, prompt)
            memory_report = orch.reload(load_tensors(a))
            after_memory = errors(orch, a, prompt)
            trainer_report = orch.reload(TrainerSource([trainer]))
            after_trainer = errors(orch, c, prompt)
            rollouts = orch.sample([[5, 6, 7], [8, 9], [10], [11, 12, 13, 14]], NEW_TOKENS,
                                   n=2, seed=1)
        print(json.dumps({
            "worker_nodes": sorted(w.node_id for w in workers),
            "head_node": cluster.head_node.node_id,
            "engine_nodes": [[r["node_id"] for r in engine] for engine in placements],
            "errors": {"first": first, "dir": after_dir, "memory": after_memory,
                       "trainer": after_trainer},
            "versions": [dir_report.version, memory_report.version, trainer_report.version],
            "trainer_bytes_sent": sum(trainer_report.bytes_sent.values()),
            "transports": [r.transport for r in (dir_report, memory_report, trainer_report)],
            "sample_engines": [c.engine for c in rollouts],
            "sample_prompts": [c.prompt_index for c in rollouts],
            "strategy": [orch.config.placement_strategy, orch.config.engine_placement],
            "engine": orch.config.engine,
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
