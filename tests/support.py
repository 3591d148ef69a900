"""Test support: small random checkpoints written with transformers (one per family, each
exercising an awkward shape), transformers references, and the TP shard rules restated from
first principles so the tests never check the project against itself."""

from __future__ import annotations

import json
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from actors.transports.trainer_stream.trainer import TrainerEndpoint

if TYPE_CHECKING:
    from orchestrator import ReloadOrchestrator

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

# family -> (config class name, model class name, config overrides, save options)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
    # llama3 rope scaling; vocab 251 divides neither 2 nor 4; sharded into several files.
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=251,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}),
        dict(max_shard_size="60KB")),
    # sliding window shorter than the test prompts.
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(vocab_size=128, sliding_window=6,
                                                           head_dim=16), {}),
    # q/k/v bias, tied embeddings.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(vocab_size=130, tie_word_embeddings=True),
              {}),
    # q/k norms, explicit head_dim with heads * head_dim != hidden_size.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(vocab_size=128, head_dim=32), {}),
    # MoE with q/k norms; layer 1 dense (mlp_only_layers), 8 experts of width 32, top-2
    # renormalized.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=128, head_dim=16, num_hidden_layers=3, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1], norm_topk_prob=True), {}),
    # MoE with w1/w3/w2 expert names under block_sparse_moe; 4 experts of width 32, top-2.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=128, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2), {}),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights around 1, biases non-zero), so a tensor loaded
    into the wrong place cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            param.copy_(noise + 1.0 if "norm" in name else noise * 1.5)


def write_checkpoint(path: Path, family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     **overrides: Any) -> Path:
    import transformers

    config_name, model_name, config_kwargs, save_kwargs = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**BASE, **config_kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    randomize(model, seed)
    model.to(dtype).save_pretrained(path, **save_kwargs)
    return path


