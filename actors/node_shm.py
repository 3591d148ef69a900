"""Shared memory and temporary files that rank processes create on their node, owned by the
engine instance that created them and removed with it: by a clean close, and after a
SIGKILL, an OOM kill or a driver that died, by the next start on the node.

An engine *instance* is one formation of an engine's process group. The driver names it
afresh every time the engine's ranks form their group (``new_instance``: the first start and
every rebuild), so two live engines never share a name and a rebuilt engine never reuses a
dead one's. Everything a rank of the instance creates in ``/dev/shm`` carries the name as
its prefix (the engine sees to that: ``actors/engines/vllm/shm.py``), and before it creates anything
each rank records itself beside it, in ``<instance>-owner-r<rank>``, and holds an exclusive
``flock`` on that record for the rest of its life. The kernel drops the lock when the
process dies, however it dies, so "is this owner alive?" is "is its record locked?": no pid
to be reused, and it holds across pid namespaces (containers that share ``/dev/shm``).

An instance also owns one directory in the node's temporary directory, ``<tmp>/<instance>``
(``temp_dir``): a rank points what its engine writes to temporary files there (vLLM's ZMQ
sockets, Python's multiprocessing directories), so it goes with the instance as well.

  * ``release``: a closing rank drops its lock; once no record of the instance is locked,
    every entry of the instance is removed, its temporary directory first (the last owner
    out does it).
  * ``sweep``: removes every instance none of whose records is locked. An instance that has
    no record at all was not created by a claim of ours and is left alone, as is every
    name without the prefix: nothing tp-reload did not create is ever touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
# Read once, when the module loads: a rank later points its own process's temporary files
# into its instance's directory (``temp_dir``), and must still find its peers' from there.
TMP_DIR = Path(tempfile.gettempdir())
PREFIX = "tp-reload-"
ENTRY = re.compile(rf"^({PREFIX}[0-9a-f]{{8}}-e\d+)-(.+)$")
OWNER = re.compile(r"^owner-r\d+$")
MIB = 1 << 20
# A record's lock is also taken for an instant by whoever checks it: a check that meets
# another check's lock tries again before it calls the owner alive.
PROBES = 4
PROBE_PAUSE_S = 0.005
# This process's records, by instance: open and locked until ``release`` (or death).
_held: dict[str, int] = {}


class SharedMemoryUnavailable(RuntimeError):  # noqa: N818 - reads as the condition it names
    """The node's shared memory cannot take what an engine needs: the one-line message
    names the segment or the space and what to do."""


def new_instance(engine: int) -> str:
    """A fresh name for one formation of engine ``engine``'s process group."""
    return f"{PREFIX}{secrets.token_hex(4)}-e{engine}"


def instances(shm_dir: Path = SHM_DIR) -> dict[str, list[str]]:
    """instance -> the names of its entries in ``shm_dir``."""
    found: dict[str, list[str]] = {}
    try:
        names = os.listdir(shm_dir)
    except OSError:  # no /dev/shm (not Linux): nothing was created there either
        return found
    for name in names:
        match = ENTRY.match(name)
        if match:
            found.setdefault(match.group(1), []).append(name)
    return found


def _is_record(instance: str, name: str) -> bool:
    return OWNER.match(name[len(instance) + 1:]) is not None


def claim(instance: str, rank: int, shm_dir: Path = SHM_DIR) -> None:
    """Record this process as an owner of ``instance`` on this node, before it creates any
    segment of the instance. The record is made nameless, locked, then linked under its
    name: nobody ever sees it unlocked while this process lives."""
    if not shm_dir.is_dir():  # not Linux: no /dev/shm to keep clean
        return
    record = shm_dir / f"{instance}-owner-r{rank}"
    fd = -1
    try:
        fd = os.open(shm_dir, os.O_TMPFILE | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"pid": os.getpid()}).encode())
        _link(fd, record)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        raise SharedMemoryUnavailable(f"cannot create {record} ({exc.strerror}): free space "
                                      f"in {shm_dir} or make it writable") from exc
    _held[instance] = fd


def _link(fd: int, path: Path) -> None:
    """Give the nameless file ``fd`` the name ``path`` (linkat through /proc/self/fd with
    AT_SYMLINK_FOLLOW, which os.link asks for only when given a directory descriptor)."""
    fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(str(fd), path, src_dir_fd=fds, follow_symlinks=True)
    finally:
        os.close(fds)


