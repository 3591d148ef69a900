"""Shared memory on a node belongs to the engine instance that created it and goes away with
it: a clean close removes it, a killed rank's is removed by the next start on the node, and
nothing else is ever touched (another live engine's, a foreign segment). A node whose shared
memory cannot take an engine is refused in one line naming the segment or the space.

The rules are checked on the real /dev/shm with real processes (owners that live, and owners
killed with SIGKILL); the vLLM drill kills a real engine's rank process with SIGKILL."""

from __future__ import annotations

import logging
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from actors import node_shm
from actors.engines.vllm.shm import explain
from actors.node_shm import SHM_DIR, SharedMemoryUnavailable, new_instance
from orchestrator import SharedMemoryError
from tests.support import (
    process_alive,
    sample_fixed,
    serving,
    start,
)

ROOT = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("tests.node_shm")
NEW_TOKENS = 8


def ours() -> set[str]:
    """Every tp-reload entry in /dev/shm now."""
    return {name for names in node_shm.instances().values() for name in names}


def segment(name: str, nbytes: int = 4096) -> Path:
    """A segment in /dev/shm, as shm_open + ftruncate make it (untracked by Python)."""
    path = SHM_DIR / name
    with open(path, "xb") as f:
        f.truncate(nbytes)
    return path


def temp_files(instance: str) -> Path:
    """The instance's temporary directory with what an engine leaves there: a socket, and
    a 1000-byte file in a subdirectory."""
    import socket

    directory = node_shm.temp_dir(instance)
    (directory / "pymp-x").mkdir(parents=True)
    (directory / "pymp-x" / "data").write_bytes(b"\0" * 1000)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(directory / "3f1c-ipc"))
    return directory


