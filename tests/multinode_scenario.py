"""Run as a subprocess by test_service.py (its own Ray, apart from the session's): a
simulated cluster of a head and two worker nodes (``ray.cluster_utils.Cluster``), two
engines x TP=2 placed from a YAML preset, a reload, and per-engine checks against
transformers. Prints one JSON line with what the test asserts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
import torch
from ray.cluster_utils import Cluster

from orchestrator import ReloadOrchestrator
from tests.support import load_tensors, reference_logits, rel_l2, write_checkpoint


def main(workdir: str, preset: str) -> None:
    root = Path(workdir)
    a = write_checkpoint(root / "a", "llama", seed=61)
    b = write_checkpoint(root / "b", "llama", seed=62)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    prompt = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    try:
        # The preset is for GPUs; the simulated nodes have CPUs only.
        orch = ReloadOrchestrator.from_yaml(preset, model=str(a), device="cpu",
                                            tensor_parallel_size=2, num_cpus_per_rank=0.5,
                                            dtype="float32", quantization=None)
        with orch:
            placements = orch.placements()
            errors_a = [rel_l2(orch.forward(prompt, engine=e), reference_logits(a, prompt))
                        for e in range(2)]
            dir_report = orch.reload(str(b))
            errors_b = [rel_l2(orch.forward(prompt, engine=e), reference_logits(b, prompt))
                        for e in range(2)]
            memory_report = orch.reload(load_tensors(a))
            errors_memory = [rel_l2(orch.forward(prompt, engine=e),
                                    reference_logits(a, prompt)) for e in range(2)]
        print(json.dumps({
            "worker_nodes": sorted(w.node_id for w in workers),
            "head_node": cluster.head_node.node_id,
            "engine_nodes": [[r["node_id"] for r in engine] for engine in placements],
            "errors": {"first": errors_a, "dir": errors_b, "memory": errors_memory},
            "versions": [dir_report.version, memory_report.version],
            "strategy": [orch.config.placement_strategy, orch.config.engine_placement],
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
