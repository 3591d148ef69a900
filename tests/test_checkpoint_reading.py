"""Lazy checkpoint slices and the header-only inventory, on real safetensors files."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from actors.reload.meta import read_window
from actors.transports import BucketReader, DeliveryContext, open_source
from actors.transports.files import (
    FileBucket,
    FilesTransport,
    checkpoint_files,
    checkpoint_inventory,
    file_entry,
)
from actors.transports.object_store import pack_tensors, unpack_tensors
from orchestrator import CheckpointError
from orchestrator.plan import Bucket, Plan, PlannedTensor
from orchestrator.progress import Progress


@pytest.fixture
def weights(tmp_path):
    tensors = {
        "a": torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8),
        "b": torch.randn(5, dtype=torch.float64),
        "c": torch.tensor(3.5, dtype=torch.bfloat16),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path, tensors


@pytest.fixture
def reader():
    reader = BucketReader()
    yield reader
    reader.close()


def lazy_slices(path, reader):
    infos = checkpoint_inventory(path)
    return dict(reader.items(FileBucket(tuple(file_entry(i) for i in infos))))


def test_a_file_message_arrives_whole_and_still_reads(weights, reader):
    """A rank gets its message pickled (Ray): entries come back of their own class with
    every field, and read the same tensors."""
    path, tensors = weights
    message = FileBucket(tuple(file_entry(i) for i in checkpoint_inventory(path)))
    arrived = pickle.loads(pickle.dumps(message))
    assert arrived == message
    assert [type(e) for e in arrived.entries] == [type(e) for e in message.entries]
    assert sorted((e.name, e.dtype, e.shape, e.file) for e in arrived.entries) == [
        (n, str(t.dtype).removeprefix("torch."), tuple(t.shape), str(path / "model.safetensors"))
        for n, t in sorted(tensors.items())]
    read = dict(reader.items(arrived))
    assert all(torch.equal(read[n].materialize(), t) for n, t in tensors.items())


def test_narrowed_slice_reads_its_window(weights, reader):
    path, tensors = weights
    lazy = lazy_slices(path, reader)
    window = lazy["a"].narrow(0, 2, 3).narrow(1, 4, 4)
    assert window.shape == (3, 4)
    assert torch.equal(window.materialize(), tensors["a"][2:5, 4:8])
    assert torch.equal(read_window(lazy["a"], ((1, 3), (0, 8))), tensors["a"][1:3])
    assert torch.equal(lazy["c"].materialize(), tensors["c"])


def random_box(window, rng):
    for dim in range(window.ndim):
        start = rng.randrange(window.shape[dim])
        window = window.narrow(dim, start, rng.randrange(1, window.shape[dim] - start + 1))
    return window


def test_every_box_reads_what_safetensors_reads(tmp_path, reader):
    """Random boxes of tensors of every rank and several dtypes, read by our reader three
    ways (materialized; copied into a same-dtype view inside a larger tensor; copied into
    another dtype), equal safetensors' own load_file."""
    import random

    from safetensors.torch import load_file

    save_file({"w": torch.randn(37, 53).to(torch.bfloat16),
               "experts": torch.randn(4, 9, 11),
               "fp8": torch.randn(6, 7).to(torch.float8_e4m3fn),
               "ids": torch.randint(0, 100, (17,), dtype=torch.int64),
               "scalar": torch.tensor(2.5, dtype=torch.float16)},
              tmp_path / "model.safetensors")
    expected = load_file(tmp_path / "model.safetensors")
    lazy = lazy_slices(tmp_path, reader)
    rng = random.Random(0)
    for name, full in expected.items():
        for _ in range(50):
            window = random_box(lazy[name], rng)
            want = full[tuple(slice(lo, hi) for lo, hi in window.bounds)].reshape(-1)
            raw = want.view(torch.uint8) if full.dtype.itemsize == 1 else want
            assert torch.equal(window.materialize().reshape(-1).view(raw.dtype), raw)
            outer = torch.zeros(want.numel() + 5, dtype=full.dtype)
            inside = outer[3:3 + want.numel()].view(window.shape)
            inside.copy_(window)
            assert torch.equal(outer[3:3 + want.numel()].view(raw.dtype), raw)
            assert not outer[:3].view(torch.uint8).any() and not outer[-2:].view(torch.uint8).any()
            if full.dtype != torch.float8_e4m3fn:
                converted = torch.empty(window.shape, dtype=torch.float64)
                converted.copy_(window)
                assert torch.equal(converted.reshape(-1), want.double())


