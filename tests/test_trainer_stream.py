"""Reloads straight from a trainer's Ray actors (``TrainerSource``): a 2-process FSDP2 trainer
on gloo writes its shards into the node's shared memory for a TP=2 engine, every trainer rank
writing, and streams them over a process group with the same bits; a trainer that dies
mid-bucket and a diverged trainer leave the engines bit-identical, both ways; checked against
transformers carrying the trainer's gathered weights."""

from __future__ import annotations

import math
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch

from actors.lazy import TensorEntry
from actors.transports.trainer_stream.schedule import schedule
from actors.transports.trainer_stream.trainer import ListedTrainer, _check_holdings
from orchestrator import CheckpointError, TrainerEndpoint, TrainerError, TrainerSource
from tests.support import (
    TensorTrainer,
    kernel_tensors,
    load_tensors,
    reference_logits,
    regions,
    rel_l2,
    start,
    unequal_tensors,
    write_checkpoint,
)

BOUND = 1e-4


def _box_numel(box) -> int:
    return math.prod(hi - lo for lo, hi in box)


def test_schedule_cuts_each_read_box_once_and_spreads_replicas():
    # 'w' (5, 4) is sharded by rows over two trainer ranks (3 + 2 rows, like torch.chunk);
    # 'b' (4,) is replicated on both. Engine rank 0 reads columns [0, 2), rank 1 [2, 4).
    holders = {"w": [(0, ((0, 3), (0, 4))), (1, ((3, 5), (0, 4)))],
               "b": [(0, ((0, 4),)), (1, ((0, 4),))]}
    listed = ListedTrainer(SimpleNamespace(actors=(None, None)), holders, on_cuda=False)
    infos = {"w": SimpleNamespace(torch_dtype=torch.float32, shape=(5, 4)),
             "b": SimpleNamespace(torch_dtype=torch.float32, shape=(4,))}
    plan = SimpleNamespace(buckets=[SimpleNamespace(tensors=[SimpleNamespace(name="w")]),
                                    SimpleNamespace(tensors=[SimpleNamespace(name="b")])])
    reads = ({"w": (((0, 5), (0, 2)),), "b": (((0, 2),),)},
             {"w": (((0, 5), (2, 4)),), "b": (((2, 4),),)})
    result = schedule(listed, plan, infos, reads, engines=2, first_link_rank=2)
    tags = [p.tag for ranks in result.sends for bucket in ranks for p in bucket]
    assert len(tags) == len(set(tags)), "tags must be unique"
    for (engine, rank), buckets in result.receives.items():
        for tensor, bucket in zip(("w", "b"), buckets, strict=True):
            (read_box,) = reads[rank][tensor]
            pieces = [p for p in bucket.pieces if p.name == tensor]
            # Disjoint pieces inside the read box that add up to it: it is received once.
            assert all(p.read_box == read_box for p in pieces)
            assert sum(_box_numel(p.box) for p in pieces) == _box_numel(read_box)
            for p in pieces:
                assert all(lo <= p_lo < p_hi <= hi for (lo, hi), (p_lo, p_hi)
                           in zip(read_box, p.box, strict=True))
        # Every piece a receiver expects is sent to it by the trainer rank it names.
        for bucket_index, bucket in enumerate(buckets):
            for piece in bucket.pieces:
                sent = result.sends[piece.src][bucket_index]
                assert any(s.tag == piece.tag and s.box == piece.box
                           and s.dst == 2 + engine * 2 + rank for s in sent)
    # Both trainer ranks send 'w' (each its rows); the replicated 'b' alternates.
    senders_of_b = [p.src for key in sorted(result.receives) for p in
                    result.receives[key][1].pieces]
    assert sorted(senders_of_b) == [0, 0, 1, 1]