def reference_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def reference_logits(path: Path, token_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference_model(path)(token_ids).logits


def reference_generate(path: Path, token_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy, exactly ``new_tokens`` tokens: EOS does not stop a sequence (nor the engine)."""
    model = reference_model(path)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        return model.generate(
            token_ids, attention_mask=torch.ones_like(token_ids), max_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0,
        )


def reference_sample(path: Path, token_ids: torch.Tensor, new_tokens: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' greedy tokens [B, N] (no EOS stop) and each token's log-prob under its
    float32 forward [B, N]: what ``sample(temperature=0)`` must return."""
    # Imported here: the driver side needs Ray, and the GPU machine's rank-side tests run
    # without it (this module must import there).
    from orchestrator.demo import transformers_greedy, transformers_logprobs

    tokens = transformers_greedy(path, token_ids, new_tokens)
    return tokens, transformers_logprobs(path, token_ids, tokens)


class Fixed(NamedTuple):
    """The completions of an ``ignore_eos`` call (all ``max_new_tokens`` long) as tensors."""

    tokens: torch.Tensor
    """[B * n, N] int64."""
    logprobs: torch.Tensor
    """[B * n, N] float32."""
    version: int
    cached_tokens: list[int]


def fixed_length(out: Any) -> Fixed:
    tokens, logprobs, mask = out.padded()
    assert bool(mask.all()), "an ignore_eos completion stopped early"
    (version,) = out.versions
    return Fixed(tokens, logprobs, version, [c.cached_tokens for c in out])


def sample_fixed(server: Any, prompts: Any, max_new_tokens: int, **kwargs: Any) -> Fixed:
    """``server.sample`` with no stop token: exactly ``max_new_tokens`` per completion, as
    the transformers references (``reference_sample``) draw them."""
    return fixed_length(server.sample(prompts, max_new_tokens, ignore_eos=True, **kwargs))


def serves(orch: Any, path: Path, prompt: torch.Tensor, new_tokens: int = 6) -> bool:
    """Greedy tokens equal transformers' on ``path`` and log-probs within 1e-4."""
    got = sample_fixed(orch, prompt, new_tokens, temperature=0)
    tokens, logprobs = reference_sample(path, prompt, new_tokens)
    return (torch.equal(got.tokens, tokens)
            and (got.logprobs - logprobs).abs().max().item() <= 1e-4)


def generate_fixed(server: Any, prompts: torch.Tensor, max_new_tokens: int,
                   engine: int | None = None) -> torch.Tensor:
    """[B, T + N]: the prompts and exactly ``max_new_tokens`` greedy tokens, as
    ``reference_generate`` returns them."""
    out = server.generate(prompts, max_new_tokens, ignore_eos=True, engine=engine)
    return torch.cat([prompts, fixed_length(out).tokens], dim=1)


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


# vLLM engines in tests: a small KV cache (the default is 1 GiB per rank).
VLLM_ARGS = {"kv_cache_memory_bytes": 64 << 20}


def start(path: Path, tp: int, **kwargs: Any) -> ReloadOrchestrator:
    """An orchestrator (not yet started) on the session's Ray; float32 unless told."""
    from orchestrator import EngineConfig, ReloadOrchestrator

    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("num_cpus_per_rank", 0.5)
    if kwargs.get("engine") == "vllm":
        kwargs.setdefault("engine_args", VLLM_ARGS)
    return ReloadOrchestrator(EngineConfig(model=str(path), tensor_parallel_size=tp, **kwargs))


def serving(orch: ReloadOrchestrator, path: Path) -> ReloadOrchestrator:
    """``orch`` serving the checkpoint directory ``path``: reloaded to it unless its last
    load was that directory (a shared engine between tests)."""
    if orch.last_report.source != str(path):
        orch.reload(str(path))
    return orch


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
EXPERT = re.compile(r"\.experts\.\d+\.")


def parent_layer(name: str) -> str:
    """Checkpoint name -> the engine module that owns its (fused) parameter; every expert
    of a MoE layer belongs to one module, ``<block>.experts``."""
    expert = EXPERT.search(name)
    if expert:
        return name[: expert.start()] + ".experts"
    module = name.rsplit(".", 1)[0]
    head, _, last = module.rpartition(".")
    return f"{head}.{FUSED.get(last, last)}" if head else module


def rank_bytes(name: str, shape: tuple[int, ...], itemsize: int, config: dict, tp: int,
               rank: int) -> int:
    """Bytes of one checkpoint tensor that rank ``rank`` of ``tp`` must hold: vocab rows split
    after padding to a multiple of tp; k/v split over KV heads, one head per rank when tp
    exceeds them; q, gate, up (experts' w1/w3 too) and the input side of o/down (experts'
    w2) split evenly; norms, routers and row-parallel biases whole."""
    numel = math.prod(shape)
    if "embed_tokens" in name or "lm_head" in name:
        rows = math.ceil(shape[0] / tp)
        return max(0, min(rows, shape[0] - rank * rows)) * shape[1] * itemsize
    if re.search(r"\.(k_proj|v_proj)\.", name):
        return numel // min(tp, config["num_key_value_heads"]) * itemsize
    if re.search(r"\.(q_proj|gate_proj|up_proj|w1|w3)\.", name) or re.search(
            r"\.(o_proj|down_proj|w2)\.weight$", name):
        return numel // tp * itemsize
    return numel * itemsize


def expected_rank_bytes(path: Path, tp: int, rank: int) -> dict[str, int]:
    """Checkpoint tensor name -> bytes rank ``rank`` must read of it."""
    config = json.loads((path / "config.json").read_text())
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                itemsize = 2 if tensor.get_dtype() in ("BF16", "F16") else 4
                out[name] = rank_bytes(name, tuple(tensor.get_shape()), itemsize, config, tp, rank)
    return out


def largest_layer_rank_bytes(path: Path, tp: int) -> int:
    per_layer: dict[tuple[str, int], int] = {}
    for rank in range(tp):
        for name, nbytes in expected_rank_bytes(path, tp, rank).items():
            key = (parent_layer(name), rank)
            per_layer[key] = per_layer.get(key, 0) + nbytes
    return max(per_layer.values())


def write_shuffled(source: Path, target: Path, files: int, seed: int) -> Path:
    """The same tensors as ``source``, scattered at random over ``files`` files + an index."""
    tensors = load_tensors(source)
    names = list(tensors)
    random.Random(seed).shuffle(names)
    target.mkdir(parents=True)
    weight_map = {}
    for i in range(files):
        file = f"shuffled-{i:02d}.safetensors"
        part = names[i::files]
        save_file({n: tensors[n] for n in part}, target / file)
        weight_map.update(dict.fromkeys(part, file))
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (target / "config.json").write_text((source / "config.json").read_text())
    return target


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs on this machine (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it exited between open and read
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@dataclass(frozen=True, slots=True)
class Answer:
    begin: float
    end: float
    value: Any


class Server(threading.Thread):
    """Calls ``serve`` (a forward, a sample) back to back until stopped, keeping every
    answer with its start and end times: a rollout worker beside a staged reload."""

    def __init__(self, serve: Callable[[], Any]) -> None:
        super().__init__()
        self.serve = serve
        self.answers: list[Answer] = []
        self.errors: list[BaseException] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            begin = time.perf_counter()
            try:
                value = self.serve()
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                self.errors.append(exc)
                return
            self.answers.append(Answer(begin, time.perf_counter(), value))

    def stop(self) -> list[Answer]:
        self._stop_event.set()
        self.join(timeout=60)
        assert not self.errors, f"serving failed: {self.errors}"
        return self.answers


def within(answers: list[Answer], begin: float, end: float) -> list[Answer]:
    """The answers that began and ended between ``begin`` and ``end``."""
    return [a for a in answers if a.begin >= begin and a.end <= end]


def reload_until_paused(orch: ReloadOrchestrator, source: Any, signal: Path, never_paused: str,
                        **reload_args: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``orch.reload(source, **reload_args)`` in a thread until the rank told to pause
    touches ``signal``; the reload's report or error lands in the returned list."""
    outcome: list[Any] = []

    def reload() -> None:
        try:
            outcome.append(orch.reload(source, **reload_args))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=reload)
    worker.start()
    deadline = time.monotonic() + 60
    while not signal.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert signal.exists(), never_paused
    return worker, outcome


def kill_rank(orch: ReloadOrchestrator, pid: int, rank: int, engine: int = 0,
              timeout_s: float = 60) -> None:
    """Kill a rank actor and return once its process is gone. ``ray.kill`` is asynchronous:
    without the wait, the next call could still be served by the old process. After this,
    a call meets a dead or restarted (empty) rank, never the old one."""
    import ray

    ray.kill(orch.engines[engine].ranks[rank], no_restart=False)
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"rank {rank} (pid {pid}) still alive {timeout_s}s after "
                                 "ray.kill")
        time.sleep(0.02)


class TensorTrainer(TrainerEndpoint):
    """A one-rank trainer holding full tensors (on ``device``); with ``die_after_buckets``, its
    process dies partway through that bucket of a reload (whichever way the reload carries
    it)."""

    def __init__(self, tensors: dict[str, torch.Tensor], die_after_buckets: int | None = None,
                 device: str = "cpu") -> None:
        self.tensors = {n: t.to(device) for n, t in tensors.items()}
        self.die_after_buckets = die_after_buckets
        self.writes = 0

    def tp_reload_weights(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def tp_reload_send(self, address, rank, buckets):
        if self.die_after_buckets is None:
            return super().tp_reload_send(address, rank, buckets)
        # Sends the first buckets, then the process dies while the engines still wait.
        super().tp_reload_send(address, rank, buckets[:self.die_after_buckets])
        os._exit(1)

    def tp_reload_write(self, stream, region, pieces, last):
        if self.writes == self.die_after_buckets:
            # Writes half of the bucket's pieces, then the process dies mid-bucket.
            super().tp_reload_write(stream, region, pieces[:len(pieces) // 2], False)
            os._exit(1)
        self.writes += 1
        return super().tp_reload_write(stream, region, pieces, last)

    def tp_reload_share(self, stream, pieces):
        if self.writes == self.die_after_buckets:
            os._exit(1)  # dies before sharing the bucket, after the ranks opened earlier ones
        self.writes += 1
        return super().tp_reload_share(stream, pieces)


def kernel_tensors(orch: ReloadOrchestrator) -> list[dict[str, torch.Tensor]]:
    """Every rank's kernel tensors of engine 0."""
    return [orch.get_tensors(rank=r) for r in range(orch.config.tensor_parallel_size)]


def unequal_tensors(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]
                    ) -> list[tuple[int, str]]:
    """(rank, name) of every kernel tensor that differs between two ``kernel_tensors``."""
    assert [r.keys() for r in a] == [r.keys() for r in b]
    return [(rank, n) for rank, (x, y) in enumerate(zip(a, b, strict=True)) for n in x
            if not torch.equal(x[n], y[n])]


def regions() -> set[str]:
    """tp-reload's regions for in-memory and trainer sources in /dev/shm now."""
    from actors import node_shm

    return {name for names in node_shm.instances().values() for name in names
            if "-region" in name}
