"""Temporary directories a tp-reload process owns on its node, and a local Ray whose session
files live in one: removed when the process closes them, and after it dies (SIGKILL, OOM,
a CI timeout), by the next start of the same kind.

Ownership is a lock, tested as for engine instances (``actors.node_shm.owner_alive``): the
owner holds an exclusive ``flock`` on ``<dir>/.owner`` for as long as it uses the directory,
and the kernel drops it when the process dies, however it dies. A directory with the prefix
whose owner file is unlocked is left over; one without an owner file is being created, or is
not ours, and is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from actors.node_shm import owner_alive

OWNER = ".owner"
# Ray's session directory: tp-reload's demo, benchmarks and examples, when they start Ray.
# Short: Ray's socket paths (at most 107 bytes) live under it.
RAY_PREFIX = "tpr-ray-"
# ray.init options that only a new local cluster takes.
START_UP_OPTIONS = {"num_cpus", "num_gpus", "resources", "object_store_memory",
                    "include_dashboard"}


def sweep_dead(prefix: str, tmp_dir: Path | None = None) -> list[Path]:
    """Remove every ``<tmp>/<prefix>*`` directory whose owner has died; returns them."""
    removed = []
    for path in sorted(Path(tmp_dir or tempfile.gettempdir()).glob(f"{prefix}*")):
        # No owner file: being created, or not a directory of ours.
        if not (path / OWNER).is_file() or owner_alive(path / OWNER):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def owned_temp_dir(prefix: str) -> Iterator[Path]:
    """A fresh ``<tmp>/<prefix>XXXXXXXX`` owned by this process until the block ends, when
    it is removed; what dead owners left with the same prefix is removed first."""
    sweep_dead(prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    fd = os.open(path / OWNER, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


@contextlib.contextmanager
def local_ray(joinable: bool = False, **init_kwargs: Any) -> Iterator[None]:
    """Ray for this block. A Ray already initialized, or a cluster named by ``RAY_ADDRESS``,
    is used as it is and left running; otherwise a local Ray starts with its session files
    (logs, sockets, spilled objects) in a directory this process owns, and both go when
    the block ends (Ray alone would leave them in /tmp/ray). Unless ``joinable`` (other
    processes of the machine connect to it: the service's clients), its authentication
    token is this process's own (``token_of_its_own``)."""
    import ray

    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):  # a running cluster: Ray refuses start-up options
        ray.init(**{k: v for k, v in init_kwargs.items() if k not in START_UP_OPTIONS})
        yield
        return
    with owned_temp_dir(RAY_PREFIX) as path, \
            contextlib.nullcontext() if joinable else token_of_its_own():
        ray.init(_temp_dir=str(path), **init_kwargs)
        try:
            yield
        finally:
            ray.shutdown()


RAY_AUTH_SETTINGS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
"""How a user configures Ray's token authentication (any of them set: theirs to keep)."""


@contextlib.contextmanager
def token_of_its_own() -> Iterator[None]:
    """For a local Ray that lives as long as this block. Ray turns token authentication on
    for a local cluster nobody configured, and writes the new token to ``~/.ray/auth_token``,
    where it outlives the cluster. Unless the user chose (a setting in ``RAY_AUTH_SETTINGS``,
    or that file), the cluster gets a token in this process's environment instead, which
    Ray's processes inherit: authentication stays on, and nothing is written to the home
    directory. The settings are as they were once the block ends. Another process of the
    machine cannot join such a cluster (it has no token): ``local_ray(joinable=True)``."""
    if any(os.environ.get(n) for n in RAY_AUTH_SETTINGS) or (
            Path.home() / ".ray" / "auth_token").exists():
        yield
        return
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # the length Ray's own tokens have
    try:
        yield
    finally:
        for name in RAY_AUTH_SETTINGS:  # none was set before; ray.init sets RAY_AUTH_MODE
            os.environ.pop(name, None)


@contextlib.contextmanager
def inductor_cache_in(path: Path) -> Iterator[None]:
    """torch makes its Inductor cache directory (``<tmp>/torchinductor_<user>``) as soon as
    anything imports ``torch._dynamo``, as transformers' models do: within the block it is
    made under ``path`` instead, unless the user chose one (``TORCHINDUCTOR_CACHE_DIR``)."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
    try:
        yield
    finally:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