def test_pieces_arrive_where_the_receiver_reads():
    """Two trainer ranks hold column halves of a bf16 matrix (the receiver's row box cuts
    both: pieces that are not one run of the box) and replicas of a scalar; a real gloo group
    of three members in threads. The receiver's windows equal the source slices bit for bit."""
    import threading

    import torch.distributed as dist

    from actors.transports.trainer_stream.wire import LinkAddress, receive_bucket, send_buckets

    full = {"w": torch.randn(6, 8).to(torch.bfloat16), "s": torch.tensor(2.5)}
    holders = {"w": [(0, ((0, 6), (0, 4))), (1, ((0, 6), (4, 8)))], "s": [(0, ()), (1, ())]}
    held = [{"w": (full["w"][:, :4], holders["w"][0][1]), "s": (full["s"], ())},
            {"w": (full["w"][:, 4:], holders["w"][1][1]), "s": (full["s"], ())}]
    listed = ListedTrainer(SimpleNamespace(actors=(None, None)), holders, on_cuda=False)
    infos = {"w": SimpleNamespace(torch_dtype=torch.bfloat16, shape=(6, 8)),
             "s": SimpleNamespace(torch_dtype=torch.float32, shape=())}
    plan = SimpleNamespace(buckets=[SimpleNamespace(tensors=[SimpleNamespace(name="w"),
                                                             SimpleNamespace(name="s")])])
    reads = ({"w": (((2, 5), (0, 8)), ((0, 1), (3, 6))), "s": ((),)},)
    plan_of = schedule(listed, plan, infos, reads, engines=1, first_link_rank=2)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    address = LinkAddress("127.0.0.1", store.port, "t/", 3, "gloo", 30.0)
    received, errors = [], []

    def member(rank: int) -> None:
        try:
            from actors.transports.trainer_stream.wire import join

            group = join(address, rank)
            if rank < 2:
                send_buckets(group, held[rank], plan_of.sends[rank])
            else:
                received.extend(receive_bucket(group, plan_of.receives[(0, 0)][0],
                                               torch.device("cpu")))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    weights = dict(received)
    for box in reads[0]["w"]:
        index = tuple(slice(lo, hi) for lo, hi in box)
        assert torch.equal(weights["w"]._read(box), full["w"][index])
    assert torch.equal(weights["s"]._read(()), full["s"])


def test_shared_region_holds_each_held_box_once_and_serves_every_read_box():
    """The shared-memory layout of a trainer's holdings: two ranks hold row halves of a bf16
    matrix that every TP rank reads a column slab of (each slab spans both halves), and
    replicas of a scalar. Each held box is written once, by one rank (the replicas take
    turns); a real region of /dev/shm, written as the trainer ranks would, read through the
    ranks' message: every read box equals the source slice bit for bit."""
    from actors.lazy import cut
    from actors.transports.base import BucketReader
    from actors.transports.regions import RegionPool, SharedBucket, write_at
    from actors.transports.trainer_stream.shared import layout

    full = {"w": torch.randn(6, 8).to(torch.bfloat16), "s": torch.tensor(2.5)}
    holders = {"w": [(0, ((0, 3), (0, 8))), (1, ((3, 6), (0, 8)))], "s": [(0, ()), (1, ())]}
    listed = ListedTrainer(SimpleNamespace(actors=(None, None)), holders, on_cuda=False)
    infos = {"w": SimpleNamespace(torch_dtype=torch.bfloat16, shape=(6, 8)),
             "s": SimpleNamespace(torch_dtype=torch.float32, shape=())}
    plan = SimpleNamespace(buckets=[SimpleNamespace(tensors=[SimpleNamespace(name="w")]),
                                    SimpleNamespace(tensors=[SimpleNamespace(name="s")])])
    reads = ({"w": (((0, 6), (0, 4)),), "s": ((),)}, {"w": (((0, 6), (4, 8)),), "s": ((),)})
    writes, where, nbytes = layout(listed, plan, infos, reads)
    written = [(p.name, p.box) for rank in writes for bucket in rank for p in bucket]
    assert sorted(written) == [("s", ()), ("w", ((0, 3), (0, 8))), ("w", ((3, 6), (0, 8)))]
    assert [[len(b) for b in rank] for rank in writes] in ([[1, 1], [1, 0]], [[1, 0], [1, 1]])
    assert nbytes >= full["w"].nbytes + full["s"].nbytes
    pool = RegionPool()
    try:
        lease = pool.lease(nbytes, "a test")
        for rank in writes:
            for bucket in rank:
                for piece in bucket:
                    source = full[piece.name]
                    whole = tuple((0, n) for n in source.shape)
                    write_at(lease.region.map, piece.offset, source[cut(piece.box, whole)])
        entries = [(TensorEntry("w", "bfloat16", (6, 8)),), (TensorEntry("s", "float32", ()),)]
        weights = {}
        for index, bucket_entries in enumerate(entries):
            message = SharedBucket(bucket_entries, lease.region.name, where[index])
            weights.update(message.read(BucketReader()))
        for rank_reads in reads:
            for name, boxes in rank_reads.items():
                for box in boxes:
                    index = tuple(slice(lo, hi) for lo, hi in box)
                    assert torch.equal(weights[name]._read(box), full[name][index])
        assert torch.equal(weights["w"]._read(((1, 5), (2, 3))), full["w"][1:5, 2:3])
    finally:
        pool.close()