class Scratch:
    """Instance names and owner processes for one test; ``cleanup`` removes whatever they
    left (entries, this process's claims, children)."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self.children: list[subprocess.Popen] = []

    def instance(self, engine: int = 0) -> str:
        self.made.append(new_instance(engine))
        return self.made[-1]

    def owner(self, instance: str, rank: int) -> subprocess.Popen:
        """Another process that claims ``instance`` as its rank ``rank``, then waits."""
        code = (f"import time; from actors.node_shm import claim; claim({instance!r}, {rank})"
                "; print('claimed', flush=True); time.sleep(600)")
        child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
        self.children.append(child)
        assert child.stdout.readline().strip() == "claimed"
        return child

    def cleanup(self) -> None:
        for child in self.children:
            kill(child)
        for instance in self.made:
            node_shm.release(instance, LOG)
            shutil.rmtree(node_shm.temp_dir(instance), ignore_errors=True)
        for name in os.listdir(SHM_DIR):
            if name.startswith((*self.made, "psm_tpr")):
                (SHM_DIR / name).unlink(missing_ok=True)


def kill(child: subprocess.Popen) -> None:
    """SIGKILL: no cleanup of any kind runs in the child."""
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)


@pytest.fixture
def scratch():
    made = Scratch()
    yield made
    made.cleanup()


def test_sweep_removes_dead_instances_and_nothing_else(scratch, caplog):
    dead, live, unrecorded = scratch.instance(), scratch.instance(1), scratch.instance(2)
    child = scratch.owner(dead, 0)  # killed after creating its segments: no cleanup runs
    dead_segments = [segment(f"{dead}-psm_1a2b3c4d", 24 << 20),
                     segment(f"{dead}-tp:0-[0-1]-cpushm_0")]
    dead_temp = temp_files(dead)
    kill(child)
    node_shm.claim(live, 0)  # this process, alive
    live_segment = segment(f"{live}-psm_5e6f7a8b")
    live_temp = temp_files(live)
    # Our prefix but no owner record: not made by a claim of ours, so never removed.
    unrecorded_segment = segment(f"{unrecorded}-psm_9c0d1e2f")
    foreign = segment("psm_tpr_foreign")
    with caplog.at_level(logging.WARNING, LOG.name):
        removed = node_shm.sweep(LOG)
    assert sorted(removed) == sorted([(str(dead_segments[0]), 24 << 20),
                                      (str(dead_segments[1]), 4096), (str(dead_temp), 1000)])
    assert not any(name.startswith(dead) for name in os.listdir(SHM_DIR)), "records too"
    assert not dead_temp.exists()
    assert f"removed what dead engine instance {dead} left" in caplog.text
    assert f"{dead}-psm_1a2b3c4d (24.0 MiB)" in caplog.text
    assert all(p.exists() for p in (live_segment, live_temp, unrecorded_segment, foreign))
    assert node_shm.release(unrecorded, LOG) == [], "never claimed by this process"
    assert sorted(node_shm.release(live, LOG)) == sorted([(str(live_segment), 4096),
                                                          (str(live_temp), 1000)])
    assert not any(name.startswith(live) for name in os.listdir(SHM_DIR))
    assert not live_temp.exists()
    assert unrecorded_segment.exists() and foreign.exists()


def test_the_last_owner_out_removes_the_instance(scratch):
    """Ranks close one by one: a rank's close leaves the segments while a peer on the node
    lives; once the peer is gone, whoever looks next removes them."""
    instance = scratch.instance()
    peer = scratch.owner(instance, 1)
    node_shm.claim(instance, 0)
    ring = segment(f"{instance}-psm_00112233")
    assert node_shm.release(instance, LOG) == [] and ring.exists()
    assert node_shm.sweep(LOG) == [] and ring.exists(), "the peer still lives"
    kill(peer)
    assert node_shm.sweep(LOG) == [(str(ring), 4096)]


def test_a_rebuilt_rank_waits_for_the_killed_instance(scratch):
    instance = scratch.instance()
    child = scratch.owner(instance, 0)
    assert not node_shm.await_owners(instance, timeout_s=0.2)
    subprocess.Popen(["sh", "-c", f"sleep 0.3; kill -9 {child.pid}"])
    begin = time.monotonic()
    assert node_shm.await_owners(instance, timeout_s=30)
    assert time.monotonic() - begin < 10


def test_a_segment_name_held_by_a_live_process_is_refused_in_one_line(scratch):
    instance = scratch.instance()
    held = segment(f"{instance}-tp:0-[0-1]-cpushm_0")
    scratch.owner(instance, 1)  # a peer's record is not a collision
    node_shm.release(instance, LOG)
    with open(held, "r+b") as f, mmap.mmap(f.fileno(), 4096):
        with pytest.raises(SharedMemoryUnavailable) as refused:
            node_shm.require_unused(instance)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"shared memory segment {held} already exists and is held by "
                              f"pid {os.getpid()} (")
    assert f"rm '{held}'" in message and held.exists()


def test_a_full_node_is_refused_in_one_line():
    free = shutil.disk_usage(SHM_DIR).free
    with pytest.raises(SharedMemoryUnavailable) as refused:
        node_shm.require_space(free + (64 << 20), "vLLM rank 0 (the TP broadcast ring)")
    message = str(refused.value)
    assert "\n" not in message and "vLLM rank 0 (the TP broadcast ring)" in message
    assert f"{SHM_DIR} has {free / 2**20:.1f} MiB free" in message and "--shm-size" in message


@pytest.mark.parametrize(("text", "expected"), [
    ("create shm in SHMManager failed. errno: 17",
     r"could not create shared memory segment /dev/shm/\?_1: File exists; another process "
     r"holds that name"),
    ("mmap in SHMManager failed. errno: 12", r"/dev/shm/\?_1: Cannot allocate memory; free "),
    ("Insufficient space in /dev/shm for shared-memory allocation: 24 MiB required, 3 MiB "
     "free. Increase /dev/shm (e.g. --shm-size or --ipc=host).", r"^Insufficient space .*ipc"),
])
def test_vllms_own_shared_memory_failures_read_as_one_line(text, expected):
    """vLLM's C++ SHM manager and its free-space check, as they word their failures."""
    unavailable = explain(RuntimeError(f"{text}\nException raised from init_shm at shm.cpp"), 1)
    assert unavailable is not None and "\n" not in str(unavailable)
    assert re.search(expected, str(unavailable)), str(unavailable)
    assert explain(RuntimeError("CUDA out of memory"), 1) is None


# ---- real vLLM engines -------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(llama32) -> Path:
    return llama32["a"]


