"""Running it for real: a Ray head started with `ray start`, the serve entrypoint submitted
with `ray job submit`, a trainer publishing step directories, a client on its own driver,
`ray job stop`; a simulated two-node cluster; the YAML presets; the RLHF example."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from actors.transports.files import checkpoint_inventory
from orchestrator import ConfigError, ReloadOrchestrator, load_engine_config
from tests.support import write_checkpoint

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# A bf16 fp8_per_channel engine against float32 transformers, on random weights.
QUANTIZED_LOGPROB_BOUND = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_temp_dir(path: Path | None, token: Path | None = None) -> dict[str, str]:
    """The environment for a subprocess: with ``token``, Ray's token authentication as the
    README has a user set it (``RAY_AUTH_MODE=token``; the token file named by
    ``RAY_AUTH_TOKEN_PATH`` instead of ~/.ray/auth_token, which the suite leaves alone),
    otherwise auth off; with ``path``, Python's and Ray's temporary files there (a process
    killed at the end leaves them in the session's directory, not in /tmp)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(path)
    return env


def run(*args: str, timeout: float = 120, check: bool = True,
        temp_dir: Path | None = None, token: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                            env=in_temp_dir(temp_dir, token))
    if check and result.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def last_json(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


class Background:
    """Scenarios that run as processes of their own, each with a Ray of its own, started
    together when this module begins: they spend much of their time waiting on Ray's start
    and on their own rank processes, so they run beside the foreground tests (the
    `ray job` one) instead of after them. Each test collects its scenario's result."""

    def __init__(self, root: Path) -> None:
        from actors import node_shm

        self.root = root
        self.shm_before = set(node_shm.instances())
        """Engine instances in /dev/shm before any scenario started."""
        self.running: dict[str, subprocess.Popen] = {}
        self.temp_dirs: dict[str, Path] = {}
        self.homes: dict[str, Path] = {}
        """The home directory of a scenario that has one of its own."""

    def start(self, name: str, args: list[str], temp_dir: Path,
              env: dict[str, str] | None = None) -> None:
        """``env``: variables set for this scenario (an empty value unsets one)."""
        self.temp_dirs[name] = temp_dir
        out = self.root / name
        out.mkdir(parents=True)
        environ = {**in_temp_dir(temp_dir), **(env or {})}
        # Files, not pipes: Ray's logs would fill a pipe nobody reads until the end.
        with open(out / "stdout", "w") as stdout, open(out / "stderr", "w") as stderr:
            self.running[name] = subprocess.Popen(
                args, stdout=stdout, stderr=stderr, start_new_session=True, cwd=REPO,
                env={k: v for k, v in environ.items()
                     if k not in ("RAY_ADDRESS", "TORCHINDUCTOR_CACHE_DIR") and v})

    def result(self, name: str, timeout: float = 400) -> subprocess.CompletedProcess:
        process = self.running[name]
        process.wait(timeout=timeout)
        out = self.root / name
        done = subprocess.CompletedProcess(process.args, process.returncode,
                                           (out / "stdout").read_text(),
                                           (out / "stderr").read_text())
        if done.returncode:
            raise AssertionError(f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}"
                                 f"\n{done.stderr[-3000:]}")
        return done

    def stop(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


LIBRARY_RUN = """
import os, sys, ray
from orchestrator import EngineConfig, ReloadOrchestrator
config = EngineConfig(model=sys.argv[1], tensor_parallel_size=2, num_cpus_per_rank=0.5)
with ReloadOrchestrator(config) as orch:
    print("version", orch.reload(sys.argv[1]).version, "ray", ray.is_initialized())
    print("auth", os.environ.get("RAY_AUTH_MODE"))
print("ray after shutdown", ray.is_initialized())
print("auth after shutdown", [k for k in os.environ if k.startswith("RAY_AUTH")])
"""
"""A user's script: an orchestrator in a process where nothing initialized Ray, with Ray's
authentication left as Ray has it unconfigured (token authentication on)."""


@pytest.fixture(scope="module", autouse=True)
def background(request, session_dir, tmp_path_factory):
    """The module's scenarios that the session selected, started at once."""
    from orchestrator.scratch import owned_temp_dir

    selected = {item.name for item in request.session.items}
    runs = Background(tmp_path_factory.mktemp("background"))
    with contextlib.ExitStack() as stack:
        if "test_two_vllm_engines_spread_over_two_simulated_nodes" in selected:
            work = tmp_path_factory.mktemp("multinode")
            runs.start("multinode", [sys.executable, "-m", "tests.multinode_scenario", str(work),
                                     str(REPO / "configs" / "multi_node.yaml")],
                       session_dir / "mn")  # short: Ray's socket paths live under it
        if "test_a_library_orchestrator_stops_the_ray_it_started" in selected:
            model = write_checkpoint(tmp_path_factory.mktemp("library") / "ckpt", "llama",
                                     seed=5)
            runs.homes["library"] = tmp_path_factory.mktemp("library-home")
            runs.start("library", [sys.executable, "-c", LIBRARY_RUN, str(model)],
                       stack.enter_context(owned_temp_dir("tpr-t-")),
                       env={"RAY_AUTH_MODE": "", "HOME": str(runs.homes["library"])})
        if "test_demo_starts_a_ray_of_its_own_and_leaves_nothing_behind" in selected:
            # A directory of its own (short, for Ray's sockets) to see what the demo leaves.
            runs.start("demo", [sys.executable, "-m", "orchestrator.cli", "demo", "--json",
                                "--layers", "2"],
                       stack.enter_context(owned_temp_dir("tpr-t-")))
        stack.callback(runs.stop)
        yield runs


def ask_job_server(jobs: str, token: Path, path: str) -> dict | list:
    """The job server's JSON answer at ``path`` (what `ray job list`, `status` and `logs`
    ask), over HTTP with the head's token: the CLI would cost a Python start with Ray's
    imports per question."""
    request = urllib.request.Request(f"{jobs}{path}",
                                     headers={"authorization": f"Bearer {token.read_text()}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def job_server_answers(jobs: str, token: Path) -> bool:
    """Whether the job server lists jobs yet."""
    try:
        ask_job_server(jobs, token, "/api/jobs/")
    except OSError:  # refused, reset, or an error status (HTTPError is an OSError)
        return False
    return True


@pytest.fixture(scope="module")
def ray_head(session_dir):
    """A head node of its own on loopback (`ray start --head --block`, stopped by
    terminating that process: `ray stop` would also stop the session's Ray), with Ray's
    token authentication on, as `ray start --head` has it by default. Its files, its token
    and its processes' temporary files stay in the session's directory."""
    port, dashboard = free_port(), free_port()
    token = session_dir / "head-token"
    token.write_text(secrets.token_hex(32))
    # Every port of its own: the session's Ray already holds the default agent ports.
    ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port", "node-manager-port",
        "object-manager-port")]
    temp_dir = session_dir / "head"  # short: Ray's socket paths live under it
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--num-cpus=4", f"--temp-dir={temp_dir}", "--include-dashboard=true",
         "--disable-usage-stats", *ports],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=in_temp_dir(temp_dir / "tmp", token))
    jobs = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while not job_server_answers(jobs, token):
        assert head.poll() is None, "ray start --head exited"
        assert time.monotonic() < deadline, "the job server did not come up"
        time.sleep(0.5)
    yield {"gcs": f"127.0.0.1:{port}", "jobs": jobs, "token": token}
    # SIGTERM lets `ray start --block` stop its processes, but some take ~30 s to go:
    # after a grace period the whole process group (all of this head's processes) is killed.
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.vllm
def test_ray_job_serves_vllm_and_watches_a_trainer(ray_head, tmp_path):
    """The README's lines: `ray job submit ... tp-reload serve --config configs/vllm_tp2.yaml
    --watch DIR` on a `ray start --head` cluster, with RAY_AUTH_MODE=token for the CLI and
    for the driver that calls `connect`. Watched steps reload; rollouts are served with the
    new API on the new weights; `ray job stop` leaves no actor alive and nothing of the
    engines in /dev/shm."""
    from actors import node_shm

    initial = write_checkpoint(tmp_path / "initial", "llama", seed=71, head_dim=32)
    watch = tmp_path / "trainer"
    watch.mkdir()
    name, namespace = "svc-under-test", "tp-reload-test"
    config = tmp_path / "service.yaml"  # the preset as shipped, polling faster
    config.write_text((REPO / "configs" / "vllm_tp2.yaml").read_text() + "  poll_s: 0.5\n")
    job = f"tp-reload-test-{uuid.uuid4().hex[:6]}"
    ray, token = str(BIN / "ray"), ray_head["token"]
    submit = [ray, "job", "submit", "--address", ray_head["jobs"], "--no-wait",
              "--submission-id", job, "--", str(BIN / "tp-reload"), "serve", "--config",
              str(config), "--model", str(initial), "--watch", str(watch), "--name", name,
              "--namespace", namespace]
    shm_before = set(node_shm.instances())
    deadline = time.monotonic() + 180
    # The job server answers before its agent accepts jobs ("No available agent").
    while (submitted := run(*submit, check=False, token=token)).returncode:
        assert "No available agent" in submitted.stderr + submitted.stdout, submitted.stderr
        assert time.monotonic() < deadline, "the job agent never became available"
        time.sleep(2)
    try:
        scenario = run(sys.executable, "-m", "tests.service_scenario", ray_head["gcs"], name,
                       namespace, str(watch), "3", timeout=400, token=token)
    finally:
        stop = run(ray, "job", "stop", "--address", ray_head["jobs"], job, check=False,
                   timeout=120, token=token)
    result = last_json(scenario.stdout)
    versions = result["versions"]
    assert versions["start"] == 0 and versions["after_step_1"] == 1
    assert versions["step_2_unmarked"] == 1, "an unmarked checkpoint was loaded"
    assert versions["after_step_2"] == 2
    # bfloat16 weights re-quantized to FP8 per channel against float32 transformers: the
    # greedy tokens' log-probs stay close (vLLM's own loader is the exact oracle for the
    # quantized engine, in test_vllm.py).
    assert result["errors"]["step_1"] <= QUANTIZED_LOGPROB_BOUND
    assert result["errors"]["step_2"] <= QUANTIZED_LOGPROB_BOUND
    assert result["status"]["last_step"] == "step_2"
    assert result["status"]["engine"] == "vllm"
    assert result["status"]["quantization"] == "fp8_per_channel"
    assert result["generated_shape"] == [2, 4]
    assert result["rollout"] == {"versions": [2], "completions": 4, "seeded_repeats": True}

    assert stop.returncode == 0, stop.stderr
    status = ask_job_server(ray_head["jobs"], token, f"/api/jobs/{job}")
    assert status["status"] == "STOPPED", status
    logs = ask_job_server(ray_head["jobs"], token, f"/api/jobs/{job}/logs")["logs"]
    for line in ("serving", "step_1 -> version 1", "step_2 -> version 2", "stop requested",
                 "stopped"):
        assert line in logs, f"job log lacks '{line}':\n{logs[-3000:]}"
    alive = run(ray, "list", "actors", "--address", ray_head["gcs"], "--filter",
                "state=ALIVE", "--format", "json", token=token).stdout
    # The state CLI prints a sentence instead of JSON when nothing matches.
    actors = [] if alive.startswith("No resource") else json.loads(alive)
    assert not [a for a in actors if a.get("ray_namespace") == namespace], alive
    left = {i: names for i, names in node_shm.instances().items()
            if i not in shm_before and not node_shm.live_owners(i, names)}
    assert not left, f"the stopped job's engines left shared memory: {left}"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.vllm
