"""The floors tp-reload is measured against: the physical minimum of a reload's work on this
machine, with bare torch and safetensors, in processes of their own.

Every floor runs ``RankWork`` (each rank's unavoidable work: narrow each source tensor to its
slice, one copy into model format, one quantization pass, one copy into the kernel tensors)
in one process per rank, the processes spawned once per engine shape and reused:

* ``strict``: each rank alone while the others wait, then the slowest; a rank of a real
  engine never runs alone, so this is information, not a target;
* ``concurrent``: every rank at once, as they run for real (the floor of ``dir`` cases:
  each rank maps the files and copies its windows out of the page cache, one copy; for
  in-memory sources, each from a copy in its own memory, the step between strict and
  transport);
* ``transport``: the floor of ``memory`` and ``trainer`` cases, whose tensors live in
  another process (the sender) than the ranks. On one node the fewest copies a process
  boundary allows are two: the sender writes every byte once into memory it shares with the
  ranks (a region of ``/dev/shm`` whose pages were touched before), then the ranks do the
  concurrent floor's work reading from it in place. Wall time from the sender's first byte
  to the last rank's end.

Processes start together behind a barrier and stamp ``time.monotonic()`` (one clock for the
node), so a floor's wall time is the last end minus the first start. The NaN/Inf check is
off here (it is a feature tp-reload pays for, on in its figures).
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from actors.dtypes import SAFETENSORS_DTYPES, view_in
from actors.transports.files import checkpoint_files, checkpoint_inventory

STAGES = ("load", "quantize")
ALIGN = 64
ANSWER_TIMEOUT_S = 1800.0
MIN_REPEATS = 5
"""Floors are cheap next to the rest of a case (they move no bytes between processes but
the transport floor's write); a few more repetitions make their minimum stable."""
REGION_DIR = Path("/dev/shm")
REGION_PREFIX = "tp-reload-bench-floor-"


@dataclass
class FloorTimes:
    """One floor, repeated: wall seconds and the slowest rank's stages per repetition."""

    seconds: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)

    def add(self, seconds: float, stages: dict[str, float]) -> None:
        self.seconds.append(seconds)
        self.stages.append(stages)


