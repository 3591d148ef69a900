"""Engines and transports are plugins: a third engine and a fourth transport, each a few
lines in this file, registered from outside the package (no orchestrator file changes), and
reloaded through the real orchestrator on the session's Ray cluster.

Oracles: plain torch (``load_state_dict`` into the same model, its own forward) for the
engine, transformers for the native engine reloaded through the new transport."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from actors.dtypes import SAFETENSORS_CODES, dtype_name
from actors.engines import EnginePlugin, register_engine
from actors.engines.runtime import RankRuntime, Request, ServingLimits, Update
from actors.lazy import TensorEntry, TensorWindow
from actors.reload import LayerRecord, ReloadableModel, ReloadError, in_processing_order
from actors.transports import BucketMessage, BucketTransport, Source, TensorInfo, register_transport
from actors.transports.base import BucketReader, Items
from orchestrator import CheckpointError
from tests.support import load_tensors, reference_logits, rel_l2, start, write_checkpoint

pytestmark = pytest.mark.ray
VOCAB = 8

# ---- a third engine: one rank serving a plain torch MLP ------------------------------------


class TinyMLP(nn.Module):
    """Next-token logits from the one-hot of the last token: the whole model."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(VOCAB, 16)
        self.down = nn.Linear(16, VOCAB)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        x = nn.functional.one_hot(token_ids[:, -1] % VOCAB, VOCAB).float()
        return self.down(torch.relu(self.up(x)))


def greedy(model: nn.Module, token_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    ids = token_ids
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(ids).argmax(-1, keepdim=True)], dim=1)
    return ids[:, token_ids.shape[1]:]


def load_whole(param: torch.Tensor, loaded: Any, shard_id: Any = None) -> None:
    """The reload contract: a weight that does not fit is a ReloadError naming it."""
    if tuple(loaded.shape) != tuple(param.shape):
        raise ReloadError(f"'{loaded.name}' has shape {tuple(loaded.shape)}, the model "
                          f"{tuple(param.shape)}")
    param.data.copy_(loaded)


class MLPReloadable(ReloadableModel):
    def __init__(self, model: TinyMLP) -> None:
        self.model = model
        for param in model.parameters():
            param.requires_grad_(False)
            param.weight_loader = load_whole
        self._records = in_processing_order([
            LayerRecord(name, module, dict(module.named_parameters()), owners={},
                        restore_device=torch.device("cpu"))
            for name, module in (("up", model.up), ("down", model.down))])

    def records(self) -> list[LayerRecord]:
        return self._records

    def load_weights(self, weights: Any) -> None:
        params = dict(self.model.named_parameters())
        for name, weight in weights:
            params[name].weight_loader(params[name], weight)

    def process(self, record: LayerRecord) -> None:
        pass  # served as loaded


class MLPRuntime(RankRuntime):
    def __init__(self, options: Any, context: Any) -> None:
        super().__init__(options, context)
        with torch.device("meta"):
            self.model = TinyMLP()
        self._reloadable = MLPReloadable(self.model)
        self.active: dict[str, tuple[Request, list[int]]] = {}

    def rendezvous(self) -> tuple[str, int]:
        return "", 0  # one rank: nobody to meet

    def join(self, host: str, port: int, instance: str) -> None:
        pass

    def reloadable(self) -> ReloadableModel:
        return self._reloadable

    # A greedy batch without a KV cache: every step computes each request's whole context.

    def admit(self, request: Request, version: int) -> None:
        self.active[request.request_id] = (request, [])

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.active.pop(request_id, None)

    def has_work(self) -> bool:
        return bool(self.active)

    def running(self) -> list[str]:
        return list(self.active)

    @torch.inference_mode()
    def step(self) -> list[Update]:
        updates = []
        for request_id, (request, tokens) in list(self.active.items()):
            logits = self.model(torch.tensor([request.prompt + tokens]))[0]
            tokens.append(int(logits.argmax()))
            score = float(torch.log_softmax(logits, dim=-1)[tokens[-1]])
            done = len(tokens) == request.sampling.max_new_tokens
            if done:
                del self.active[request_id]
            updates.append(Update(request_id, tokens[-1:],
                                  [score] if request.sampling.logprobs else [],
                                  "length" if done else None, 0))
        return updates

    def recompute(self) -> None:
        pass  # nothing cached

    def limits(self) -> ServingLimits:
        # A plain state dict, no config.json to read them from.
        return ServingLimits(vocab_size=VOCAB, context_length=64, eos_token_ids=())

    def kernel_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())


