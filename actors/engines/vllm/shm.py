"""vLLM's shared memory on a rank's node, named after the engine instance that owns it
(``actors.node_shm``), so it can be told apart from every other engine's and removed with
its owner.

What a vLLM 0.32 rank creates in ``/dev/shm``:
  * the TP group's broadcast ring (``shm_broadcast.MessageQueue``, made by TP rank 0 when
    TP > 1): a Python ``SharedMemory`` of 6 x (4 MiB + TP) bytes, the 25 MB ``psm_*``
    segment. Python names it at random and vLLM unlinks it only when the object is
    collected, so a killed rank leaves it behind.
  * with the CPU SHM communicator (the AVX-512 build of vLLM's CPU kernels has it; on AVX2
    vLLM falls back to gloo): one segment per rank of each TP group, threads x 4 MiB, named
    ``<VLLM_DIST_IDENT>-<group>-[<ranks>]-cpushm_<rank>``, created with O_EXCL and unlinked
    only by a C++ static destructor at a normal exit. Under ``external_launcher`` the CPU
    worker derives VLLM_DIST_IDENT from the init method ``env://``, so every engine on a
    node gets the same names and the second one fails with errno 17.

``name_segments`` prefixes both with the instance's name in this process.

A vLLM rank also leaves files in the temporary directory: TP rank 0's broadcaster binds two
ZMQ IPC sockets there (``VLLM_RPC_BASE_PATH``, which defaults to it) and never unlinks them
when its process is killed, and Python's multiprocessing makes ``pymp-*`` directories there.
``keep_temp_files`` points the process's temporary directory into the instance's own
(``actors.node_shm.temp_dir``), which goes with the instance.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import tempfile
from typing import Any

import torch

from actors.node_shm import (
    SHM_DIR,
    SharedMemoryUnavailable,
    claim,
    require_space,
    require_unused,
    temp_dir,
)

# vLLM's TP broadcaster: MessageQueue.create_from_process_group(cpu_group, 1 << 22, 6), each
# chunk followed by one written flag and one read flag per reader.
RING_CHUNK_BYTES = 1 << 22
RING_CHUNKS = 6
# PER_THREAD_SHM_BUFFER_BYTES of vLLM's csrc/cpu/shm.cpp.
CPU_SHM_THREAD_BYTES = 4 << 20
SHM_MANAGER_FAILURE = re.compile(r"(create|open|ftruncate|mmap) (?:shm )?in SHMManager failed\. "
                                 r"errno: (\d+)")
# The CPU communicator's group names made in this process (the last one is being created).
group_names: list[str] = []


def name_segments(instance: str) -> None:
    """Every segment this process creates from now on carries ``instance``'s prefix: vLLM's
    CPU communicator segments and Python's ``SharedMemory`` (vLLM's broadcast rings). The
    process hosts one engine rank for its life, so this is set once, before vLLM builds."""
    from multiprocessing import shared_memory

    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    def group_name(communicator: Any) -> str:
        ranks = "-".join(str(rank) for rank in communicator.ranks)
        name = f"/{instance}-{communicator.unique_name}-[{ranks}]-cpushm"
        group_names.append(name)
        return name

    _CPUSHMDistributed.make_group_name = staticmethod(group_name)
    shared_memory._make_filename = lambda: f"/{instance}-psm_{secrets.token_hex(4)}"


def cpu_shm_communicator() -> bool:
    """Whether vLLM's CPU build here has its SHM communicator (AVX-512 kernels)."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, "init_shm_manager")


def bytes_needed(rank: int, world_size: int, device: torch.device) -> tuple[int, str]:
    """What this rank's vLLM creates in /dev/shm, in bytes, and what that is."""
    if world_size == 1:
        return 0, "nothing"
    parts = []
    if rank == 0:
        parts.append((RING_CHUNKS * (RING_CHUNK_BYTES + world_size), "the TP broadcast ring"))
    if device.type == "cpu" and cpu_shm_communicator():
        threads = torch.get_num_threads()
        parts.append((threads * CPU_SHM_THREAD_BYTES,
                      f"the CPU communicator's segment ({threads} thread(s))"))
    return sum(n for n, _ in parts), " and ".join(what for _, what in parts) or "nothing"


def keep_temp_files(instance: str) -> None:
    """Everything this process writes to the temporary directory from now on lands in the
    instance's own (made here; the instance's ranks on a node share it): vLLM's IPC
    sockets, Python's, and torch's, which read the directory when they make a file or when
    their module loads (so before vLLM is imported). The process hosts one engine rank for
    its life."""
    directory = temp_dir(instance)
    directory.mkdir(mode=0o700, exist_ok=True)
    os.environ["TMPDIR"] = os.environ["VLLM_RPC_BASE_PATH"] = str(directory)
    tempfile.tempdir = str(directory)


def prepare(instance: str, rank: int, world_size: int, device: torch.device) -> None:
    """Before vLLM is imported and builds: refuse (one line) a segment name already taken
    (before importing vLLM: seconds per process), record the rank as an owner of
    ``instance``, point what it creates (temporary files, segments) at the instance, and
    refuse a node whose shared memory cannot take this rank."""
    require_unused(instance)
    claim(instance, rank)  # first: whatever it creates from here on goes with the instance
    keep_temp_files(instance)
    nbytes, what = bytes_needed(rank, world_size, device)
    require_space(nbytes, f"vLLM rank {rank} of {instance} ({what})")
    name_segments(instance)


def explain(error: BaseException, rank: int) -> SharedMemoryUnavailable | None:
    """vLLM's own shared-memory failures while building, as one line naming the segment
    and what to do; None for any other error."""
    text = str(error)
    if "Insufficient space in /dev/shm" in text:
        return SharedMemoryUnavailable(text.strip().splitlines()[0])
    match = SHM_MANAGER_FAILURE.search(text)
    if match is None:
        return None
    operation, code = match.group(1), int(match.group(2))
    group = group_names[-1].lstrip("/") if group_names else "?"
    segment = SHM_DIR / (f"{group}_{rank}" if operation != "open" else f"{group}_*")
    advice = {
        errno.EEXIST: "another process holds that name: stop it, or remove the segment if "
                      "nothing uses it",
        errno.ENOSPC: f"free space in {SHM_DIR} or enlarge it",
        errno.ENOMEM: f"free space in {SHM_DIR} or enlarge it",
        errno.ENOENT: "a peer rank failed before creating it: see its error",
    }.get(code, f"check {SHM_DIR}")
    return SharedMemoryUnavailable(f"vLLM could not {operation} shared memory segment "
                                   f"{segment}: {os.strerror(code)}; {advice}")
