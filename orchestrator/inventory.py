"""Driver-side checkpoint inventory: tensor names, shapes, dtypes and files from safetensors
headers, without reading tensor data and without ever unpickling anything."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
# A safetensors header is JSON metadata; anything this large is a corrupt length field.
MAX_HEADER_BYTES = 100 << 20
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    """safetensors dtype code, e.g. ``BF16``."""
    nbytes: int
    file: str
    """Absolute path of the file holding the tensor."""


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
    data_size = size - 8 - header_len
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos.append(_tensor_info(path, name, entry, data_size))
    return infos


def _tensor_info(path: Path, name: str, entry: dict, data_size: int) -> TensorInfo:
    try:
        dtype, shape, (start, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry") from exc
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
    numel = 1
    for dim in shape:
        numel *= dim
    if stop - start != numel * DTYPE_BYTES[dtype] or stop > data_size:
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
    files = []
    for name, rel in weight_map.items():
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise CheckpointError(f"{index}: tensor '{name}' points outside the checkpoint dir: {rel}")
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{index}: tensor '{name}' is in {rel}; only safetensors are loaded")
        if not path.is_file():
            raise CheckpointError(f"{index}: tensor '{name}' points to missing file {rel}")
        if path not in files:
            files.append(path)
    return files


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


def names_by_file(infos: list[TensorInfo]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for info in infos:
        grouped.setdefault(info.file, []).append(info.name)
    return grouped