def test_two_vllm_engines_spread_over_two_simulated_nodes(background):
    """``tests/multinode_scenario.py``: directory, in-memory (the object store) and trainer
    (a process group) reloads across nodes are correct on both engines (greedy tokens equal
    transformers', log-probs within 1e-4), and one ``sample`` call is served by both."""
    result = last_json(background.result("multinode").stdout)
    engine_nodes = result["engine_nodes"]
    assert result["engine"] == "vllm"
    assert result["strategy"] == ["STRICT_PACK", "SPREAD"]
    assert all(len(set(ranks)) == 1 for ranks in engine_nodes), "an engine spans nodes"
    assert sorted(ranks[0] for ranks in engine_nodes) == result["worker_nodes"], \
        "engines should sit on the two worker nodes, one each"
    assert result["versions"] == [1, 2, 3]
    assert result["trainer_bytes_sent"] > 0
    # Engines on other nodes than the driver: no shared memory between them.
    assert result["transports"] == ["files", "object_store", "trainer_stream"]
    for stage, errors in result["errors"].items():
        assert len(errors) == 2 and max(errors) <= 1e-4, (stage, errors)
    assert result["sample_engines"] == [0] * 4 + [1] * 4
    assert result["sample_prompts"] == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.ray
@pytest.mark.slow
def test_a_library_orchestrator_stops_the_ray_it_started(background):
    """An orchestrator in a script that never initialized Ray starts a local Ray, reloads on
    it, and at shutdown stops it: nothing is left in the temporary directory (Ray's session
    files, which Ray alone leaves in <tmp>/ray, nor the multiprocessing directories its
    dashboard's helpers leave there when Ray stops them). Ray's token authentication is on,
    as Ray has it when nobody configured it, and its token is not left in the home
    directory (Ray alone writes it to ~/.ray/auth_token) nor in the script's environment."""
    done = background.result("library")
    left = sorted(p.name for p in background.temp_dirs["library"].iterdir())
    assert "version 1 ray True" in done.stdout and "ray after shutdown False" in done.stdout
    assert left == [".owner"], f"the script left {left} in its temporary directory"
    assert "auth token" in done.stdout and "auth after shutdown []" in done.stdout, done.stdout
    home = background.homes["library"]
    assert not (home / ".ray").exists(), sorted(p.name for p in home.rglob("*"))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.vllm