@pytest.mark.ray
@pytest.mark.vllm
def test_sigkilled_vllm_rank_is_rebuilt_and_leaves_nothing(ray_cluster, checkpoint, prompt,
                                                           caplog, vllm_tp2, vllm_drill):
    """SIGKILL (no Ray, no cleanup) on a TP=2 rank of the session's drill engine: the engine
    is rebuilt under a new name after removing the dead instance's segments and temporary
    directory, and serves the same tokens bit for bit. Another orchestrator serves beside
    it on the node throughout (the session's shared engines): the rebuild's sweep leaves
    their live segments alone, and they serve the same tokens. Nothing else appears or
    goes; when the session closes the drill engine, nothing of its is left
    (``closed_without_trace``)."""
    other = serving(vllm_tp2, checkpoint)
    beside = set(node_shm.instances()[other.engines[0].instance])
    orch = serving(vllm_drill, checkpoint)
    found = ours()
    served = sample_fixed(orch, prompt, NEW_TOKENS, temperature=0)
    dead = orch.engines[0].instance
    left = sorted(n for n in ours() if n.startswith(dead) and "owner" not in n)
    assert left, "a TP=2 vLLM engine creates shared memory (its broadcast ring)"
    assert node_shm.temp_dir(dead).is_dir()
    pid = orch.placements()[0][1]["pid"]
    os.kill(pid, signal.SIGKILL)
    while process_alive(pid):
        time.sleep(0.02)
    # The requests sent next meet the dead rank: the engine is rebuilt and they go on there.
    with caplog.at_level(logging.WARNING, "tp_reload"):
        after_kill = sample_fixed(orch, prompt, NEW_TOKENS, temperature=0)
    assert "goes on as" in caplog.text
    assert torch.equal(after_kill.tokens, served.tokens)
    rebuilt = orch.engines[0].instance
    assert rebuilt != dead and not any(n.startswith(dead) for n in ours())
    assert not node_shm.temp_dir(dead).exists() and node_shm.temp_dir(rebuilt).is_dir()
    assert all(str(SHM_DIR / name) in caplog.text for name in left), caplog.text
    assert str(node_shm.temp_dir(dead)) in caplog.text
    again = sample_fixed(orch, prompt, NEW_TOKENS, temperature=0)
    assert torch.equal(again.tokens, served.tokens)
    assert torch.equal(again.logprobs, served.logprobs)
    assert other.engines[0].instance not in (dead, rebuilt)
    assert set(node_shm.instances()[other.engines[0].instance]) == beside
    fresh = sample_fixed(other, prompt, NEW_TOKENS, temperature=0)
    assert torch.equal(fresh.tokens, served.tokens)
    assert torch.equal(fresh.logprobs, served.logprobs)
    # The dead instance's entries went, the rebuilt one's came; nothing else changed.
    assert {n for n in found if not n.startswith(dead)} == \
        {n for n in ours() if not n.startswith(rebuilt)}
    assert any(n.startswith(rebuilt) for n in ours())


@pytest.mark.ray
@pytest.mark.vllm
def test_a_held_segment_name_refuses_the_start_in_one_line(ray_cluster, checkpoint,
                                                           monkeypatch, scratch):
    """A segment with the engine's name, held by a live process tp-reload does not own:
    the start fails in one line naming it and its holder, removes nothing, frees its
    placement groups."""
    import ray

    instance = scratch.instance()
    monkeypatch.setattr("orchestrator.cluster.new_instance", lambda engine: instance)
    held = segment(f"{instance}-psm_c0ffee00")
    groups = len([g for g in ray.util.placement_group_table().values()
                  if g["state"] != "REMOVED"])
    with open(held, "r+b") as f, mmap.mmap(f.fileno(), 4096):
        with pytest.raises(SharedMemoryError) as refused:
            start(checkpoint, 2, engine="vllm").start()
    message = str(refused.value)
    assert "\n" not in message, message
    assert f"shared memory segment {held} already exists and is held by pid {os.getpid()}" \
        in message and message.startswith("engine 0 rank ")
    assert held.exists()
    assert len([g for g in ray.util.placement_group_table().values()
                if g["state"] != "REMOVED"]) == groups
