from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

from orchestrator.scratch import inductor_cache_in, owned_temp_dir
from tests.support import FAMILIES, start, write_checkpoint

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# The session's directory, with everything the suite writes (pytest's tmp_path, the session
# Ray's files, the service tests' clusters): removed at the end, or by the next session if
# this one is killed (``orchestrator.scratch``). Short: Ray's socket paths live under it.
SESSION_PREFIX = "tp-reload-tests-"
SESSION_DIR = pytest.StashKey[tuple[Path, contextlib.ExitStack]]()


@pytest.hookimpl(tryfirst=True)  # before pytest's tmp_path factory reads --basetemp
def pytest_configure(config: pytest.Config) -> None:
    stack = contextlib.ExitStack()
    root = stack.enter_context(owned_temp_dir(SESSION_PREFIX))
    config.stash[SESSION_DIR] = (root, stack)
    stack.enter_context(inductor_cache_in(root))  # the oracles' transformers import Dynamo
    if config.option.basetemp is None:  # one given on the command line is the user's
        config.option.basetemp = str(root / "pytest")


def pytest_unconfigure(config: pytest.Config) -> None:
    config.stash[SESSION_DIR][1].close()


@pytest.fixture(scope="session")
def session_dir(pytestconfig: pytest.Config) -> Path:
    return pytestconfig.stash[SESSION_DIR][0]


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    unmarked = [i.nodeid for i in items if "ray_cluster" in getattr(i, "fixturenames", ())
                and not i.get_closest_marker("ray")]
    if unmarked:
        raise pytest.UsageError(f"tests using ray_cluster must be marked `ray`: {unmarked}")
    for item in items:
        if item.get_closest_marker("vllm"):
            item.add_marker(pytest.mark.slow)  # each starts vLLM engines: 10 s and more
        SHARED.declared(item)  # an unknown name is a usage error before anything runs
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (gpu marker); this machine has no GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    result = yield  # pytest's own hooks deselect (-m, -k) and group parameters
    items[:] = SHARED.ordered(items)
    return result


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    SHARED.close_unneeded(item)


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
def ray_cluster(session_dir: Path):
    """One local Ray for the whole session. Logical CPUs exceed the 2 real cores on purpose:
    ranks request fractions and mostly wait on each other. At its end, no engine of the
    session may have left shared memory or temporary files on the node."""
    import ray

    found = engine_shared_memory(), engine_temp_dirs()
    # Metrics reach the node's endpoint every second (Ray: 10 s), for the metrics test.
    ray.init(num_cpus=8, include_dashboard=False, object_store_memory=512 << 20,
             log_to_driver=False, _temp_dir=str(session_dir / "ray"),
             _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()
    left = sorted(engine_shared_memory() - found[0]) + sorted(engine_temp_dirs() - found[1])
    assert not left, f"the session's engines left these behind: {left}"


def engine_temp_dirs() -> set[str]:
    """Engine instances' temporary directories (``actors.node_shm.temp_dir``) now."""
    from actors.node_shm import PREFIX, TMP_DIR

    return {p.name for p in TMP_DIR.glob(f"{PREFIX}*-e*")}


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


class SharedEngines:
    """The session's vLLM engines that tests share (``vllm_tp2``, ``vllm_fp8``,
    ``vllm_drill``), each started at its first user and closed, leaving no trace on the node
    (``closed_without_trace``), after its last. An idle vLLM rank costs about 5% of a core
    here (gloo wakes each of its 14 transport threads every 10 ms) and the suite is bound by
    its 2 cores, so their users run last, together, grouped by engine: the engines never
    idle through the rest of the suite. A user is a test that names the fixture as an
    argument, or one marked ``shares(name)`` (for a fixture it requests by name at run
    time)."""

    ORDER = ("vllm_fp8", "vllm_drill", "vllm_tp2")
    """The order their users run in: the engines with fewer users first, so each closes
    as early as it can."""

    def __init__(self) -> None:
        self.running: dict[str, contextlib.ExitStack] = {}
        self.needed_after: dict[str, set[str]] = {}
        """nodeid -> the engines some later test of the session uses."""

    def declared(self, item: pytest.Item) -> set[str]:
        names = set(getattr(item, "fixturenames", ())) & set(self.ORDER)
        for mark in item.iter_markers("shares"):
            unknown = set(mark.args) - set(self.ORDER)
            if unknown:
                raise pytest.UsageError(f"{item.nodeid}: shares{mark.args} names no shared "
                                        f"engine (known: {self.ORDER})")
            names |= set(mark.args)
        return names

    def ordered(self, items: list[pytest.Item]) -> list[pytest.Item]:
        """Tests on no shared engine first, in pytest's order; then each engine's users."""
        def group(item: pytest.Item) -> int:
            used = self.declared(item)
            return min((self.ORDER.index(n) + 1 for n in used), default=0)

        ordered = sorted(items, key=group)  # stable: pytest's order within each group
        later: set[str] = set()
        for item in reversed(ordered):
            self.needed_after[item.nodeid] = set(later)
            later |= self.declared(item)
        return ordered

    def start(self, name: str, orch):
        stack = contextlib.ExitStack()
        started = stack.enter_context(closed_without_trace(orch))
        self.running[name] = stack
        return started

    def close(self, name: str) -> None:
        stack = self.running.pop(name, None)
        if stack is not None:
            stack.close()

    def close_unneeded(self, item: pytest.Item) -> None:
        needed = self.needed_after.get(item.nodeid, set(self.ORDER))
        for name in [n for n in self.running if n not in needed]:
            self.close(name)


SHARED = SharedEngines()


@pytest.fixture(scope="session")
def vllm_tp2(ray_cluster, llama32):
    """Two float32 TP=2 vLLM engines (``num_engines=2``), first serving llama32['a'].
    vLLM engines are the suite's dearest part (each rank imports vLLM for about 10 s here):
    the tests that leave an engine serving share these (``serving`` brings them to the
    checkpoint they expect; most use engine 0); drills that kill or break ranks start
    engines of their own."""
    yield SHARED.start("vllm_tp2", start(llama32["a"], 2, engine="vllm", num_engines=2))
    SHARED.close("vllm_tp2")


@pytest.fixture(scope="session")
def native_tp2(ray_cluster, llama32):
    """A native float32 TP=2 engine for the session, first serving llama32['a'], for the
    tests that leave it serving (the bad-input table, rollouts in flight); ``serving``
    brings it to the checkpoint a test expects."""
    with start(llama32["a"], 2) as orch:
        yield orch


@pytest.fixture(scope="session")
def vllm_drill(ray_cluster, llama32):
    """A float32 TP=2 vLLM engine for the drills that kill its ranks (each leaves it
    rebuilt and serving, and checks so), apart from the engines other tests share."""
    yield SHARED.start("vllm_drill", start(llama32["a"], 2, engine="vllm"))
    SHARED.close("vllm_drill")


@contextlib.contextmanager
def closed_without_trace(orch):
    """``orch`` started; once it closes, nothing of its engine instances (as they are then)
    may be left on the node: no shared memory, no temporary directory; nor any region of
    its in-memory and trainer sources (``actors.transports.regions``)."""
    from actors import node_shm

    with orch:
        yield orch
        instances = [engine.instance for engine in orch.engines]
        regions = orch.transaction.transports.kept.get("regions")
        instances += [regions.instance] if regions is not None else []
    left = [i for i in instances if i in node_shm.instances()
            or node_shm.temp_dir(i).exists()]
    assert not left, f"closed engine instances left shared memory or files: {left}"


@pytest.fixture(scope="session")
def vllm_fp8(ray_cluster, llama32):
    """One bfloat16 TP=2 vLLM engine with online fp8_per_channel, first serving
    llama32['a'], shared by the tests of that method that leave it serving."""
    yield SHARED.start("vllm_fp8", start(llama32["a"], 2, engine="vllm", dtype="bfloat16",
                                         quantization="fp8_per_channel"))
    SHARED.close("vllm_fp8")


@pytest.fixture(scope="session")
def prompt() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1234))
