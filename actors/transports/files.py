"""Checkpoint directories every rank can read (a shared filesystem, or one node).

Driver: the directory is listed from its safetensors headers (and index), without reading
tensor data and without ever unpickling anything; each bucket is sent as names, files and
shapes, never data. Rank: each opens the files itself, and its loaders read just the rank's
windows (``actors.checkpoint``). The commit log replays from the files, which must stay
unchanged until superseded (their size and mtime are checked).
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from actors.checkpoint import CheckpointSlice
from actors.dtypes import SAFETENSORS_DTYPES, dtype_name, itemsize, view_in
from actors.lazy import TensorEntry
from actors.transports.base import (
    BucketMessage,
    BucketReader,
    BucketTransport,
    Delivery,
    DeliveryContext,
    Fingerprint,
    Items,
    ReleasedInBackground,
    Source,
    TensorInfo,
)
from orchestrator.errors import CheckpointError
from orchestrator.plan import Bucket, Plan, PlannedTensor

INDEX_FILE = "model.safetensors.index.json"
# A safetensors header is JSON metadata; anything this large is a corrupt length field.
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True, slots=True)
class FileEntry(TensorEntry):
    file: str
    """Absolute path of the safetensors file holding it."""


def file_entry(info: TensorInfo) -> FileEntry:
    """What a rank needs to read this tensor from its file."""
    assert info.file is not None, f"'{info.name}' is not in a file"
    return FileEntry(info.name, dtype_name(info.torch_dtype), info.shape, info.file)


@dataclass(frozen=True, slots=True)
class FileBucket(BucketMessage):
    entries: tuple[FileEntry, ...]
    """In stream order."""

    def read(self, reader: BucketReader) -> Items:
        handles = reader.state.setdefault("files", ReleasedInBackground())
        return [(e.name, _slice(reader, handles, e.name, e.file)) for e in self.entries]


def _slice(reader: BucketReader, handles: dict[str, Any], name: str, path: str
           ) -> CheckpointSlice:
    if path not in handles:
        if not os.path.isfile(path):
            # The driver listed the file; this rank may run on another node.
            raise FileNotFoundError(
                f"checkpoint file {path} is not readable on node {socket.gethostname()}: "
                "checkpoint directories must be at the same path on every node (a shared "
                "filesystem), or pass the weights in memory")
        handles[path] = mapped_tensors(Path(path))
    tensor = handles[path].get(name)
    if tensor is None:
        raise CheckpointError(f"{path}: no tensor '{name}' (the file changed since it was "
                              "listed?)")
    return CheckpointSlice(tensor, path, name)


def mapped_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file as a view of the file mapped read-only: no byte
    is read until a loader copies its window out (one copy, from the page cache). The
    mapping lives as long as a view of it (a window a rank still buffers)."""
    infos = read_safetensors_header(path)
    with path.open("rb") as f:
        region = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    if infos and len(region) < max(i.offset + i.nbytes for i in infos):
        raise CheckpointError(f"{path}: truncated while it was being read")
    whole = view_in(region, 0, torch.uint8, (len(region),))  # one view of the mapping
    return {i.name: _view(whole, i) for i in infos}


