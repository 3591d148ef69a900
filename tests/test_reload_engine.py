"""The rank-side reload engine on its own (no Ray): write counting on meta, in-place copy into
kernel tensors, processing order, untouched / partial / duplicate layers."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from actors import copy_screen
from actors.engines.native.parallel import default_weight_loader, to_tensor
from actors.reload import (
    LayerRecord,
    ReloadableModel,
    ReloadEngine,
    ReloadError,
    finite,
    in_processing_order,
)
from actors.reload.finite import BLOCK_BYTES, screened_copy, screening_copies
from actors.reload.meta import PrefetchedWeight, ProbeWeight, RecordedCopy, WriteCounter, recorded

log = logging.getLogger("test")


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (lambda p: p.narrow(0, 1, 2).copy_(meta(2, 4)), 8),
        (lambda p: p.fill_(torch.empty((), device="meta")), 24),      # scalar fill
        (lambda p: p.fill_(3.0), 24),
        (lambda p: p[4:].zero_(), 8),
        (lambda p: p.index_put_((torch.empty(3, dtype=torch.long, device="meta"),),
                                meta(3, 4)), 12),                      # index write
        (lambda p: p.index_copy_(0, torch.empty(2, dtype=torch.long, device="meta"),
                                 meta(2, 4)), 8),
        (lambda p: meta(6, 4).copy_(p), 0),                            # a read, not a write
    ],
)
def test_write_counter_counts_writes_into_the_param(write, expected):
    param = meta(6, 4)
    with WriteCounter(param) as counter:
        write(param)
    assert counter.numel == expected


def probe_copy(write) -> tuple | None:
    """What a dry run of ``write(param, probe)`` records, for a [6, 4] param and an [8, 4]
    source."""
    param, probe = meta(6, 4), ProbeWeight((8, 4), torch.float32)
    with WriteCounter(param) as counter:
        write(param, probe)
    return recorded(counter, probe, param)


def test_a_dry_run_records_the_copies_of_whole_boxes():
    copies = probe_copy(lambda p, w: p.narrow(0, 2, 3).copy_(w.narrow(0, 5, 3)))
    assert copies == (RecordedCopy((3, 4), (4, 1), 8, ((5, 8), (0, 4))),)
    # A box read as one row, unsqueezed: still the box, in row-major order.
    assert probe_copy(lambda p, w: p[1].copy_(w.select(0, 7))) == (
        RecordedCopy((4,), (1,), 4, ((7, 8), (0, 4))),)


@pytest.mark.parametrize("write", [
    lambda p, w: (p.copy_(w.narrow(0, 0, 6)), p.mul_(2)),                 # then scaled
    lambda p, w: (p[:5].copy_(w.narrow(0, 0, 5)), p[5:].zero_()),         # padding filled
    lambda p, w: p[:4].copy_(w.narrow(0, 0, 4).materialize().t()),        # a transposed box
    lambda p, w: p[:2].copy_(w.narrow(0, 0, 4).materialize()[1:3]),       # part of a box
    lambda p, w: p.copy_(torch.zeros(6, 4, device="meta")),                # not the source
    lambda p, w: p[:3].copy_(w.narrow(0, 0, 1).materialize()),            # broadcast
])
def test_a_loader_that_does_more_than_copy_boxes_is_replayed_itself(write):
    assert probe_copy(write) is None


class CountingToy(ReloadableModel):
    """The toy, replaying recorded copies or not; counts the loader's runs on real tensors."""

    def __init__(self, replays: bool) -> None:
        with torch.device("meta"):
            self.toy = Toy()
        self.replays_copies = replays
        self.runs = 0
        for param in self.toy.parameters():
            param.weight_loader = self._counted(param.weight_loader)
        self.inner = ToyReloadable(self.toy)

    def _counted(self, loader):
        def run(param, loaded, *args):
            self.runs += not param.is_meta
            return loader(param, loaded, *args)
        return run

    def records(self):
        return self.inner.records()

    def load_weights(self, weights):
        self.inner.load_weights(weights)

    def process(self, record):
        pass


def test_recorded_copies_replay_a_reload_without_its_loaders():
    """The same reloads with and without replaying recorded copies write the same bits;
    replaying them, a reload runs only the loader that fills (the scalar scale) on real
    tensors: every copying one is replayed from its copies (the toy's twice-writing loader
    included: two copies recorded)."""
    served = {}
    for replays in (False, True):
        model = CountingToy(replays)
        engine = ReloadEngine(model, torch.device("cpu"), log)
        first_load(engine, weights(0))
        model.runs = 0
        for seed in (1, 2):
            engine.start("reload")
            engine.load(weights(seed).items())
            engine.finish()
        served[replays] = {n: p.clone() for n, p in model.toy.named_parameters()}
        assert model.runs == 2 * (1 if replays else len(weights(0)))
    assert all(torch.equal(served[True][n], t) for n, t in served[False].items())
    assert all(torch.equal(served[True][n], t) for n, t in weights(2).items())