def test_a_file_whose_tensors_are_not_aligned_reads_what_safetensors_reads(tmp_path, reader):
    """The format does not align tensor data, and writers other than safetensors' own may
    not: each tensor still reads what safetensors' load_file reads."""
    from safetensors.torch import load_file

    tensors = {"ids": torch.arange(4, dtype=torch.int8),
               "w": torch.randn(4, 5).to(torch.bfloat16),
               "f": torch.randn(3)}
    header, data = {}, b""
    for name, tensor in tensors.items():  # in this order: "w" and "f" start at odd offsets
        raw = tensor.view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": {torch.int8: "I8", torch.bfloat16: "BF16",
                                  torch.float32: "F32"}[tensor.dtype],
                        "shape": list(tensor.shape), "data_offsets": [len(data),
                                                                      len(data) + len(raw)]}
        data += raw
    encoded = json.dumps(header).encode()
    encoded += b" " * (7 - len(encoded) % 8)  # an odd header length too
    (tmp_path / "model.safetensors").write_bytes(
        len(encoded).to_bytes(8, "little") + encoded + data)
    expected = load_file(tmp_path / "model.safetensors")
    lazy = lazy_slices(tmp_path, reader)
    for name, tensor in tensors.items():
        assert torch.equal(expected[name], tensor)
        assert torch.equal(lazy[name].materialize(), tensor), name
        assert torch.equal(lazy[name].narrow(0, 1, 2).materialize(), tensor[1:3]), name


def test_narrow_outside_the_tensor_names_file_and_tensor(weights, reader):
    path, _ = weights
    message = r"model.safetensors: tensor 'a' has 8 entries along dim 1"
    with pytest.raises(ValueError, match=message):
        lazy_slices(path, reader)["a"].narrow(1, 6, 4)


def test_packed_bucket_round_trips_every_dtype(weights):
    _, tensors = weights
    tensors["f"] = torch.randn(3, 5).to(torch.float8_e4m3fn)
    entries, arrays = pack_tensors(list(tensors.items()))
    unpacked = dict(unpack_tensors(entries, arrays))
    assert all(torch.equal(unpacked[n], t) and unpacked[n].dtype == t.dtype
               for n, t in tensors.items())


def test_in_memory_sources_keep_their_order(weights):
    _, tensors = weights
    pairs = list(reversed(tensors.items()))
    assert [t.name for t in open_source(dict(pairs)).tensors] == ["c", "b", "a"]
    assert [t.name for t in open_source(iter(pairs)).tensors] == ["c", "b", "a"]
    with pytest.raises(CheckpointError, match="tensor 'a' appears twice"):
        open_source(pairs + [("a", tensors["a"])])


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
    message = r"pickle files \['pytorch_model.bin'\], which are never loaded"
    with pytest.raises(CheckpointError, match=message):
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


def test_inventory_follows_the_index_over_several_files(checkpoints):
    """A sharded save_pretrained checkpoint (the llama one every engine test loads) is
    listed through model.safetensors.index.json: each tensor from the file it names."""
    path = checkpoints["llama"]
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 3
    listed = {i.name: Path(i.file).name for i in checkpoint_inventory(path)}
    assert listed == weight_map


class RecordingFleet:
    """Stands in for the fleet: keeps each message a rank call would carry."""

    def __init__(self) -> None:
        self.messages: list[FileBucket] = []

    def load_bucket(self, message: FileBucket) -> dict:
        self.messages.append(message)
        return {}


def test_file_buckets_share_a_message_up_to_its_limit_and_every_bucket_is_counted(
        tmp_path, monkeypatch):
    """A directory's buckets name tensors and carry no bytes, so consecutive ones go as one
    message (one call per rank) up to ``message_bytes``: every tensor once, in plan order,
    a bucket larger than the limit alone; the progress line still counts the plan's
    buckets, to N of N."""
    tensors = {f"t{i}": torch.full((64 * (3 if i == 4 else 1),), float(i)) for i in range(10)}
    save_file(tensors, tmp_path / "model.safetensors")
    infos = {i.name: i for i in checkpoint_inventory(tmp_path)}
    buckets = tuple(Bucket((PlannedTensor(n, n, infos[n].nbytes, (infos[n].nbytes,),
                                          infos[n].file),)) for n in tensors)
    plan = Plan("plan", buckets, tuple(tensors), 0, 0, 0, 0)
    monkeypatch.setattr(FilesTransport, "message_bytes", 600)  # two 256 B tensors, not three
    fleet = RecordingFleet()
    delivery = FilesTransport().deliver(open_source(tmp_path), plan,
                                        DeliveryContext(fleet, None, "cpu", 10.0))
    stream = io.StringIO()
    progress = Progress("load v2", [b.nbytes for b in buckets], stream=stream)
    monkeypatch.setattr("orchestrator.progress.PROGRESS_AFTER_S", 0.0)
    for _, nbytes in delivery.steps:
        progress.advance(nbytes)
    progress.close()
    assert [[e.name for e in m.entries] for m in fleet.messages] == \
        [["t0", "t1"], ["t2", "t3"], ["t4"], ["t5", "t6"], ["t7", "t8"], ["t9"]]
    assert delivery.replay == fleet.messages  # what the commit log replays
    assert stream.getvalue().splitlines()[-1].startswith("load v2: bucket 10/10, ")