def test_demo_starts_a_ray_of_its_own_and_leaves_nothing_behind(background):
    """`tp-reload demo` as `make demo` runs it (the vLLM engine), in a process of its own:
    it passes, it starts a local Ray, and when it ends nothing of the run is left in the
    temporary directory (Ray's session files, which Ray alone would leave in <tmp>/ray; the
    demo's checkpoints; vLLM's sockets; torch's Inductor cache directory) nor in /dev/shm
    (vLLM's segments go with its engines, so a rerun starts clean)."""
    from actors import node_shm
    from tests.test_reporting import assert_demo_passed

    done = background.result("demo")
    left = sorted(p.name for p in background.temp_dirs["demo"].iterdir())
    assert_demo_passed(json.loads(done.stdout), "vllm")
    assert left == [".owner"], f"the demo left {left} in its temporary directory"
    dead = {i: names for i, names in node_shm.instances().items()
            if i not in background.shm_before and not node_shm.live_owners(i, names)}
    assert not dead, f"engines closed before now left shared memory: {dead}"


@pytest.fixture(scope="module")
def eight_head_checkpoint(tmp_path_factory) -> Path:
    """Fits every preset, the TP=8 multi-node one included."""
    return write_checkpoint(tmp_path_factory.mktemp("presets") / "ckpt", "llama", seed=3,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=32)