def test_colocated_ranks_take_pieces_only_from_the_trainer_ranks_on_their_gpu():
    """CUDA IPC's schedule and take, on CPU tensors standing for the opened handles: two
    trainer ranks on GPUs A and B each hold all of a bf16 matrix and a scalar, and the engine
    rank on each GPU takes its column slab only from the trainer rank beside it, into boxes
    of its own (the trainer's later steps do not reach them). A tensor that GPU B's trainer
    rank holds only half of cannot be served on B: the NCCL stream carries that source."""
    from actors.lazy import cut
    from actors.transports.cuda_ipc import SharedPieces
    from actors.transports.trainer_stream.ipc import IpcBucket, gpu_senders, take_bucket
    from actors.transports.trainer_stream.schedule import NotHeldLocally

    full = {"w": torch.randn(6, 8).to(torch.bfloat16), "s": torch.tensor(2.5)}
    whole = {n: tuple((0, k) for k in t.shape) for n, t in full.items()}
    holders = {n: [(0, box), (1, box)] for n, box in whole.items()}
    listed = ListedTrainer(SimpleNamespace(actors=(None, None)), holders, on_cuda=True,
                           gpus=("GPU-A", "GPU-B"))
    infos = {"w": SimpleNamespace(torch_dtype=torch.bfloat16, shape=(6, 8)),
             "s": SimpleNamespace(torch_dtype=torch.float32, shape=())}
    plan = SimpleNamespace(buckets=[SimpleNamespace(tensors=[SimpleNamespace(name="w"),
                                                             SimpleNamespace(name="s")])])
    reads = ({"w": (((0, 6), (0, 4)),), "s": ((),)}, {"w": (((0, 6), (4, 8)),), "s": ((),)})
    senders = gpu_senders(listed, {(0, 0): "GPU-A", (0, 1): "GPU-B"})
    assert senders == {(0, 0): frozenset({0}), (0, 1): frozenset({1})}
    plan_of = schedule(listed, plan, infos, reads, 1, 0, senders)
    trainer = [{n: t.clone() for n, t in full.items()} for _ in range(2)]
    shared = [SharedPieces(0, tuple(trainer[rank][p.name][cut(p.box, whole[p.name])]
                                    for p in plan_of.sends[rank][0])) for rank in range(2)]
    slot = {p.tag: i for sends in plan_of.sends for i, p in enumerate(sends[0])}
    taken_by = {}
    for key, mine in ((0, 0), 0), ((0, 1), 1):
        taken = plan_of.receives[key][0]
        assert {p.src for p in taken.pieces} == {mine}
        bucket = IpcBucket(taken.entries, taken.pieces, tuple(slot[p.tag] for p in taken.pieces),
                           tuple(shared))
        taken_by[key] = dict(take_bucket(bucket, shared, torch.device("cpu"), lambda h, d: h))
    for held in trainer:
        held["w"].zero_()  # the trainer's next step
    for (_, rank), weights in taken_by.items():
        (box,) = reads[rank]["w"]
        assert torch.equal(weights["w"]._read(box), full["w"][cut(box, whole["w"])])
        assert torch.equal(weights["s"]._read(()), full["s"])
    rows = [(0, ((0, 3), (0, 8))), (1, ((0, 3), (0, 8))), (0, ((3, 6), (0, 8)))]
    half = ListedTrainer(listed.source, {"w": rows, "s": holders["s"]}, on_cuda=True,
                         gpus=listed.gpus)
    with pytest.raises(NotHeldLocally, match=r"engine 0 rank 1 reads .* of 'w', which no "
                                             r"trainer rank on its GPU holds"):
        schedule(half, plan, infos, reads, 1, 0, gpu_senders(half, {(0, 0): "GPU-A",
                                                                   (0, 1): "GPU-B"}))


