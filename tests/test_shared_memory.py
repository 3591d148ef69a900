"""In-memory sources through the node's shared memory (``actors.transports.shared_memory``):
the same bits as through Ray's object store on both engines, equal to transformers; a rank
killed mid-read rolls back and the next reload works; a driver killed mid-write leaves its
regions to the next start on the node, which removes them; nothing is left once the
orchestrator closes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from actors import node_shm
from orchestrator import RankError
from tests.support import (
    kill_rank,
    load_tensors,
    reload_until_paused,
    serves,
    serving,
    start,
)

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
ENGINES = ["native", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.shares("vllm_tp2")])]


def regions() -> set[str]:
    """tp-reload's in-memory-source regions in /dev/shm now."""
    return {name for names in node_shm.instances().values() for name in names
            if "-region" in name}


def kernel_tensors(orch) -> list[dict[str, torch.Tensor]]:
    return [orch.get_tensors(rank=r) for r in range(orch.config.tensor_parallel_size)]


@contextmanager
def memory_transport(orch, name: str):
    """``orch`` sending in-memory sources by ``name`` for a while (a shared engine)."""
    before = orch.config.memory_transport
    orch.config.memory_transport = name
    try:
        yield orch
    finally:
        orch.config.memory_transport = before


@pytest.mark.parametrize("engine_name", ENGINES)
def test_shared_memory_reload_equals_the_object_stores_bit_for_bit(
        ray_cluster, llama32, prompt, engine_name, request):
    orch = serving(request.getfixturevalue(f"{engine_name}_tp2"), llama32["a"])
    step_b = load_tensors(llama32["b"])
    report = orch.reload(step_b)
    # One copy on the node whatever the number of ranks, kept for rollback.
    assert report.transport == "shared_memory"
    assert report.rollback_bytes >= report.source_bytes
    assert len(regions()) >= 1
    through_shm = kernel_tensors(orch)
    assert serves(orch, llama32["b"], prompt)

    orch.reload(str(llama32["a"]))
    with memory_transport(orch, "object_store"):
        report = orch.reload(step_b)
    assert report.transport == "object_store"
    through_store = kernel_tensors(orch)
    for rank, (shm, store) in enumerate(zip(through_shm, through_store, strict=True)):
        assert shm.keys() == store.keys()
        unequal = [n for n in shm if not torch.equal(shm[n], store[n])]
        assert not unequal, f"rank {rank}: {unequal}"
    assert serves(orch, llama32["b"], prompt)


@pytest.mark.slow
def test_rank_killed_mid_read_rolls_back_and_leaves_nothing(ray_cluster, llama32, prompt,
                                                            tmp_path):
    """Rank 1 pauses in its transfer stage (reading a bucket out of the region) and is
    killed there: the reload rolls back from the region the commit log keeps, the rebuilt
    rank replays it, the next reload through shared memory works, and closing the
    orchestrator removes its regions."""
    before = regions()
    step_a, step_b = load_tensors(llama32["a"]), load_tensors(llama32["b"])
    with start(llama32["b"], 2) as orch:
        assert orch.reload(step_a).transport == "shared_memory"  # what rollback replays
        served = kernel_tensors(orch)
        pids = [p["pid"] for p in orch.placements()[0]]
        paused = tmp_path / "paused"
        orch.inject_fault("transfer", "pause", engine=0, rank=1, signal_path=str(paused))
        worker, outcome = reload_until_paused(orch, step_b, paused,
                                              "rank 1 never reached its transfer stage")
        kill_rank(orch, pids[1], rank=1)
        worker.join(timeout=180)
        assert len(outcome) == 1 and isinstance(outcome[0], RankError), outcome
        assert (outcome[0].engine, outcome[0].rank) == (0, 1)
        assert orch.version == 1
        restored = kernel_tensors(orch)
        for rank in range(2):
            assert all(torch.equal(served[rank][n], restored[rank][n]) for n in served[rank])
        assert serves(orch, llama32["a"], prompt)
        # The failed reload's region went back to the pool: at most the log's and a spare.
        assert len(regions() - before) <= 2
        report = orch.reload(step_b)
        assert report.transport == "shared_memory" and report.version == 2
        assert serves(orch, llama32["b"], prompt)
    assert regions() - before == set(), "the closed orchestrator left regions"


DRIVER = """
import sys, ray
from pathlib import Path
from tests.support import load_tensors, start
ray.init(address=sys.argv[1], log_to_driver=False)
orch = start(Path(sys.argv[2]), 1).start()
orch.inject_fault("transfer", "pause", engine=0, rank=0, signal_path=sys.argv[3])
orch.reload(load_tensors(Path(sys.argv[2])))
"""


@pytest.mark.slow
def test_driver_killed_mid_write_leaves_its_regions_to_the_next_start(ray_cluster, llama32,
                                                                      tmp_path):
    """A driver (the sender of an in-memory source) killed while its ranks read a reload:
    its regions outlive it, unowned, and the next engine start on the node removes them."""
    before = regions()
    paused = tmp_path / "paused"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, ray_cluster.get_runtime_context().gcs_address,
         str(llama32["a"]), str(paused)], cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not paused.exists():
        assert driver.poll() is None, driver.stderr.read()
        assert time.monotonic() < deadline, "the driver's rank never paused in its transfer"
        time.sleep(0.1)
    left = regions() - before
    assert left, "the driver wrote no region"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    assert regions() - before == left, "the regions should outlive the killed driver"
    with start(llama32["a"], 1):  # its ranks sweep the node before they create anything
        assert not left & regions(), f"the next start left the dead driver's {left}"