@pytest.mark.parametrize("preset", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_preset_loads_with_no_checkpoint_present(preset):
    """A config is a value: loading one reads no checkpoint (multi_node.yaml names a path
    that exists only on the cluster)."""
    from orchestrator.yaml_config import load_file_config

    config = load_file_config(preset)
    assert not Path(config.engine.model).exists(), "the preset's model must be absent here"
    assert config.service.name
    orch = ReloadOrchestrator.from_yaml(str(preset))
    assert orch.config == config.engine and orch.engines == []


@pytest.mark.parametrize("preset", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_preset_plans_its_checkpoint(preset, eight_head_checkpoint):
    """With a checkpoint that fits every preset: the native engine's plan reads it (no Ray);
    the vLLM engine's plan needs its ranks and says so."""
    orch = ReloadOrchestrator.from_yaml(str(preset), model=str(eight_head_checkpoint))
    if orch.config.engine == "native":
        plan = orch.plan(str(eight_head_checkpoint))
        listed = {t.name for t in checkpoint_inventory(eight_head_checkpoint)}
        assert orch.router.on_driver and {t.name for t in plan.tensors} == listed
    else:
        with pytest.raises(RuntimeError, match="plans on its ranks: start"):
            orch.plan(str(eight_head_checkpoint))


@pytest.mark.parametrize(("text", "message"), [
    ("engine:\n  model: M\n  tensor_paralel_size: 2\n",
     "unknown key 'tensor_paralel_size'; did you mean 'tensor_parallel_size'?"),
    ("engine:\n  model: M\nservise:\n  name: x\n",
     "unknown key 'servise'; did you mean 'service'?"),
    ("engine:\n  model: M\nservice:\n  pol_s: 2\n", "did you mean 'poll_s'?"),
    ("engine:\n  model: M\n  tensor_parallel_size: two\n",
     "EngineConfig.tensor_parallel_size must be int, got 'two'"),
    ("engine:\n  model: M\n  check_finite: 1\n", "EngineConfig.check_finite must be bool"),
    ("engine:\n  model: M\nservice:\n  poll_s: fast\n", "ServiceConfig.poll_s must be a number"),
    ("engine:\n  model: !!python/object/apply:os.system ['touch /tmp/pwned']\n",
     "not a plain YAML config"),
    ("service:\n  name: x\n", "the 'engine' section is missing"),
    ("engine:\n  tensor_parallel_size: 2\n", "lacks required key(s) ['model']"),
    ("- engine\n", "expected a mapping"),
])
def test_bad_configs_are_refused_by_name(tmp_path, eight_head_checkpoint, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("model: M", f"model: {eight_head_checkpoint}"))
    with pytest.raises(ConfigError) as info:
        load_engine_config(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.ray
@pytest.mark.slow
def test_rlhf_example_runs_short(ray_cluster, capsys):
    """Checkpoint directories and an FP8 engine (the trainer stream in a loop is the GRPO
    example's, tests/test_grpo.py)."""
    from examples.rlhf_loop import main

    assert main(["--short", "--mode", "dir", "--quantization", "fp8"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[4]) for r in rows] == [1, 2], out  # versions advance once per step
    assert "OK: the engine serves what the trainer trained" in out


def test_the_client_and_the_service_serve_the_whole_serving_api():
    """No Ray: ServiceClient and the service actor implement every ServingAPI call (their
    forwarding methods are generated from it), with the interface's own signatures."""
    import inspect

    from orchestrator.service import Service, ServiceClient
    from orchestrator.serving import SERVING_CALLS, ServingAPI

    assert set(SERVING_CALLS) | {"version"} == ServingAPI.__abstractmethods__
    assert not Service.__abstractmethods__ and not ServiceClient.__abstractmethods__
    client = ServiceClient(handle=None)
    for name in SERVING_CALLS:
        expected = inspect.signature(getattr(ServingAPI, name))
        assert inspect.signature(getattr(ServiceClient, name)) == expected
        if name != "reload":  # the service's reload also takes the watched step's name
            assert inspect.signature(getattr(Service, name)) == expected
    assert callable(client.sample)
