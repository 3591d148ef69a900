"""In-memory and trainer sources through the node's shared memory
(``actors.transports.regions``): the same bits as through Ray's object store and a trainer's
process group on both engines, equal to transformers; a rank killed mid-read rolls back and
the next reload works; a driver killed mid-write leaves its regions to the next start on the
node, which removes them; nothing is left once the orchestrator closes. A trainer killed
mid-write: ``test_trainer_stream``."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray

from orchestrator import RankError, TrainerSource
from tests.support import (
    TensorTrainer,
    kernel_tensors,
    kill_rank,
    load_tensors,
    regions,
    reload_until_paused,
    serves,
    serving,
    start,
    unequal_tensors,
)

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
ENGINES = ["native", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.shares("vllm_tp2")])]


@contextmanager
def shared_memory(orch, on: bool):
    """``orch`` with ``EngineConfig.shared_memory=on`` for a while (a shared engine)."""
    before = orch.config.shared_memory
    orch.config.shared_memory = on
    try:
        yield orch
    finally:
        orch.config.shared_memory = before


@pytest.mark.parametrize("engine_name", ENGINES)
def test_shared_memory_reloads_equal_the_object_store_and_the_stream_bit_for_bit(
        ray_cluster, llama32, prompt, engine_name, request):
    """An in-memory dict and a trainer actor, each reloaded through the node's shared memory
    and then the other way (Ray's object store; a process group): the same kernel tensors
    on every rank, serving transformers' tokens."""
    orch = serving(request.getfixturevalue(f"{engine_name}_tp2"), llama32["a"])
    step_b = load_tensors(llama32["b"])
    trainer = ray.remote(num_cpus=0)(TensorTrainer).remote(step_b)
    try:
        for source, other_way in ((step_b, "object_store"),
                                  (TrainerSource([trainer]), "trainer_stream")):
            report = orch.reload(source)
            # One copy on the node whatever the number of ranks, kept for rollback.
            assert report.transport == "shared_memory"
            assert report.rollback_bytes >= report.source_bytes
            assert len(regions()) >= 1
            through_shm = kernel_tensors(orch)
            assert serves(orch, llama32["b"], prompt)

            orch.reload(str(llama32["a"]))
            with shared_memory(orch, False):
                assert orch.reload(source).transport == other_way
            assert unequal_tensors(kernel_tensors(orch), through_shm) == [], other_way
            assert serves(orch, llama32["b"], prompt)
    finally:
        ray.kill(trainer)


@pytest.mark.slow
def test_rank_killed_mid_read_rolls_back_and_leaves_nothing(ray_cluster, llama32, prompt,
                                                            tmp_path):
    """From the driver's memory, then from a trainer: rank 1 pauses in its transfer stage
    (reading a bucket out of the region) and is killed there. The reload rolls back from the
    region the commit log keeps, the rebuilt rank replays it, the next reload through shared
    memory (from the same kind of source) works, and closing the orchestrator removes its
    regions."""
    before = regions()
    step_a, step_b = load_tensors(llama32["a"]), load_tensors(llama32["b"])
    trainer = ray.remote(num_cpus=0)(TensorTrainer)
    with start(llama32["b"], 2) as orch:
        assert orch.reload(step_a).transport == "shared_memory"  # what rollback replays
        serving_path = llama32["a"]
        drills = [(step_b, step_b, llama32["b"]),
                  (TrainerSource([trainer.remote(step_a)]),
                   TrainerSource([trainer.remote(step_a)]), llama32["a"])]
        for killed, next_source, next_path in drills:
            version, served = orch.version, kernel_tensors(orch)
            pids = [p["pid"] for p in orch.placements()[0]]
            paused = tmp_path / f"paused-{version}"
            orch.inject_fault("transfer", "pause", engine=0, rank=1, signal_path=str(paused))
            worker, outcome = reload_until_paused(orch, killed, paused,
                                                  "rank 1 never reached its transfer stage")
            kill_rank(orch, pids[1], rank=1)
            worker.join(timeout=180)
            assert len(outcome) == 1 and isinstance(outcome[0], RankError), outcome
            assert (outcome[0].engine, outcome[0].rank) == (0, 1)
            assert orch.version == version
            assert unequal_tensors(kernel_tensors(orch), served) == [], type(killed)
            assert serves(orch, serving_path, prompt)
            # The failed reload's region went back to the pool although its error lives on
            # (in ``outcome``, in the log's records): the log's, a spare and it at most, and
            # the next reload makes no new one.
            gc.collect()
            held = regions() - before
            assert len(held) <= 3, held
            report = orch.reload(next_source)
            assert report.transport == "shared_memory" and report.version == version + 1
            assert serves(orch, next_path, prompt)
            assert regions() - before == held, "the next reload made a region"
            serving_path = next_path
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
