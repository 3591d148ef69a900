"""A trainer colocated with a rank on one GPU hands its tensors over CUDA IPC (gpu marker;
no Ray, as on the GPU machine): the trainer is a separate process answering the calls the
driver would make, the rank is ``InProcessRank`` fed the messages the driver would send."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from actors.transports import BucketReader
from actors.transports.cuda_ipc import gpu_uuid
from actors.transports.trainer_stream.ipc import IpcBucket, IpcLink, gpu_senders
from actors.transports.trainer_stream.schedule import schedule
from actors.transports.trainer_stream.trainer import ListedTrainer
from actors.transports.trainer_stream.wire import KeptBucket
from tests.support import TensorTrainer, load_tensors, reference_logits, rel_l2, write_checkpoint
from tests.test_rank_in_process import InProcessRank

pytestmark = pytest.mark.gpu
STREAM = 7


def _trainer(path: str, requests, answers) -> None:  # noqa: ANN001 - multiprocessing queues
    """The trainer process: its tensors on the GPU, answering (method, args) calls with the
    answer and how much more device memory it holds than before the first call."""
    trainer = TensorTrainer({n: t.cuda() for n, t in load_tensors(Path(path)).items()})
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    while (request := requests.get()) is not None:
        method, args = request
        answers.put((getattr(trainer, method)(*args), torch.cuda.memory_allocated() - before))


def test_a_colocated_trainer_reloads_a_rank_over_cuda_ipc(tmp_path, prompt):
    """The trainer shares views of its tensors (its device memory does not grow), the rank
    takes its pieces and serves transformers' logits, bit-identical to a directory reload;
    after the trainer process is gone, the rank rebuilds that version from what it kept."""
    a = write_checkpoint(tmp_path / "a", "llama", seed=1)
    b = write_checkpoint(tmp_path / "b", "llama", seed=2)
    tensors = load_tensors(b)
    names = list(tensors)
    whole = {n: tuple((0, k) for k in t.shape) for n, t in tensors.items()}
    gpu = gpu_uuid(torch.device("cuda", 0))
    listed = ListedTrainer(SimpleNamespace(actors=(None,)),
                           {n: [(0, box)] for n, box in whole.items()}, on_cuda=True, gpus=(gpu,))
    infos = {n: SimpleNamespace(torch_dtype=t.dtype, shape=tuple(t.shape))
             for n, t in tensors.items()}
    plan = SimpleNamespace(buckets=[
        SimpleNamespace(tensors=[SimpleNamespace(name=n) for n in names[i:i + 4]])
        for i in range(0, len(names), 4)])
    plan_of = schedule(listed, plan, infos, ({n: (box,) for n, box in whole.items()},), 1, 0,
                       gpu_senders(listed, {(0, 0): gpu}))

    rank = InProcessRank(a, "cuda")
    context = torch.multiprocessing.get_context("spawn")
    requests, answers = context.Queue(), context.Queue()
    trainer = context.Process(target=_trainer, args=(str(b), requests, answers))
    trainer.start()
    try:
        reader = BucketReader(device=rank.device)
        IpcLink(STREAM).open(reader)
        rank.engine.start("reload")
        grown = []
        for index, sends in enumerate(plan_of.sends[0]):
            requests.put(("tp_reload_share", ("stream", sends)))
            shared, growth = answers.get(timeout=120)
            grown.append(growth)
            taken = plan_of.receives[(0, 0)][index]
            slot = {p.tag: i for i, p in enumerate(sends)}
            rank.engine.load(reader.items(IpcBucket(
                taken.entries, taken.pieces, tuple(slot[p.tag] for p in taken.pieces),
                (shared,))))
        rank.engine.finish()
        reader.close()
        requests.put(("tp_reload_release", ("stream",)))
        answers.get(timeout=120)
        requests.put(None)
        trainer.join(120)
    finally:
        if trainer.is_alive():
            trainer.kill()
    assert trainer.exitcode == 0
    assert grown == [0] * len(plan.buckets), "sharing copied on the trainer's side"
    assert rel_l2(rank.forward(prompt), reference_logits(b, prompt)) <= 1e-4
    oracle = {n: t.cpu() for n, t in InProcessRank(b, "cuda").kernel().items()}

    def unequal() -> list[str]:
        return [n for n, t in rank.kernel().items() if not torch.equal(t.cpu(), oracle[n])]

    assert unequal() == []
    rank.load(a)
    assert unequal() != []
    kept = reader.to_keep
    assert kept is not None and kept[0] == STREAM
    replay = BucketReader({STREAM: kept[1]}, rank.device)
    rank.engine.start("reload")
    for index, bucket in enumerate(plan_of.receives[(0, 0)]):
        rank.engine.load(replay.items(KeptBucket(STREAM, index, bucket.entries)))
    rank.engine.finish()
    assert unequal() == [], "the kept copy did not outlive the trainer"