class MLPEngine(EnginePlugin):
    name = "plain-mlp"
    runtime = "tests.test_plugins:MLPRuntime"


def mlp_checkpoint(path, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = {n: t.detach().clone() for n, t in TinyMLP().state_dict().items()}
    path.mkdir()
    save_file(state, str(path / "model.safetensors"))
    return state


def test_a_third_engine_registered_from_outside_is_served_and_reloaded(ray_cluster, tmp_path):
    register_engine(MLPEngine())
    first, second = (mlp_checkpoint(tmp_path / f"step{i}", seed=i) for i in range(2))
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    oracle = TinyMLP()
    with start(tmp_path / "step0", tp=1, engine="plain-mlp") as orch:
        oracle.load_state_dict(first)
        assert torch.equal(orch.generate(prompt, 4).padded()[0], greedy(oracle, prompt, 4))
        report = orch.reload(second)  # in memory, routed on the engine's own rank
        oracle.load_state_dict(second)
        assert report.version == orch.version == 1
        served = orch.get_tensors()
        assert served.keys() == second.keys()
        assert all(torch.equal(served[n], t) for n, t in second.items())
        assert torch.equal(orch.generate(prompt, 4).padded()[0], greedy(oracle, prompt, 4))
        with pytest.raises(NotImplementedError, match="not raw logits"):
            orch.forward(prompt)  # it declares no 'logits' capability
        with pytest.raises(CheckpointError, match="down.weight"):
            orch.reload({**second, "down.weight": torch.zeros(3, 3)})
        assert orch.version == 1 and torch.equal(orch.get_tensor("down.weight"),
                                                 second["down.weight"])


# ---- a fourth transport: tensors carried inside the bucket message itself -------------------


class Inline:
    """A reload source this transport alone accepts: tensors by name."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors


@dataclass(frozen=True, slots=True)
class InlineBucket(BucketMessage):
    entries: tuple[TensorEntry, ...]
    tensors: tuple[torch.Tensor, ...]

    def read(self, reader: BucketReader) -> Items:
        return [(e.name, TensorWindow(e.name, t)) for e, t in zip(self.entries, self.tensors,
                                                                    strict=True)]


class InlineTransport(BucketTransport):
    name = "inline"

    def accepts(self, source: Any) -> bool:
        return isinstance(source, Inline)

    def open(self, source: Any, timeout_s: float) -> Source:
        infos = tuple(TensorInfo(n, tuple(t.shape), SAFETENSORS_CODES[t.dtype], t.nbytes, None)
                      for n, t in source.tensors.items())
        return Source(self, infos, f"inline: {len(infos)} tensors", source.tensors)

    def send(self, source: Source, bucket: Any) -> InlineBucket:
        names = [t.name for t in bucket.tensors]
        tensors = source.handle
        return InlineBucket(tuple(TensorEntry(n, dtype_name(tensors[n].dtype),
                                              tuple(tensors[n].shape)) for n in names),
                            tuple(tensors[n] for n in names))


def test_a_transport_registered_from_outside_carries_reloads_and_rollbacks(
        ray_cluster, checkpoints, prompt, tmp_path):
    register_transport(InlineTransport())
    base, new = checkpoints["llama"], write_checkpoint(tmp_path / "llama-b", "llama", seed=7)
    with start(base, tp=2, bucket_bytes=64 << 10) as orch:  # several buckets
        report = orch.reload(Inline(load_tensors(new)))
        assert report.source == f"inline: {len(load_tensors(new))} tensors"
        assert report.buckets > 1 and not report.layers_kept
        assert rel_l2(orch.forward(prompt), reference_logits(new, prompt)) < 1e-5
        kept = orch.transaction.log.entries
        assert len(kept) == 1 and all(isinstance(m, InlineBucket) for m in kept[0].messages)
        # A bad reload rolls back by replaying what the commit log kept: the inline messages.
        bad = {n: t.clone() for n, t in load_tensors(new).items()}
        bad["model.norm.weight"][0] = float("nan")
        with pytest.raises(CheckpointError, match="model.norm.weight"):
            orch.reload(bad)
        assert orch.version == 1
        assert rel_l2(orch.forward(prompt), reference_logits(new, prompt)) < 1e-5
