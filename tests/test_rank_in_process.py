"""One rank's reload without Ray: the native model of a TP=1 rank and its reload engine, fed
from a checkpoint directory through the rank's own reader, on the CPU and (gpu marker) on
CUDA, where windows are staged in pinned memory and copied on side streams
(``actors.reload.pinned_host``). These are the GPU machine's tests: it has no Ray."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import quant.fp8 as fp8
from actors.dtypes import SAFETENSORS_DTYPES, dtype_name
from actors.engines.native import TPGroup, load_spec
from actors.engines.native.reloadable import build_reloadable
from actors.reload import ReloadEngine, ReloadError
from actors.reload.pinned_host import copy_into
from actors.reload.staging_area import StagingArea
from actors.transports import BucketReader
from actors.transports.files import FileBucket, FileEntry
from benchmarks.checkpoints import ensure_checkpoint
from benchmarks.rank_bench import measure
from quant import QuantConfig
from tests.quant_reference import rank_linears, reference_kernel, same_bytes
from tests.support import (
    expected_rank_bytes,
    load_tensors,
    reference_logits,
    rel_l2,
    write_checkpoint,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Two 128-wide blocks per row, as in the quantization tests.
QSHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64)


def file_bucket(path: Path) -> FileBucket:
    """Every tensor of the checkpoint, from the files' headers (what the driver sends)."""
    entries = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                part = f.get_slice(name)
                dtype = SAFETENSORS_DTYPES[part.get_dtype()]
                entries.append(FileEntry(name, dtype_name(dtype), tuple(part.get_shape()),
                                         str(file)))
    return FileBucket(tuple(entries))