@dataclass(frozen=True)
class Layout:
    """Where each source tensor sits in the shared region: name -> (offset, shape, dtype)."""

    slots: dict[str, tuple[int, tuple[int, ...], torch.dtype]]
    nbytes: int

    @classmethod
    def of(cls, model_dir: Path) -> Layout:
        slots, offset = {}, 0
        for info in checkpoint_inventory(model_dir):
            slots[info.name] = (offset, info.shape, info.torch_dtype)
            offset += -(-info.nbytes // ALIGN) * ALIGN
        return cls(slots, max(offset, ALIGN))

    def views(self, region: mmap.mmap) -> dict[str, torch.Tensor]:
        """Each tensor as a view of the region: no copy."""
        return {name: view_in(region, offset, dtype, shape)
                for name, (offset, shape, dtype) in self.slots.items()}


def mapped_views(model_dir: Path) -> tuple[list[mmap.mmap], dict[str, torch.Tensor]]:
    """Every tensor of the checkpoint as a view of its file mapped read-only: no byte is
    read until a loader copies its slice out (one copy, from the page cache)."""
    maps, views = [], {}
    for file in checkpoint_files(model_dir):
        with open(file, "rb") as f:
            region = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        maps.append(region)
        size = int.from_bytes(region[:8], "little")
        header = json.loads(region[8:8 + size])
        header.pop("__metadata__", None)
        whole = view_in(region, 0, torch.uint8, (len(region),))
        for name, entry in header.items():
            start, end = entry["data_offsets"]
            views[name] = whole[8 + size + start:8 + size + end].view(
                SAFETENSORS_DTYPES[entry["dtype"]]).view(tuple(entry["shape"]))
    return maps, views


def from_files(work: Any, model_dir: Path) -> dict[str, float]:
    """A rank's floor work (``RankWork``) reading the mapped files: its stages, the mapping
    counted in ``load``."""
    begin = time.perf_counter()
    maps, views = mapped_views(model_dir)
    mapped = time.perf_counter() - begin
    try:
        stages = work.run(views.items())
    finally:
        del views
        for region in maps:
            region.close()
    return {**stages, "load": stages["load"] + mapped}


def _in_memory(model_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint in this process's own memory (read untimed)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(model_dir):
        tensors.update(load_file(file))
    return tensors


def _stamped(run: Any) -> tuple[float, float, dict[str, float]]:
    begin = time.monotonic()
    stages = run()
    return begin, time.monotonic(), stages


def _rank_process(conn: Any, barriers: dict[str, Any], written: Any, model_dir: str, tp: int,
                  rank: int, dtype: str, quantization: str | None, region_path: str,
                  layout: Layout) -> None:
    """One rank's floor work, on command ``(kind, together)``: kind is ``dir``, ``memory``
    or ``shared`` (from the region, once the sender says it is written); together names
    the barrier to start behind (``ranks``, ``all`` with the sender) or is None (alone)."""
    from benchmarks.baselines import RankWork

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    path = Path(model_dir)
    work = RankWork(path, tp, rank, getattr(torch, dtype), quantization)
    own = _in_memory(path)
    with open(region_path, "r+b") as f:
        region = mmap.mmap(f.fileno(), layout.nbytes)
    shared = layout.views(region)
    conn.send("ready")

    def from_region() -> dict[str, float]:
        written.wait()
        return work.run(shared.items())

    runs = {"dir": lambda: from_files(work, path), "memory": lambda: work.run(own.items()),
            "shared": from_region}
    while (command := conn.recv()) is not None:
        kind, together = command
        if together:
            barriers[together].wait()
        conn.send(_stamped(runs[kind]))


def _sender_process(conn: Any, barriers: dict[str, Any], written: Any, model_dir: str,
                    region_path: str, layout: Layout) -> None:
    """The process that holds the source tensors: writes every byte once into the region."""
    own = _in_memory(Path(model_dir))
    with open(region_path, "r+b") as f:
        region = mmap.mmap(f.fileno(), layout.nbytes)
    shared = layout.views(region)

    def write() -> dict[str, float]:
        begin = time.perf_counter()
        for name, tensor in own.items():
            shared[name].copy_(tensor)
        seconds = time.perf_counter() - begin
        written.set()
        return {"write": seconds}

    write()  # every page of the region touched once, as a reused region's are
    written.clear()
    conn.send("ready")
    while conn.recv() is not None:
        barriers["all"].wait()
        conn.send(_stamped(write))


class FloorProcesses:
    """``tp`` rank processes and one sender for an engine shape, with the shared region;
    nothing is left in ``/dev/shm`` once they are up (the region is unlinked as soon as
    every process mapped it) or once they stop."""

    def __init__(self, model_dir: Path, tp: int, quantization: str | None,
                 dtype: str = "bfloat16") -> None:
        self.model_dir, self.tp, self.quantization, self.dtype = model_dir, tp, quantization, dtype
        self.procs: list[Any] = []
        self.conns: list[Any] = []

    def __enter__(self) -> FloorProcesses:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        _remove_orphaned_regions()
        layout = Layout.of(self.model_dir)
        region = REGION_DIR / f"{REGION_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        with open(region, "xb") as f:
            f.truncate(layout.nbytes)
        try:
            barriers = {"ranks": ctx.Barrier(self.tp), "all": ctx.Barrier(self.tp + 1)}
            self.written = ctx.Event()
            for rank in range(self.tp):
                self._spawn(ctx, _rank_process, barriers, self.written, str(self.model_dir),
                            self.tp, rank, self.dtype, self.quantization, str(region), layout)
            self._spawn(ctx, _sender_process, barriers, self.written, str(self.model_dir),
                        str(region), layout)
            for index in range(len(self.procs)):
                assert self._answer(index) == "ready"
        except BaseException:
            self.__exit__(None, None, None)
            raise
        finally:
            region.unlink(missing_ok=True)
        return self

    def _spawn(self, ctx: Any, target: Any, *args: Any) -> None:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        proc.start()
        self.procs.append(proc)
        self.conns.append(parent)

    def _answer(self, index: int) -> Any:
        conn, proc = self.conns[index], self.procs[index]
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while not conn.poll(1.0):
            if proc.exitcode is not None:
                raise RuntimeError(f"floor process {index} exited with {proc.exitcode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"floor process {index} did not answer")
        try:
            return conn.recv()
        except EOFError:
            proc.join(timeout=5)
            raise RuntimeError(f"floor process {index} exited with {proc.exitcode}") from None

    def __exit__(self, *exc_info: object) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.exitcode is None:
                proc.kill()
                proc.join()

    def _rank_runs(self, indexes: list[int], kind: str, together: str | None) -> list:
        for index in indexes:
            self.conns[index].send((kind, together))
        return [self._answer(index) for index in indexes]

    def strict(self, kind: str) -> tuple[float, dict[str, float]]:
        """Each rank alone, one after another: the slowest rank's seconds and stages."""
        runs = [self._rank_runs([rank], kind, None)[0] for rank in range(self.tp)]
        begin, end, stages = max(runs, key=lambda r: r[1] - r[0])
        return end - begin, stages

    def concurrent(self, kind: str) -> tuple[float, dict[str, float]]:
        """Every rank at once: the last end minus the first start."""
        runs = self._rank_runs(list(range(self.tp)), kind, "ranks")
        return _wall(runs), max(runs, key=lambda r: r[1] - r[0])[2]

    def transport(self) -> tuple[float, dict[str, float]]:
        """The sender writes the region, then every rank works from it: from the sender's
        first byte to the last rank's end (the sender's own end stamp may come later: on a
        busy node it can wait for a core once it has said the region is written); stages:
        the write and the slowest rank's."""
        self.written.clear()
        sender = len(self.procs) - 1
        for index in range(self.tp):
            self.conns[index].send(("shared", "all"))
        self.conns[sender].send("write")
        runs = [self._answer(index) for index in range(self.tp)]
        wrote = self._answer(sender)
        slowest = max(runs, key=lambda r: r[1] - r[0])[2]
        return max(end for _, end, _ in runs) - wrote[0], {**wrote[2], **slowest}

    def measure(self, kind: str, repeats: int) -> dict[str, FloorTimes]:
        """Every floor of a ``dir`` or an in-memory (``memory``) source: one untimed run
        (first touches), then at least ``MIN_REPEATS`` timed ones; each floor's minimum is
        what a case reports, so a descheduled repetition does not decide it."""
        floors = {"strict": FloorTimes(), "concurrent": FloorTimes()}
        if kind == "memory":
            floors["transport"] = FloorTimes()
            self.transport()
        self.concurrent(kind)
        for _ in range(max(repeats, MIN_REPEATS)):
            floors["strict"].add(*self.strict(kind))
            floors["concurrent"].add(*self.concurrent(kind))
            if kind == "memory":
                floors["transport"].add(*self.transport())
        return floors


def _remove_orphaned_regions() -> None:
    """Regions a killed benchmark created but did not live to unlink (named after its pid)."""
    for region in REGION_DIR.glob(f"{REGION_PREFIX}*"):
        pid = int(region.name[len(REGION_PREFIX):].split("-")[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            region.unlink(missing_ok=True)
        except PermissionError:  # alive, someone else's
            pass


def _wall(runs: list[tuple[float, float, Any]]) -> float:
    return max(end for _, end, _ in runs) - min(begin for begin, _, _ in runs)