class Toy(nn.Module):
    """Two plain layers and one ``process_last`` layer with a scalar scale."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4, bias=False)
        self.second = nn.Linear(4, 4, bias=True)
        self.scales = nn.Module()
        self.scales.process_last = True
        self.scales.k_scale = nn.Parameter(torch.empty(()), requires_grad=False)
        self.processed: list[str] = []
        for module in (self.first, self.second, self.scales):
            for param in module.parameters():
                param.requires_grad_(False)
                param.weight_loader = self.twice_loader if module is self.second else \
                    default_weight_loader

    @staticmethod
    def twice_loader(param: torch.Tensor, loaded, shard_id=None) -> None:
        # Writes the whole param twice: the count must be capped at the param's numel.
        param.data.copy_(to_tensor(loaded))
        param.data.copy_(to_tensor(loaded))

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, weight in weights:
            params[name].weight_loader(params[name], weight)


class ToyReloadable(ReloadableModel):
    """The toy behind the reload interface: three layers, ``scales`` processed last,
    nothing converted."""

    def __init__(self, toy: Toy) -> None:
        self.toy = toy
        layers = (("first", toy.first), ("second", toy.second), ("scales", toy.scales))
        self._records = in_processing_order([
            LayerRecord(name, module,
                        {n: p for n, p in module._parameters.items() if p is not None},
                        owners={}, restore_device=torch.device("cpu"),
                        process_last=name == "scales")
            for name, module in layers])

    def records(self):
        return self._records

    def load_weights(self, weights):
        self.toy.load_weights(weights)

    def process(self, record):
        pass


def build() -> tuple[Toy, ReloadEngine, list[str]]:
    with torch.device("meta"):
        toy = Toy()
    order: list[str] = []
    engine = ReloadEngine(ToyReloadable(toy), torch.device("cpu"), log)
    original = engine._process

    def spy(load):
        order.append(load.record.name)
        original(load)

    engine._process = spy
    return toy, engine, order


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"first.weight": torch.randn(4, 4, generator=g),
            "second.weight": torch.randn(4, 4, generator=g),
            "second.bias": torch.randn(4, generator=g),
            "scales.k_scale": torch.rand((), generator=g)}


def first_load(engine: ReloadEngine, values: dict[str, torch.Tensor]) -> None:
    engine.start("first")
    engine.load(values.items())
    engine.finish()


def test_reload_copies_into_the_original_tensors_and_finalizes_scales_last():
    toy, engine, order = build()
    first_load(engine, weights(0))
    kernel = {n: (p, p.data_ptr()) for n, p in toy.named_parameters()}
    new = weights(1)
    order.clear()
    engine.start("reload")
    # Scale first in the stream: it must still be processed after every other layer.
    engine.load([("scales.k_scale", new["scales.k_scale"])])
    engine.load((n, t) for n, t in new.items() if n != "scales.k_scale")
    stats = engine.finish()
    assert order == ["first", "second", "scales"]
    assert stats.layers_reloaded == ["first", "second", "scales"]
    for name, param in toy.named_parameters():
        assert param is kernel[name][0] and param.data_ptr() == kernel[name][1]
        assert torch.equal(param, new[name])
    assert stats.bytes_read == sum(t.numel() * t.element_size() for t in new.values())


def test_untouched_layer_keeps_its_tensors_and_partial_layer_is_named():
    toy, engine, _ = build()
    first_load(engine, weights(0))
    old_first = toy.first.weight.clone()
    new = weights(1)
    engine.start("reload")
    engine.load([("second.weight", new["second.weight"]), ("second.bias", new["second.bias"]),
                 ("scales.k_scale", new["scales.k_scale"])])
    stats = engine.finish()
    assert stats.layers_kept == ["first"] and torch.equal(toy.first.weight, old_first)

    engine.start("reload")
    engine.load([("second.weight", weights(2)["second.weight"])])
    with pytest.raises(ReloadError, match=r"second\.bias \(0 of 4 elements\)"):
        engine.finish()
    assert not toy.second.bias.is_meta, "an aborted layer is back on its kernel tensors"
    assert torch.equal(toy.second.weight, new["second.weight"])


def test_a_reload_arms_only_the_layers_its_plan_writes():
    """Given the plan's layers, a reload arms those and the process_last layers that reset
    with them; every other layer serves its live tensors throughout, untouched."""
    toy, engine, _ = build()
    first_load(engine, weights(0))
    live_first = toy.first.weight
    next(r for r in engine.records if r.name == "scales").reset_with = "second"
    new = weights(1)
    engine.start("reload", layers=["second"])
    assert toy.first.weight is live_first and not live_first.is_meta
    assert toy.second.weight.is_meta and toy.scales.k_scale.is_meta, "armed"
    engine.load([("second.weight", new["second.weight"]), ("second.bias", new["second.bias"])])
    stats = engine.finish()
    assert stats.layers_reloaded == ["second"] and stats.layers_kept == ["first", "scales"]
    assert torch.equal(toy.second.weight, new["second.weight"])
    assert toy.first.weight is live_first and not toy.scales.k_scale.is_meta


def test_duplicate_tensor_is_refused():
    _, engine, _ = build()
    first_load(engine, weights(0))
    engine.start("reload")
    engine.load([("second.bias", weights(1)["second.bias"])])
    with pytest.raises(ReloadError, match="second.bias received shard None twice"):
        engine.load([("second.bias", weights(1)["second.bias"])])
    engine.abort()


def test_first_load_with_a_missing_layer_fails():
    _, engine, _ = build()
    engine.start("first")
    engine.load((n, t) for n, t in weights(0).items() if not n.startswith("first"))
    with pytest.raises(ReloadError, match=r"first\.weight \(0 of 16 elements\)"):
        engine.finish()


@pytest.mark.parametrize("method", [None, "fp8", "fp8_per_channel", "fp8_block", "w4a8"])
def test_processing_never_uses_the_ambient_default_device(tmp_path, method):
    """Scales and temporaries must land on the layer's recorded device: with the ambient
    default device set to meta, anything created without an explicit device would be on meta."""
    from actors.engines.native import TPGroup, load_spec
    from actors.engines.native.reloadable import build_reloadable
    from quant import QuantConfig
    from tests.support import load_tensors, reference_logits, rel_l2, write_checkpoint

    path = write_checkpoint(tmp_path / "m", "llama", hidden_size=256, intermediate_size=512,
                            head_dim=64)
    model, reloadable = build_reloadable(load_spec(path), tp=TPGroup(0, 1), dtype=torch.float32,
                                         device=torch.device("cpu"),
                                         quant=QuantConfig(method, "fp8"))
    engine = ReloadEngine(reloadable, torch.device("cpu"), log)
    with torch.device("meta"):
        engine.start("first")
        engine.load(load_tensors(path).items())
        engine.finish()
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert {t.device.type for t in tensors.values()} == {"cpu"}
    prompt = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(prompt, torch.arange(8))
    assert rel_l2(logits, reference_logits(path, prompt)) < 0.7  # quantized, but the model


@pytest.mark.parametrize("order", ["plan", "source"])
def test_reported_peak_is_what_the_rank_really_held(tmp_path, monkeypatch, order):
    """Rank 1 of a TP=2 engine, fed bucket by bucket from the files as a rank actor is. A
    hook on every window read from a file counts the bytes alive (released when the tensor
    is freed), without the planner or the engine's bookkeeping. Its peak is the reported
    peak; in plan order it is the largest layer's share of rank 1, by the test's own
    sharding rules."""
    import weakref

    from actors.checkpoint import CheckpointSlice
    from actors.engines.native import TPGroup, load_spec
    from actors.engines.native.reloadable import build_reloadable
    from actors.transports import BucketReader
    from actors.transports.files import FileBucket, checkpoint_inventory, file_entry
    from orchestrator import EngineConfig, ReloadOrchestrator
    from quant import QuantConfig
    from tests.support import expected_rank_bytes, parent_layer, write_checkpoint, write_shuffled

    written = write_checkpoint(tmp_path / "m", "llama", num_hidden_layers=3)
    path = write_shuffled(written, tmp_path / "shuffled", files=4, seed=2)
    held = {"now": 0, "peak": 0}

    def release(nbytes: int) -> None:
        held["now"] -= nbytes

    def counted_read(self, bounds):
        window = real_read(self, bounds)
        nbytes = window.numel() * window.element_size()
        held["now"] += nbytes
        held["peak"] = max(held["peak"], held["now"])
        weakref.finalize(window, release, nbytes)
        return window

    real_read = CheckpointSlice._read
    monkeypatch.setattr(CheckpointSlice, "_read", counted_read)
    plan = ReloadOrchestrator(EngineConfig(model=path, tensor_parallel_size=2,
                                           bucket_bytes=4 << 10)).plan(str(path), order=order)
    infos = {i.name: i for i in checkpoint_inventory(path)}
    _, reloadable = build_reloadable(load_spec(path), tp=TPGroup(1, 2), dtype=torch.float32,
                                     device=torch.device("cpu"), quant=QuantConfig())
    engine = ReloadEngine(reloadable, torch.device("cpu"), log)
    peaks = []
    for mode in ("first", "reload"):
        held["peak"] = 0
        engine.start(mode)
        reader = BucketReader()
        for bucket in plan.buckets:
            engine.load(reader.items(FileBucket(tuple(file_entry(infos[t.name])
                                                      for t in bucket.tensors))))
            engine.own_buffers()
        stats = engine.finish()
        reader.close()
        assert held["now"] == 0, "every buffered window was freed"
        assert stats.peak_buffered_bytes == held["peak"]
        peaks.append(held["peak"])
    by_layer: dict[str, int] = {}
    for name, nbytes in expected_rank_bytes(path, 2, 1).items():
        by_layer[parent_layer(name)] = by_layer.get(parent_layer(name), 0) + nbytes
    if order == "plan":
        assert peaks == [max(by_layer.values())] * 2
    else:
        assert min(peaks) > max(by_layer.values()), "a shuffled source buffers several layers"


@pytest.mark.parametrize(("fused", "stream"), [(True, True), (True, False), (False, False)],
                         ids=["into-kernel", "into-a-scratch-to-quantize", "by-block-sums"])
def test_a_screened_copy_keeps_every_bit_and_finds_one_nan(fused, stream, monkeypatch):
    """A CPU rank screens a loader's copy of its window as it copies, instead of in a pass of
    its own: in the same pass by the built extension (streamed into kernel tensors, not into
    a scratch that quantization reads next), else block by block while each block is in
    cache. Each way the copy is exact (here from a strided window), one NaN is found
    wherever it is, and a param that something else also wrote is screened by a pass of
    its own."""
    if not fused:
        monkeypatch.setattr(copy_screen, "_copy_screen", None)
    rows, cols = 5 * BLOCK_BYTES // (256 * 4), 256  # fp32 rows: five blocks and more
    source = torch.randn(rows, 2 * cols)
    window = PrefetchedWeight((rows, 2 * cols), torch.float32,
                              {((0, n), (cols, 2 * cols)): source[:n, cols:]
                               for n in (rows, rows // 2)})
    target = torch.empty(rows, cols)

    def copied(write_rows: int = rows) -> torch.Tensor | None:
        with screening_copies(True, fused=True, stream=stream) as sums:
            # The loader's own call: the window's torch function routes it (actors.reload.meta).
            target[:write_rows].copy_(window.narrow(1, cols, cols).narrow(0, 0, write_rows))
        assert bool(sums.nonfinite) == fused and bool(sums.sums) != fused or not sums.nonfinite
        return sums.extremes(target, target.numel())

    assert copied() is finite.ALL_FINITE if fused else torch.equal(*copied().unbind())
    assert torch.equal(target, source[:, cols:])
    for row in (0, rows // 2, rows - 1):
        source[row, cols + 7] = float("nan")
        assert math.isnan(copied()[0]), f"NaN in row {row}"
        source[row, cols + 7] = 1.0
    # Half written by copies, half filled: the copies cover half, so the param gets its pass.
    target[rows // 2:].fill_(float("inf"))
    assert copied(rows // 2) is None
    assert screened_copy(target, source[:, :cols]) is None, "no screen is collecting"


def _layouts(rows: int, cols: int, dtype: torch.dtype) -> list[tuple]:
    """(window of a rows x cols source, target for it): the layouts the loaders make."""
    def unaligned(t: torch.Tensor) -> torch.Tensor:  # a target that starts mid cache line
        return torch.empty(t.numel() + 1, dtype=dtype)[1:].view(t.shape)

    return [(lambda t: t, torch.empty_like),
            (lambda t: t[:, cols // 3:cols - 3], unaligned),  # narrowed along dim 1
            (lambda t: t[:, 8:cols // 2 + 8],                 # into a param's rows
             lambda t: torch.empty(3 * rows, cols // 2, dtype=dtype)[rows:2 * rows]),
            (lambda t: t[rows // 4:rows // 2], torch.empty_like),
            (lambda t: t[5], unaligned),
            (lambda t: t.view(4, rows // 4, cols)[1:3, :, 10:cols - 7], torch.empty_like)]


@pytest.mark.parametrize(("rows", "cols", "stream"),
                         [(64, 96, True), (1280, 1000, False), (1280, 1000, True)],
                         ids=["small", "large", "large-streamed"])
def test_the_fused_copy_is_built_exact_and_finds_every_nan_and_inf(rows, cols, stream):
    """The extension that copies and screens in one pass (actors/copy_screen.c): it is
    built by the install, copies every bit of bf16, fp16 and fp32 through the layouts the
    loaders make (a param's rows, a window narrowed along either dim, 1-D, 3-D, a target
    not aligned to a cache line), with ordinary stores, and large ones into kernel tensors
    streamed around the cache,
    and says a NaN or Inf is there exactly when torch's isfinite does, wherever it is (no
    false alarm on the largest finite values or subnormals), bumping the target's version as
    copy_ does. Layouts it cannot take are left to torch (None)."""
    assert copy_screen._copy_screen is not None, "make install builds actors._copy_screen"
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        info = torch.finfo(dtype)
        full = (torch.randn(rows, cols, generator=generator) * 100).to(dtype)
        full[3, 5], full[7, 9] = info.max, -info.max
        full[11, 13] = info.smallest_normal / 4  # subnormal
        for window_of, target_for in _layouts(rows, cols, dtype):
            window = window_of(full)
            target = target_for(window)
            random = torch.randint(window.numel(), (1,), generator=generator).item()
            for special, flat in [(None, 0), *((s, at) for s in (math.nan, math.inf, -math.inf)
                                             for at in (0, random, window.numel() - 1))]:
                source = window.clone() if special is None else window
                if special is not None:
                    index = torch.unravel_index(torch.tensor(flat), window.shape)
                    saved = window[index].clone()
                    window[index] = special
                version = target._version
                found = copy_screen.copy_screened(target, source, stream)
                assert target._version > version, "written as copy_ writes: versioned"
                as_ints = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
                what = (dtype, tuple(window.shape), special, flat)
                assert torch.equal(target.view(as_ints), source.view(as_ints)), what
                assert found == bool((~torch.isfinite(source)).any()), what
                if special is not None:
                    window[index] = saved
    bf16 = torch.ones(4, 8, dtype=torch.bfloat16)
    assert copy_screen.copy_screened(torch.empty(4, 8), bf16) is None, "a conversion: torch"
    assert copy_screen.copy_screened(torch.empty(8, 4, dtype=torch.bfloat16), bf16.t()) is None
    rows_apart_unevenly = torch.ones(8, 8, 96, dtype=torch.bfloat16)[:, 2:6]
    assert copy_screen.copy_screened(torch.empty(8, 4, 96, dtype=torch.bfloat16),
                             rows_apart_unevenly) is None
    assert copy_screen.copy_screened(torch.empty(4, 8, dtype=torch.bfloat16),
                             bf16[:1].expand(4, 8)) is None, "a broadcast is torch's"


def test_a_streamed_copy_keeps_every_bit_of_2_and_4_byte_elements():
    """What a sender writes into the node's shared memory (``write_at``): large copies
    stream around the cache, any bit pattern (ints, NaN payloads) arrives as it was; other
    element sizes are left to torch."""
    generator = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.int16, torch.float32, torch.int32):
        bits = torch.randint(-2**15, 2**15, (1100, 999), generator=generator, dtype=torch.int32)
        source = bits.to(torch.int16).view(dtype) if dtype.itemsize == 2 else bits.view(dtype)
        for window in (source, source[:, 3:900]):
            target = torch.empty(window.numel() + 1, dtype=dtype)[1:].view(window.shape)
            assert copy_screen.copy_streamed(target, window), dtype
            assert torch.equal(target.view(torch.uint8), window.contiguous().view(torch.uint8))
    for dtype in (torch.int8, torch.int64):
        assert not copy_screen.copy_streamed(torch.empty(4, dtype=dtype),
                                             torch.zeros(4, dtype=dtype))


def test_a_loader_that_scales_what_it_copied_is_screened_by_a_pass_of_its_own():
    """The copy's block sums cover what was copied, not what the loader wrote after it: a
    finite value that the loader's in-place scale turns into Inf is still refused."""
    toy, engine, _ = build()

    def scaling_loader(param: torch.Tensor, loaded, shard_id=None) -> None:
        param.data.copy_(loaded)  # the window itself: a screened copy
        param.data.mul_(2.0)

    toy.first.weight.weight_loader = scaling_loader
    first_load(engine, weights(0))
    assert torch.equal(toy.first.weight, weights(0)["first.weight"] * 2)
    bad = weights(1)
    bad["first.weight"][1, 2] = 3e38  # finite; doubled, Inf
    engine.start("reload")
    with pytest.raises(ReloadError, match=r"contains Inf values .* found in first\.weight"):
        engine.load(bad.items())
        engine.finish()