class InProcessRank:
    """What a rank actor does for a reload (``actors.rank_actor``), minus Ray and the group."""

    def __init__(self, path: Path, device: str, quantization: str | None = None) -> None:
        self.device = torch.device(device)
        self.model, reloadable = build_reloadable(
            load_spec(path), tp=TPGroup(0, 1), dtype=torch.float32, device=self.device,
            quant=QuantConfig(quantization))
        self.engine = ReloadEngine(reloadable, self.device, logging.getLogger("test"))
        self.load(path, mode="first")

    def load(self, path: Path, mode: str = "reload", engine: ReloadEngine | None = None
             ) -> dict:
        engine = engine or self.engine
        reader = BucketReader()
        engine.start(mode)
        try:
            engine.load(reader.items(file_bucket(path)))
            return engine.finish()
        except BaseException:
            engine.abort()
            raise
        finally:
            reader.close()

    def kernel(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        return self.model(ids, torch.arange(ids.shape[1], device=self.device)).float().cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_reload_in_place_matches_transformers(tmp_path, prompt, device):
    a = write_checkpoint(tmp_path / "a", "llama", seed=1)
    b = write_checkpoint(tmp_path / "b", "llama", seed=2)
    rank = InProcessRank(a, device)
    pointers = {n: t.data_ptr() for n, t in rank.kernel().items()}
    stats = rank.load(b)
    assert {n: t.data_ptr() for n, t in rank.kernel().items()} == pointers
    assert rel_l2(rank.forward(prompt), reference_logits(b, prompt)) <= 1e-4
    # A CUDA rank stages every byte it reads in pinned memory once; a CPU rank none.
    staged = rank.engine.pinned.pinned_bytes
    assert staged == (stats.bytes_read if device == "cuda" else 0)
    assert stats.bytes_read > 0


def mapped(path: Path) -> list[str]:
    """Lines of this process's memory map that map a file under ``path``."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines()
            if str(path) in line]


def test_the_files_a_reload_read_are_unmapped_after_it(tmp_path):
    """A rank maps the checkpoint's files and lets go of them once the reload is over (on a
    thread of its own, after the reply): a replaced checkpoint's pages, and its disk space,
    are not held until the next reload."""
    a = write_checkpoint(tmp_path / "a", "llama", seed=1)
    b = write_checkpoint(tmp_path / "b", "llama", seed=2)
    rank = InProcessRank(a, "cpu")
    reader = BucketReader()
    rank.engine.start("reload")
    rank.engine.load(reader.items(file_bucket(b)))
    rank.engine.finish()
    assert mapped(b), "the reload did not map the files it read"
    reader.close()
    deadline = time.monotonic() + 10
    while mapped(b) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not mapped(b), f"still mapped after the reload: {mapped(b)}"


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_reloads_through_alternating_scratch_equal_the_reference(tmp_path, device,
                                                                      monkeypatch):
    """Three reloads, so each of a CUDA rank's two scratch slots is reused; every kernel
    tensor equals an independent quantization of the checkpoint, bit for bit, and was
    quantized straight into the tensors served (no fp8 copy)."""
    steps = [write_checkpoint(tmp_path / str(s), "llama", seed=s, **QSHAPE) for s in (3, 4)]
    rank = InProcessRank(steps[0], device, quantization="fp8")
    served_at = {t.data_ptr() for t in rank.kernel().values()}
    written: list[int | None] = []
    quantize = fp8.quantize_fp8

    def spy(w: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None):
        written.append(None if out is None else out.data_ptr())
        return quantize(w, scale, out)

    monkeypatch.setattr(fp8, "quantize_fp8", spy)
    for path in (steps[1], steps[0], steps[1]):
        written.clear()
        rank.load(path)
        assert written and all(ptr in served_at for ptr in written)
        config = json.loads((path / "config.json").read_text())
        served = {n: t.cpu() for n, t in rank.kernel().items()}
        for layer, w in rank_linears(load_tensors(path), config, 1, 0).items():
            for name, tensor in reference_kernel(w, "fp8").items():
                assert same_bytes(served[f"{layer}.{name}"], tensor), f"{path.name} {layer}.{name}"


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_a_middle_layer_is_refused_naming_the_tensor(tmp_path, prompt, device):
    """On CUDA the screen's verdict is read one layer late: it must still fail the reload,
    name the tensor, and leave the engine able to reload."""
    a = write_checkpoint(tmp_path / "a", "llama", seed=1)
    bad = write_checkpoint(tmp_path / "bad", "llama", seed=2)
    tensors = load_tensors(bad)
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name][3, 5] = float("nan")
    for file in bad.glob("*.safetensors"):
        file.unlink()
    (bad / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    rank = InProcessRank(a, device)
    with pytest.raises(ReloadError, match=rf"'{name}' contains NaN"):
        rank.load(bad)
    rank.load(a)
    assert rel_l2(rank.forward(prompt), reference_logits(a, prompt)) <= 1e-4


def test_finite_weights_whose_sum_overflows_pass_the_screen_and_inf_does_not(tmp_path):
    """The CPU screen sums what was written (cheaper than min and max): a tensor of huge
    finite values, whose sum overflows, must still load; one Inf among them must not."""
    a = write_checkpoint(tmp_path / "a", "llama", seed=1)
    rank = InProcessRank(a, "cpu")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors = load_tensors(a)
    tensors[name].fill_(3e38)
    huge = single_file(tmp_path / "huge", a, tensors)
    rank.load(huge)
    assert torch.all(rank.kernel()["model.layers.1.mlp.gate_up_proj.weight"][-1] == 3e38)
    tensors[name][2, 3] = float("inf")
    with pytest.raises(ReloadError, match=rf"'{name}' contains Inf"):
        rank.load(single_file(tmp_path / "inf", a, tensors))


def single_file(path: Path, like: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """``tensors`` as a one-file checkpoint with ``like``'s config."""
    path.mkdir()
    (path / "config.json").write_text((like / "config.json").read_text())
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("place", ["device", "host"])
def test_staging_loads_beside_the_serving_model_then_flips_in_place(tmp_path, prompt, device,
                                                                    place):
    """A staged reload on one rank: the twin's reload fills the staging copies (pinned host
    memory for 'host' on CUDA) while the live model still answers with the old weights;
    the flip copies them into the kernel tensors in place and drops them."""
    a = write_checkpoint(tmp_path / "a", "llama", seed=1)
    b = write_checkpoint(tmp_path / "b", "llama", seed=2)
    rank = InProcessRank(a, device)
    old, kernel = rank.forward(prompt), rank.kernel()
    pointers = {n: t.data_ptr() for n, t in kernel.items()}
    area = StagingArea(rank.engine.model, rank.device, logging.getLogger("test"), True)
    layers = [r.name for r in rank.engine.records]
    assert area.prepare(layers, place) == sum(t.nbytes for t in kernel.values())
    rank.load(b, engine=area.reloader)
    staged = [t for tensors in area.staged.values() for t in tensors.values()]
    assert all(t.is_pinned() == (device == "cuda" and place == "host") for t in staged)
    assert torch.equal(rank.forward(prompt), old)  # the live model never saw the new weights
    area.flip()
    assert area.nbytes == 0
    assert {n: t.data_ptr() for n, t in rank.kernel().items()} == pointers
    assert rel_l2(rank.forward(prompt), reference_logits(b, prompt)) <= 1e-4