def _view(whole: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """Tensor ``info`` as a view of its file's bytes ``whole`` (no copy)."""
    dtype = info.torch_dtype
    raw = whole.narrow(0, info.offset, info.nbytes)
    if info.offset % dtype.itemsize:  # safetensors does not align data: read this one out
        return raw.clone().view(dtype).reshape(info.shape)
    return raw.view(dtype).view(info.shape)


class FilesTransport(BucketTransport):
    name = "files"
    one_call = True
    message_bytes: ClassVar[int] = 1 << 30
    """A file message names its tensors, it does not carry them: nothing is held per message,
    and a rank buffers by layer whatever the message. So consecutive buckets share one
    message up to this many source bytes (a larger bucket goes alone): each message costs
    about 2 ms of Ray calls and rank work here whatever it names (1.75 ms native, 2.1 ms
    vLLM), and the progress line still moves every GiB."""

    def accepts(self, source: Any) -> bool:
        return isinstance(source, (str, Path))

    def open(self, source: Any, timeout_s: float) -> Source:
        infos = tuple(checkpoint_inventory(source))
        return Source(self, infos, str(source), handle={t.name: t for t in infos})

    def send(self, source: Source, bucket: Bucket) -> FileBucket:
        return FileBucket(tuple(file_entry(source.handle[t.name]) for t in bucket.tensors))

    def deliver(self, source: Source, plan: Plan, context: DeliveryContext) -> Delivery:
        buckets = list(joined(plan.buckets, self.message_bytes))
        messages = tuple(self.send(source, bucket) for bucket in buckets)
        # Steps too (made only if taken), for a caller that sends a call per message.
        steps = ((context.fleet.load_bucket(m), b.nbytes)
                 for m, b in zip(messages, buckets, strict=True))
        return Delivery(steps, list(messages), messages=messages)

    def fingerprints(self, source: Source) -> dict[str, Fingerprint]:
        files = sorted({t.file for t in source.tensors if t.file is not None})
        return {f: (os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files}


def joined(buckets: Iterable[Bucket], limit: int) -> Iterator[Bucket]:
    """Consecutive buckets joined up to ``limit`` source bytes, in order."""
    run: list[PlannedTensor] = []
    run_bytes = 0
    for bucket in buckets:
        if run and run_bytes + bucket.nbytes > limit:
            yield Bucket(tuple(run))
            run, run_bytes = [], 0
        run.extend(bucket.tensors)
        run_bytes += bucket.nbytes
    if run:
        yield Bucket(tuple(run))


# ---- listing a checkpoint directory ------------------------------------------------------

def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Parse one file's header; CheckpointError names the file on any inconsistency."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: corrupt safetensors header length {header_len}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    entries = sorted(((n, e) for n, e in header.items() if n != "__metadata__"),
                     key=lambda item: _data_start(path, *item))
    # Physical order: the order a sequential reader of this file meets the tensors. One
    # string for the file's path: a message pickles it once, not once per tensor.
    file = str(path)
    return [_tensor_info(path, file, name, entry, 8 + header_len, data_size)
            for name, entry in entries]


def _data_start(path: Path, name: str, entry: Any) -> int:
    try:
        return int(entry["data_offsets"][0])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry") from exc


def _tensor_info(path: Path, file: str, name: str, entry: dict, data_offset: int,
                 data_size: int) -> TensorInfo:
    try:
        dtype, shape, (start, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry") from exc
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
    numel = 1
    for dim in shape:
        numel *= dim
    if stop - start != numel * itemsize(dtype) or stop > data_size:
        raise CheckpointError(
            f"{path}: tensor '{name}' data [{start}, {stop}) does not fit its shape {shape} "
            f"or the file's {data_size} data bytes (truncated?)"
        )
    return TensorInfo(name, shape, dtype, stop - start, file, data_offset + start)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint dir, via the index when there is one. Index
    entries must stay inside the directory; pickle checkpoints are refused, never read."""
    root = Path(model_dir).resolve()
    if not root.is_dir():
        raise CheckpointError(f"{model_dir}: checkpoint directory not found")
    index = root / INDEX_FILE
    if index.is_file():
        return _files_from_index(root, index)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in {".bin", ".pt", ".pth"})
        hint = f" (found pickle files {pickles}, which are never loaded)" if pickles else ""
        raise CheckpointError(f"{root}: no *.safetensors files{hint}; convert to safetensors")
    return files


def _files_from_index(root: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: malformed index, expected a 'weight_map' object") from exc
    # Each distinct entry is checked once: an index names a few files for many tensors.
    files: dict[str, Path] = {}
    for name, rel in weight_map.items():
        if rel not in files:
            files[rel] = _indexed_file(root, index, name, rel)
    return list(dict.fromkeys(files.values()))


def _indexed_file(root: Path, index: Path, name: str, rel: str) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise CheckpointError(
            f"{index}: tensor '{name}' points outside the checkpoint dir: {rel}")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{index}: tensor '{name}' is in {rel}; only safetensors are loaded")
    if not path.is_file():
        raise CheckpointError(f"{index}: tensor '{name}' points to missing file {rel}")
    return path


def checkpoint_inventory(model_dir: str | Path) -> list[TensorInfo]:
    """Every tensor of the checkpoint, from headers only. Duplicate names are an error."""
    seen: dict[str, str] = {}
    infos = []
    for path in checkpoint_files(model_dir):
        for info in read_safetensors_header(path):
            if info.name in seen:
                raise CheckpointError(
                    f"tensor '{info.name}' appears in both {seen[info.name]} and {info.file}"
                )
            seen[info.name] = info.file
            infos.append(info)
    return infos
