"""Lazy checkpoint slices and the header-only inventory, on real safetensors files."""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest
import torch
from safetensors.torch import save_file

from actors.checkpoint import ReadCounter, iter_checkpoint_slices
from orchestrator import CheckpointError
from orchestrator.inventory import checkpoint_files, checkpoint_inventory, names_by_file


@pytest.fixture
def weights(tmp_path):
    tensors = {
        "a": torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8),
        "b": torch.randn(5, dtype=torch.float64),
        "c": torch.tensor(3.5, dtype=torch.bfloat16),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path, tensors


def slices(path, counter, stack):
    return dict(iter_checkpoint_slices(names_by_file(checkpoint_inventory(path)), counter, stack))


def test_narrowed_slice_reads_only_its_window(weights):
    path, tensors = weights
    counter = ReadCounter()
    with ExitStack() as stack:
        lazy = slices(path, counter, stack)
        window = lazy["a"].narrow(0, 2, 3).narrow(1, 4, 4)
        assert window.shape == (3, 4) and counter.bytes_read == 0
        assert torch.equal(window.materialize(), tensors["a"][2:5, 4:8])
        assert torch.equal(lazy["c"].materialize(), tensors["c"])
    assert counter.bytes_read == 3 * 4 * 4 + 2
    assert counter.tensors_read == 2


def test_narrow_outside_the_tensor_names_file_and_tensor(weights):
    path, _ = weights
    with ExitStack() as stack:
        lazy = slices(path, ReadCounter(), stack)
        with pytest.raises(ValueError, match=r"model.safetensors: tensor 'a' has 8 entries along dim 1"):
            lazy["a"].narrow(1, 6, 4)


def test_inventory_reads_headers(weights):
    path, tensors = weights
    infos = {i.name: i for i in checkpoint_inventory(path)}
    assert {n: (i.shape, i.dtype, i.nbytes) for n, i in infos.items()} == {
        "a": ((6, 8), "F32", 192), "b": ((5,), "F64", 40), "c": ((), "BF16", 2)}


def test_index_entry_outside_the_directory_is_refused(weights):
    path, _ = weights
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="tensor 'a' points outside the checkpoint dir"):
        checkpoint_files(path)


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pickle files \['pytorch_model.bin'\], which are never loaded"):
        checkpoint_files(tmp_path)


def test_truncated_file_is_detected_from_the_header(weights):
    path, _ = weights
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint_inventory(path)


def test_duplicate_name_across_files_is_refused(weights):
    path, tensors = weights
    save_file({"a": tensors["a"]}, path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'a' appears in both"):
        checkpoint_inventory(path)