def test_staging_that_does_not_fit_is_refused_before_anything_moves(tmp_path, monkeypatch):
    import actors.reload.staging_area as staged_module

    rank = InProcessRank(write_checkpoint(tmp_path / "a", "llama", seed=1), "cpu")
    area = StagingArea(rank.engine.model, rank.device, logging.getLogger("test"), True)
    monkeypatch.setattr(staged_module, "available_bytes", lambda device, place: 1 << 10)
    with pytest.raises(MemoryError, match=r"staging this reload needs 0\.\d+ MiB of host "
                                          r"memory per rank and 0\.0 MiB are free"):
        area.prepare([r.name for r in rank.engine.records], "host")
    assert area.staged == {} and area.nbytes == 0


@pytest.mark.gpu
def test_staged_copy_is_asynchronous():
    """The copy of a pinned window into a device tensor is queued, not waited for: with the
    stream busy, the host returns before it ran."""
    device = torch.device("cuda", 0)
    source = torch.randn(1024, 1024).pin_memory()
    target = torch.empty(1024, 1024, device=device)
    torch.cuda._sleep(500_000_000)
    copy_into(target, source)
    assert not torch.cuda.current_stream(device).query(), "the copy blocked the host"
    torch.cuda.synchronize(device)
    assert torch.equal(target.cpu(), source)


@pytest.mark.gpu
@pytest.mark.parametrize("ordered", [True, False])
def test_side_streams_wait_for_work_queued_before_the_reload(tmp_path, ordered):
    """A forward queued before the reload still reads the old weights: every layer's side
    stream waits for the work queued before the reload started. Without the ordering
    (``DeviceSync.enabled=False``) the reload's copies overtake that work."""
    a = write_checkpoint(tmp_path / "a", "llama", seed=1)
    b = write_checkpoint(tmp_path / "b", "llama", seed=2)
    rank = InProcessRank(a, "cuda")
    rank.engine.sync.enabled = ordered
    weight = rank.kernel()["model.layers.0.mlp.down_proj.weight"]
    old = weight.cpu()
    torch.cuda._sleep(2_000_000_000)  # the serving stream is busy ...
    seen = weight.clone()             # ... and then reads the weight
    rank.load(b)
    torch.cuda.synchronize()
    new = load_tensors(b)["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(weight.cpu(), new)
    assert torch.equal(seen.cpu(), old if ordered else new)


def test_the_rank_benchmark_times_a_reload_that_serves_the_checkpoints_shards(tmp_path):
    """``benchmarks.rank_bench`` times real work: the reload it reports read every byte of
    rank 1's share of TP=2 and rewrote every layer, after which the rank serves every fused
    linear exactly as the checkpoint's shards by the tests' own sharding rules."""
    path = ensure_checkpoint(tmp_path, "tiny")
    result, rank = measure(path, tp=2, rank=1, reloads=2)
    assert result["ours_min_s"] > 0 and result["floor_min_s"] > 0
    assert result["ours_bytes_read"] == sum(expected_rank_bytes(path, 2, 1).values())
    assert result["ours_layers_reloaded"] == len(rank.engine.records)
    config = json.loads((path / "config.json").read_text())
    served = dict(rank.model.named_parameters())
    shards = rank_linears(load_tensors(path), config, 2, 1)
    assert len(shards) == 4 * config["num_hidden_layers"]
    for layer, shard in shards.items():
        assert torch.equal(served[f"{layer}.weight"], shard), layer
