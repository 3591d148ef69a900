"""Driver-side inventory of a reload source: tensor names, shapes, dtypes, sizes and files,
without reading tensor data and without ever unpickling anything.

Source kinds: a checkpoint directory (safetensors headers + index), a mapping name -> tensor,
or an iterable of (name, tensor) pairs (consumed once, up front, to plan; its tensors are
referenced, not copied)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from actors.dtypes import SAFETENSORS_CODES, SAFETENSORS_DTYPES, dtype_name, itemsize
from actors.transport import FileEntry
from orchestrator.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
# A safetensors header is JSON metadata; anything this large is a corrupt length field.
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    """safetensors dtype code, e.g. ``BF16``."""
    nbytes: int
    file: str | None
    """Absolute path of the file holding the tensor; None for in-memory tensors."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]

    def file_entry(self) -> FileEntry:
        """What a rank needs to read this tensor from its file."""
        assert self.file is not None, f"'{self.name}' is an in-memory tensor"
        return FileEntry(self.name, dtype_name(self.torch_dtype), self.shape, self.file)


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
    # Physical order: the order a sequential reader of this file meets the tensors.
    return [_tensor_info(path, name, entry, data_size) for name, entry in entries]


def _data_start(path: Path, name: str, entry: Any) -> int:
    try:
        return int(entry["data_offsets"][0])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry") from exc


def _tensor_info(path: Path, name: str, entry: dict, data_size: int) -> TensorInfo:
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
    return TensorInfo(name, shape, dtype, stop - start, str(path))


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


@dataclass(frozen=True, slots=True)
class Source:
    """A reload source, listed but not read."""

    kind: Literal["dir", "memory", "trainer"]
    tensors: tuple[TensorInfo, ...]
    """In the source's own order (files in index order, tensors by position in the file)."""
    description: str
    data: Mapping[str, torch.Tensor] | None = None
    """In-memory tensors by name (kind 'memory')."""
    stream: Any = None
    """Kind 'trainer': the listed trainer (``orchestrator.trainer.ListedTrainer``)."""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def open_source(source: Any) -> Source:
    """List a checkpoint dir, a mapping name -> tensor, or an iterable of (name, tensor)."""
    if isinstance(source, (str, Path)):
        return Source("dir", tuple(checkpoint_inventory(source)), str(source))
    pairs = list(source.items()) if isinstance(source, Mapping) else _pairs(source)
    data: dict[str, torch.Tensor] = {}
    for name, tensor in pairs:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"in-memory source entries must be (str, torch.Tensor), got "
                                  f"({type(name).__name__}, {type(tensor).__name__})")
        if name in data:
            raise CheckpointError(f"tensor '{name}' appears twice in the in-memory source")
        if tensor.dtype not in SAFETENSORS_CODES:
            raise CheckpointError(f"tensor '{name}' has unsupported dtype {tensor.dtype}")
        data[name] = tensor
    infos = tuple(
        TensorInfo(name, tuple(t.shape), SAFETENSORS_CODES[t.dtype],
                   t.numel() * t.element_size(), None)
        for name, t in data.items()
    )
    kind = "dict" if isinstance(source, Mapping) else "iterable"
    return Source("memory", infos, f"in-memory {kind} of {len(infos)} tensors", data)


def _pairs(source: Any) -> list[tuple[Any, Any]]:
    if not isinstance(source, Iterable):
        raise CheckpointError(f"unsupported reload source {type(source).__name__}: pass a "
                              "checkpoint directory, a dict name -> tensor, or (name, tensor) "
                              "pairs")
    pairs = []
    for item in source:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise CheckpointError(f"iterable sources yield (name, tensor) pairs, got {item!r:.80}")
        pairs.append(item)
    return pairs