def test_trainer_holdings_that_overlap_or_leave_gaps_are_refused():
    with pytest.raises(CheckpointError, match="'w'.*overlapping"):
        _check_holdings("w", (4, 2), [(0, ((0, 3), (0, 2))), (1, ((2, 4), (0, 2)))])
    with pytest.raises(CheckpointError, match="'w'.*hold only"):
        _check_holdings("w", (4, 2), [(0, ((0, 2), (0, 2)))])
    _check_holdings("w", (4, 2), [(0, ((0, 2), (0, 2))), (1, ((2, 4), (0, 2)))])


class FSDPTrainer(TrainerEndpoint):
    """One rank of a 2-process FSDP2 trainer on gloo: a transformers Llama, every decoder
    layer and the root ``fully_shard``-ed (rows split like ``torch.chunk``: the 251-row
    embedding gives 126 + 125)."""

    def __init__(self, rank: int, world: int, init_method: str, checkpoint: str) -> None:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard
        from transformers import AutoModelForCausalLM

        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        for layer in self.model.model.layers:
            fully_shard(layer)
        fully_shard(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)

    def step(self) -> float:
        tokens = torch.randint(0, 251, (4, 16), generator=torch.Generator().manual_seed(3))
        loss = self.model(tokens, labels=tokens).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()

    def tp_reload_weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Gathered over the trainer's ranks (a collective: call on every rank)."""
        return {n: t.full_tensor() for n, t in self.model.state_dict().items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serves(orch, weights: dict[str, torch.Tensor], config_dir: Path, prompt: torch.Tensor
            ) -> float:
    """Relative error of the engine's logits against transformers carrying ``weights``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model.load_state_dict(weights)
    with torch.no_grad():
        expected = model.float().eval()(prompt).logits
    return rel_l2(orch.forward(prompt), expected)


@pytest.mark.ray
@pytest.mark.slow
def test_fsdp2_trainer_reloads_its_shards_into_every_engine_rank(ray_cluster, tmp_path, prompt):
    """Through the node's shared memory (the trainer shares the driver's node), then the
    same weights over a process group: bit-identical kernel tensors, transformers' logits."""
    initial = write_checkpoint(tmp_path / "a", "llama", seed=20)
    init = f"tcp://127.0.0.1:{_free_port()}"
    remote = ray.remote(num_cpus=0)(FSDPTrainer)
    trainers = [remote.remote(rank, 2, init, str(initial)) for rank in range(2)]
    losses = ray.get([t.step.remote() for t in trainers])
    assert losses[0] == losses[1]
    with start(initial, 2, bucket_bytes=64 << 10) as orch:
        before = orch.inspect()
        report = orch.reload(TrainerSource(trainers))
        full = ray.get([t.full_weights.remote() for t in trainers])[0]
        assert report.transport == "shared_memory"
        assert orch.version == 1 and report.layers_kept == []
        assert _serves(orch, full, initial, prompt) <= BOUND
        assert orch.inspect() == before, "a kernel tensor moved"
        # Every trainer rank wrote its own shards (no rank funnels the other's bytes), and
        # together each byte of the source once, whatever the number of readers.
        sent = report.bytes_sent
        assert set(sent) == {0, 1} and min(sent.values()) > 0.3 * sum(sent.values())
        assert sum(sent.values()) == report.source_bytes
        assert report.peak_buffered_bytes <= report.predicted_peak_buffered_bytes
        through_shm = kernel_tensors(orch)

        orch.reload(str(initial))
        orch.config.shared_memory = False
        report = orch.reload(TrainerSource(trainers))
        assert report.transport == "trainer_stream"
        assert unequal_tensors(kernel_tensors(orch), through_shm) == []
        # Over the group each engine rank receives exactly its read boxes, each once.
        assert sum(report.bytes_sent.values()) == sum(report.bytes_read.values())

        # The trainer steps again and reloads again, both ways: nothing is kept per trainer.
        ray.get([t.step.remote() for t in trainers])
        orch.reload(TrainerSource(trainers))
        orch.config.shared_memory = True
        full = ray.get([t.full_weights.remote() for t in trainers])[0]
        assert _serves(orch, full, initial, prompt) <= BOUND
        assert orch.reload(TrainerSource(trainers)).transport == "shared_memory"
        assert _serves(orch, full, initial, prompt) <= BOUND
    for trainer in trainers:
        ray.kill(trainer)