def owner_alive(record: Path) -> bool:
    """Whether the owner of ``record`` (a file it holds an exclusive ``flock`` on for its
    life) still lives: the record is locked. A missing record has no owner."""
    try:
        fd = os.open(record, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        for _ in range(PROBES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(PROBE_PAUSE_S)
                continue
            return False  # closing the descriptor below lets go of the probe's lock
        return True
    finally:
        os.close(fd)


def live_owners(instance: str, names: list[str], shm_dir: Path = SHM_DIR) -> int:
    """How many owner records among ``names`` (entries of ``instance``) are held."""
    return sum(owner_alive(shm_dir / n) for n in names if _is_record(instance, n))


def temp_dir(instance: str, tmp_dir: Path = TMP_DIR) -> Path:
    """The instance's directory for temporary files on this node (created by the caller)."""
    return tmp_dir / instance


def _remove(instance: str, names: list[str], shm_dir: Path) -> list[tuple[str, int]]:
    """Remove the instance's temporary directory, then unlink ``names``, segments first and
    records last (whatever an interruption leaves is still recorded, so a later sweep
    finishes it); returns (path, bytes) of what this call removed, records excepted."""
    removed = _remove_tree(temp_dir(instance))
    for name in sorted(names, key=lambda n: (_is_record(instance, n), n)):
        path = shm_dir / name
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # a peer of the instance removed it first
            continue
        if not _is_record(instance, name):
            removed.append((str(path), size))
    return removed


def _remove_tree(path: Path) -> list[tuple[str, int]]:
    """Remove the directory ``path`` if it exists: [(path, bytes of its files)] or []."""
    if not path.is_dir():
        return []
    size = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a peer of the instance removes it meanwhile
                size += os.lstat(os.path.join(root, name)).st_size
    shutil.rmtree(path, ignore_errors=True)
    return [(str(path), size)]


def release(instance: str, log: logging.LoggerAdapter | logging.Logger,
            shm_dir: Path = SHM_DIR) -> list[tuple[str, int]]:
    """This process closes: it lets go of its record of ``instance``, and removes the
    instance's entries if no owner on this node holds one any more. Nothing if this
    process never claimed the instance here."""
    fd = _held.pop(instance, None)
    if fd is None:
        return []
    os.close(fd)
    names = instances(shm_dir).get(instance, [])
    if live_owners(instance, names, shm_dir):
        return []
    removed = _remove(instance, names, shm_dir)
    if removed:
        log.info("closed engine instance %s: removed %s", instance, describe(removed))
    return removed


def await_owners(instance: str, timeout_s: float, shm_dir: Path = SHM_DIR) -> bool:
    """Wait until no owner of ``instance`` on this node is alive (its processes were killed
    and may still be exiting); False if one still is after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while live_owners(instance, instances(shm_dir).get(instance, []), shm_dir):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def sweep(log: logging.LoggerAdapter | logging.Logger, shm_dir: Path = SHM_DIR
          ) -> list[tuple[str, int]]:
    """Remove every recorded instance on this node whose owners are all gone; returns what
    it removed (path, bytes) and logs it."""
    removed = []
    for instance, names in sorted(instances(shm_dir).items()):
        records = [n for n in names if _is_record(instance, n)]
        if not records or live_owners(instance, records, shm_dir):
            continue
        gone = _remove(instance, names, shm_dir)
        if gone:
            log.warning("removed what dead engine instance %s left: %s", instance,
                        describe(gone))
        removed += gone
    return removed


def describe(removed: list[tuple[str, int]]) -> str:
    """'<path> (<MiB>), ...' for a log line."""
    return ", ".join(f"{path} ({size / MIB:.1f} MiB)" for path, size in removed)


def holders(path: Path) -> list[int]:
    """Pids of the processes this one can see that map ``path`` or hold it open."""
    found = []
    target = str(path)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if target in (proc / "maps").read_text() or any(
                    os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def require_unused(instance: str, shm_dir: Path = SHM_DIR) -> None:
    """Before the instance creates anything: no segment may carry its name yet (its owner
    records excepted). SharedMemoryUnavailable names the first one and who holds it."""
    taken = sorted(n for n in instances(shm_dir).get(instance, [])
                   if not _is_record(instance, n))
    if not taken:
        return
    path = shm_dir / taken[0]
    pids = holders(path)
    held = (f"is held by pid {pids[0]} ({_command(pids[0])[:80]})" if pids
            else "is held by no process")
    raise SharedMemoryUnavailable(
        f"shared memory segment {path} already exists and {held}: engine instance {instance} "
        f"cannot create its segments; stop that process, or remove the segment if nothing "
        f"uses it (rm '{path}')")


def require_space(nbytes: int, what: str, shm_dir: Path = SHM_DIR) -> None:
    """SharedMemoryUnavailable when ``shm_dir`` has less than ``nbytes`` free."""
    if not shm_dir.is_dir():
        return
    free = shutil.disk_usage(shm_dir).free
    if free < nbytes:
        raise SharedMemoryUnavailable(
            f"{shm_dir} has {free / MIB:.1f} MiB free, {what} needs {nbytes / MIB:.1f} MiB: "
            f"free space in {shm_dir} or enlarge it (in a container: --shm-size=1g or "
            "--ipc=host)")
