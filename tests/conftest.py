from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.support import FAMILIES, write_checkpoint

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [i.nodeid for i in items if "ray_cluster" in getattr(i, "fixturenames", ())
                and not i.get_closest_marker("ray")]
    if unmarked:
        raise pytest.UsageError(f"tests using ray_cluster must be marked `ray`: {unmarked}")
    for item in items:
        if item.get_closest_marker("vllm"):
            item.add_marker(pytest.mark.slow)  # each starts vLLM engines: 10 s and more
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker); this machine has no GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def ray_only_when_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test without the `ray` marker cannot start Ray (so `pytest -m "not ray"` needs no
    cluster): it sees no running Ray, and ray.init fails naming the test."""
    if request.node.get_closest_marker("ray"):
        return
    try:
        import ray
    except ImportError:  # a machine without Ray (the GPU image) cannot start it anyway
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{request.node.nodeid} starts Ray: mark it `ray`")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session. Logical CPUs exceed the 2 real cores on purpose:
    ranks request fractions and mostly wait on each other. At its end, no engine of the
    session may have left shared memory on the node."""
    import ray

    found = engine_shared_memory()
    ray.init(num_cpus=8, include_dashboard=False, object_store_memory=512 << 20,
             log_to_driver=False)
    yield ray
    ray.shutdown()
    left = sorted(engine_shared_memory() - found)
    assert not left, f"the session's engines left shared memory behind: {left}"


def engine_shared_memory() -> set[str]:
    """What engines (ours, vLLM's, Python's SharedMemory) have in /dev/shm now."""
    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return {n for n in names if n.startswith(("tp-reload-", "psm_")) or "cpushm" in n}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> float32 checkpoint dir."""
    root = tmp_path_factory.mktemp("ckpt")
    return {name: write_checkpoint(root / name, name, seed=i) for i, name in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def llama32(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two float32 Llama checkpoints, steps 'a' and 'b', with head size 32 (one vLLM's CPU
    attention supports), shared by the vLLM, fault and shared-memory tests."""
    root = tmp_path_factory.mktemp("llama32")
    return {name: write_checkpoint(root / name, "llama", seed=seed, head_dim=32)
            for name, seed in (("a", 41), ("b", 42))}


@pytest.fixture(scope="session")
def vllm_tp2(ray_cluster, llama32):
    """One float32 TP=2 vLLM engine for the session, first serving llama32['a']. vLLM
    engines are the suite's dearest part (each rank imports vLLM for about 10 s here): the
    tests that leave an engine serving share this one (``serving`` brings it to the
    checkpoint they expect); drills that kill or break ranks start engines of their own."""
    from tests.support import start

    with start(llama32["a"], 2, engine="vllm") as orch:
        yield orch


@pytest.fixture(scope="session")
def prompt() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1234))