@pytest.mark.ray
@pytest.mark.slow
def test_failed_trainer_reloads_leave_the_engines_bit_identical(ray_cluster, tmp_path, prompt,
                                                               monkeypatch, capsys):
    """Through shared memory and over a process group: a trainer that dies partway through
    a bucket rolls back to a version that came from a trainer; a diverged one is refused;
    nothing of the orchestrator's is left in /dev/shm once it closes. The progress line
    counts buckets, not the stream's link step."""
    monkeypatch.setattr("orchestrator.progress.PROGRESS_AFTER_S", 0.0)
    a, b, c = (write_checkpoint(tmp_path / n, "llama", seed=s)
               for n, s in (("a", 30), ("b", 31), ("c", 32)))
    remote = ray.remote(num_cpus=0)(TensorTrainer)
    left_before = regions()
    good = load_tensors(b)
    # One trainer process serves both carriers (a dying one is new each time): a process
    # start is the dearest part of this test.
    trainer = remote.remote(good)
    with start(a, 2, bucket_bytes=32 << 10) as orch:
        for shared, carrier in ((True, "shared_memory"), (False, "trainer_stream")):
            orch.config.shared_memory = shared
            capsys.readouterr()
            report = orch.reload(TrainerSource([trainer]))  # from a trainer
            assert report.transport == carrier
            shown = [line for line in capsys.readouterr().err.splitlines()
                     if line.startswith(f"load v{report.version}:")]
            assert shown and re.match(r".*: bucket (\d+)/\1, ", shown[-1]), shown
            assert _serves(orch, good, b, prompt) <= BOUND
            served, before = orch.forward(prompt), orch.inspect()
            committed = kernel_tensors(orch)

            dying = remote.remote(load_tensors(c), die_after_buckets=2)
            with pytest.raises(TrainerError, match="trainer rank 0") as info:
                orch.reload(TrainerSource([dying]))
            assert info.value.died, carrier
            # Rolled back by replaying what the node or the ranks kept of the last version.
            assert orch.inspect() == before
            assert unequal_tensors(kernel_tensors(orch), committed) == [], carrier
            assert torch.equal(orch.forward(prompt), served)
            # The region of the failed reload went back to the pool: the log's and a spare.
            assert len(regions() - left_before) <= 2

        diverged = load_tensors(c)
        diverged["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
        diverging = remote.remote(diverged)
        version = orch.version
        for shared in (True, False):
            orch.config.shared_memory = shared
            with pytest.raises(CheckpointError, match="down_proj.weight.*NaN"):
                orch.reload(TrainerSource([diverging]))
            assert orch.version == version and torch.equal(orch.forward(prompt), served)

        orch.config.shared_memory = True
        assert orch.reload(TrainerSource([remote.remote(load_tensors(c))])).version == version + 1
        assert _serves(orch, load_tensors(c), c, prompt) <= BOUND
        orch.reload(str(c))
        assert rel_l2(orch.forward(prompt), reference_logits(c, prompt)) <= BOUND
    assert regions() - left_before == set(), "the closed orchestrator left regions"
