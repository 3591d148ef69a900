"""Reloads straight from a trainer's Ray actors (``TrainerSource``): a 2-process FSDP2 trainer
on gloo streams its shards to a TP=2 engine, every trainer rank sending; a trainer that dies
mid-stream and a diverged stream leave the engines bit-identical; checked against
transformers carrying the trainer's gathered weights."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch

from actors.transports.trainer_stream.schedule import schedule
from actors.transports.trainer_stream.trainer import ListedTrainer, _check_holdings
from orchestrator import CheckpointError, TrainerEndpoint, TrainerError, TrainerSource
from tests.support import load_tensors, reference_logits, rel_l2, start, write_checkpoint

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


class Holder(TrainerEndpoint):
    """A one-rank trainer holding full tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor], die_after_buckets: int | None = None
                 ) -> None:
        self.tensors = tensors
        self.die_after_buckets = die_after_buckets

    def tp_reload_weights(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def tp_reload_send(self, address, rank, buckets):
        if self.die_after_buckets is None:
            return super().tp_reload_send(address, rank, buckets)
        # Sends the first buckets, then the process dies while the engines still wait.
        super().tp_reload_send(address, rank, buckets[:self.die_after_buckets])
        os._exit(1)


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
def test_fsdp2_trainer_streams_its_shards_to_every_engine_rank(ray_cluster, tmp_path, prompt):
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
        assert orch.version == 1 and report.layers_kept == []
        assert _serves(orch, full, initial, prompt) <= BOUND
        assert orch.inspect() == before, "a kernel tensor moved"
        # Every trainer rank sent its own shards (no rank funnels the other's bytes), and
        # together exactly the bytes the engine ranks read: each read box once.
        sent = report.bytes_sent
        assert set(sent) == {0, 1} and min(sent.values()) > 0.3 * sum(sent.values())
        assert sum(sent.values()) == sum(report.bytes_read.values())
        assert report.peak_buffered_bytes <= report.predicted_peak_buffered_bytes
        # The trainer steps again and streams again: the group is formed per reload.
        ray.get([t.step.remote() for t in trainers])
        orch.reload(TrainerSource(trainers))
        full = ray.get([t.full_weights.remote() for t in trainers])[0]
        assert _serves(orch, full, initial, prompt) <= BOUND
    for trainer in trainers:
        ray.kill(trainer)


@pytest.mark.ray
@pytest.mark.slow
def test_failed_streams_leave_the_engines_bit_identical(ray_cluster, tmp_path, prompt):
    a, b, c = (write_checkpoint(tmp_path / n, "llama", seed=s)
               for n, s in (("a", 30), ("b", 31), ("c", 32)))
    remote = ray.remote(num_cpus=0)(Holder)
    with start(a, 2, bucket_bytes=32 << 10) as orch:
        good = load_tensors(b)
        orch.reload(TrainerSource([remote.remote(good)]))  # version 1 comes from a trainer
        assert _serves(orch, good, b, prompt) <= BOUND
        served, before = orch.forward(prompt), orch.inspect()

        dying = remote.remote(load_tensors(c), die_after_buckets=2)
        with pytest.raises(TrainerError, match="trainer rank 0") as info:
            orch.reload(TrainerSource([dying]))
        assert info.value.died
        # Rolled back by replaying what the ranks kept of version 1's stream.
        assert orch.version == 1 and orch.inspect() == before
        assert torch.equal(orch.forward(prompt), served)

        diverged = load_tensors(c)
        diverged["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
        with pytest.raises(CheckpointError, match="down_proj.weight.*NaN"):
            orch.reload(TrainerSource([remote.remote(diverged)]))
        assert orch.version == 1 and torch.equal(orch.forward(prompt), served)

        orch.reload(str(c))
        assert rel_l2(orch.forward(prompt), reference_logits(c, prompt)) <= BOUND
