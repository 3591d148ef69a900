"""GRPO on tp-reload: the loop RL users run, on the vLLM engine.

    python examples/grpo.py                        # vLLM TP=2, 40 steps; writes grpo.png
    python examples/grpo.py --engine native        # the native engine
    python examples/grpo.py --steps 3 --no-plot    # a short run

Every step:
  1. rollouts: ``n`` completions of each prompt from the engines (temperature 1, stopping at
     the model's EOS), each with its log-probs and the version that drew it;
  2. the train/inference mismatch: the trainer scores the same tokens on the weights it just
     sent (teacher forcing) and compares with the engines' log-probs: max and mean
     |trainer - engine| over every sampled token;
  3. rewards from a verifiable task, advantages normalized within each prompt's group;
  4. one optimizer step on the clipped policy-gradient loss, whose importance ratio uses the
     rollouts' log-probs;
  5. ``orch.reload(TrainerSource(trainers))``: both trainer ranks stream their FSDP2 shards
     straight to the engine ranks.

The trainer is two Ray actors holding one small Llama with FSDP2 (gloo on CPU). The task:
answer a prompt with its last token, then stop (``EchoTask``: graded credit for the first
token's closeness, 0.5 more for the EOS right after it).
The run fails unless the mismatch stays within its bound at every step (1e-4 in float32) and
unless the mean reward of the last quarter of the steps beats the first quarter's (runs of 8
steps or more).
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from orchestrator import EngineConfig, ReloadOrchestrator, TrainerEndpoint, TrainerSource
from orchestrator.rollouts import Rollouts
from orchestrator.scratch import local_ray, owned_temp_dir

# float32 engines and the float32 trainer compute the same function: only summation order
# differs. A bfloat16 or FP8 engine is compared with the float32 trainer: loose stated bounds.
MISMATCH_BOUND = {"float32": 1e-4, "bfloat16": 0.1, "fp8_per_channel": 0.5}


@dataclass(frozen=True, slots=True)
class Settings:
    """One GRPO run."""

    steps: int = 40
    prompts: int = 16
    """Prompts per step."""
    group: int = 8
    """Completions per prompt (GRPO's group)."""
    max_new_tokens: int = 4
    lr: float = 1e-2
    clip: float = 0.2
    """PPO clip range of the importance ratio."""
    seed: int = 0


class EchoTask:
    """Answer with the prompt's last token, then stop. Prompts are 3 to 6 words of a small
    alphabet (``WORDS`` token ids, EOS and BOS left out); tokens are numbers: the answer's
    first token earns 1 - |answer - target| / vocab_size (1 when exact), and EOS right after
    it 0.5 more. Verifiable and graded: a random model starts near 0.5, and a small one learns
    to answer within the alphabet, then the right word, then to stop."""

    WORDS = 8

    def __init__(self, vocab_size: int, eos: int, seed: int) -> None:
        self.vocab_size, self.eos = vocab_size, eos
        self.words = [t for t in range(2, vocab_size) if t != eos][:self.WORDS]
        self.rng = random.Random(seed)

    def prompts(self, count: int) -> list[list[int]]:
        return [self.rng.choices(self.words, k=self.rng.randint(3, 6)) for _ in range(count)]

    def reward(self, prompt: list[int], completion: list[int]) -> float:
        if not completion:
            return 0.0
        closeness = 1.0 - abs(completion[0] - prompt[-1]) / self.vocab_size
        return closeness + (0.5 if completion[1:2] == [self.eos] else 0.0)


class GRPOTrainer(TrainerEndpoint):
    """One rank of a 2-process FSDP2 trainer (gloo): every decoder layer and the root
    ``fully_shard``-ed; each rank holds half of every weight and streams it to the engines."""

    def __init__(self, rank: int, world: int, init_method: str, checkpoint: str,
                 lr: float) -> None:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard
        from transformers import AutoModelForCausalLM

        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        for layer in self.model.model.layers:
            fully_shard(layer)
        fully_shard(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)

    def tp_reload_weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def _logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        """Teacher-forced log-probs of each completion after its prompt (right-padded batch)."""
        width = max(len(p) + len(c) for p, c in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        mask = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, (prompt, completion) in enumerate(sequences):
            ids[row, :len(prompt) + len(completion)] = torch.tensor(prompt + completion)
            mask[row, :len(prompt) + len(completion)] = 1
        logprobs = torch.log_softmax(self.model(ids, attention_mask=mask).logits.float(), -1)
        return [logprobs[row, len(p) - 1:len(p) + len(c) - 1].gather(
                    -1, torch.tensor(c)[:, None])[:, 0]
                for row, (p, c) in enumerate(sequences)]

    @torch.no_grad()
    def score(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """The log-probs of the current weights (a collective: every rank calls it)."""
        self.model.eval()
        return [lp.tolist() for lp in self._logprobs(sequences)]

    def step(self, sequences: list[tuple[list[int], list[int]]], old: list[list[float]],
             advantages: list[float], clip: float) -> float:
        """One clipped policy-gradient step: ratio = exp(new - old) per token, the
        token-mean of -min(ratio * A, clip(ratio) * A)."""
        self.model.train()
        terms = []
        for new, before, advantage in zip(self._logprobs(sequences), old, advantages,
                                          strict=True):
            ratio = torch.exp(new - torch.tensor(before))
            clipped = torch.clamp(ratio, 1 - clip, 1 + clip)
            terms.append(-torch.minimum(ratio * advantage, clipped * advantage))
        loss = torch.cat(terms).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()


def start_trainers(checkpoint: Path, lr: float) -> list[Any]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    remote = ray.remote(num_cpus=0)(GRPOTrainer)
    return [remote.remote(rank, 2, init, str(checkpoint), lr) for rank in range(2)]


def group_advantages(rewards: list[float], group: int) -> list[float]:
    """Each reward minus its group's mean, over the group's standard deviation."""
    out = []
    for start in range(0, len(rewards), group):
        chunk = rewards[start:start + group]
        mean, std = statistics.fmean(chunk), statistics.pstdev(chunk)
        out += [(r - mean) / (std + 1e-4) for r in chunk]
    return out


def mismatch(out: Rollouts, scored: list[list[float]]) -> tuple[float, float]:
    """max and mean |trainer log-prob - engine log-prob| over every sampled token."""
    gaps = [abs(a - b) for c, s in zip(out, scored, strict=True)
            for a, b in zip(c.logprobs or [], s, strict=True)]
    return max(gaps), statistics.fmean(gaps)


def train(orch: Any, trainers: list[Any], task: EchoTask, settings: Settings,
          log: Any = print) -> list[dict[str, float]]:
    """The GRPO loop on engines already serving the trainers' weights; one row per step."""
    rows = []
    for step in range(1, settings.steps + 1):
        prompts = task.prompts(settings.prompts)
        out = orch.sample(prompts, settings.max_new_tokens, n=settings.group,
                          temperature=1.0, seed=settings.seed + step)
        sequences = [(prompts[c.prompt_index], c.token_ids) for c in out]
        scored = ray.get([t.score.remote(sequences) for t in trainers])[0]
        worst, mean_gap = mismatch(out, scored)
        rewards = [task.reward(p, c) for p, c in sequences]
        old = [c.logprobs for c in out]
        advantages = group_advantages(rewards, settings.group)
        loss = ray.get([t.step.remote(sequences, old, advantages, settings.clip)
                        for t in trainers])[0]
        report = orch.reload(TrainerSource(trainers))
        rows.append({"step": step, "reward": statistics.fmean(rewards), "loss": loss,
                     "version": report.version, "reload_s": report.seconds,
                     "mismatch_max": worst, "mismatch_mean": mean_gap,
                     "tokens": sum(len(c.token_ids) for c in out),
                     "rollout_version": min(out.versions)})
        log(format_row(rows[-1]))
    return rows


HEADER = (f"{'step':>4} {'reward':>7} {'loss':>8} {'version':>7} {'reload s':>9} "
          f"{'mismatch max':>13} {'mean':>9} {'tokens':>6}")


def format_row(row: dict[str, float]) -> str:
    return (f"{row['step']:>4} {row['reward']:>7.3f} {row['loss']:>8.4f} {row['version']:>7} "
            f"{row['reload_s']:>9.3f} {row['mismatch_max']:>13.2e} {row['mismatch_mean']:>9.2e} "
            f"{row['tokens']:>6}")


def verdict(rows: list[dict[str, float]], bound: float) -> list[str]:
    """What failed: a step whose mismatch exceeds ``bound``; a reward that did not rise."""
    failures = [f"step {r['step']}: mismatch {r['mismatch_max']:.2e} > {bound:.0e}"
                for r in rows if r["mismatch_max"] > bound]
    if len(rows) >= 8:
        quarter = len(rows) // 4
        first = statistics.fmean(r["reward"] for r in rows[:quarter])
        last = statistics.fmean(r["reward"] for r in rows[-quarter:])
        if last <= first:
            failures.append(f"the reward did not rise: {first:.3f} in the first quarter, "
                            f"{last:.3f} in the last")
    return failures


def write_checkpoint(path: Path, seed: int) -> Path:
    """A small random Llama (head size 32, which vLLM's CPU attention supports)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=1, initializer_range=0.05)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [r["reward"] for r in rows], marker="o")
    top.set_ylabel("mean reward")
    top.set_title("GRPO on tp-reload")
    bottom.semilogy(steps, [max(r["mismatch_max"], 1e-12) for r in rows], label="max")
    bottom.semilogy(steps, [max(r["mismatch_mean"], 1e-12) for r in rows], label="mean")
    bottom.set_ylabel("|trainer - engine| log-prob")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("vllm", "native"), default="vllm")
    parser.add_argument("--steps", type=int, default=Settings().steps)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--quantization", choices=("fp8_per_channel",), default=None,
                        help="re-quantize every reload (a bfloat16 engine)")
    parser.add_argument("--plot", type=Path, default=Path("grpo.png"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    with local_ray(include_dashboard=False, log_to_driver=False):
        return run(args)


def run(args: argparse.Namespace) -> int:
    settings = Settings(steps=args.steps)
    dtype = "bfloat16" if args.quantization else args.dtype
    bound = MISMATCH_BOUND[args.quantization or dtype]
    with owned_temp_dir("tpr-grpo-") as tmp:
        checkpoint = write_checkpoint(tmp / "step_0", settings.seed)
        config = EngineConfig(model=str(checkpoint), engine=args.engine,
                              tensor_parallel_size=args.tp, dtype=dtype,
                              quantization=args.quantization,
                              num_cpus_per_rank=0.5,
                              engine_args={"kv_cache_memory_bytes": 64 << 20}
                              if args.engine == "vllm" else {})
        trainers = start_trainers(checkpoint, settings.lr)
        begin = time.perf_counter()
        with ReloadOrchestrator(config) as orch:
            limits = orch.limits()
            print(f"GRPO: {args.engine} engine, TP={args.tp}, {dtype}, quantization="
                  f"{args.quantization}; FSDP2 trainer "
                  f"x 2; {settings.prompts} prompts x {settings.group} per step")
            print(HEADER)
            task = EchoTask(limits.vocab_size, limits.eos_token_ids[0], settings.seed)
            rows = train(orch, trainers, task, settings)
        for trainer in trainers:
            ray.kill(trainer)
    print(f"{len(rows)} steps in {time.perf_counter() - begin:.0f}s")
    if not args.no_plot:
        plot(rows, args.plot)
        print(f"reward and mismatch curves: {args.plot}")
    failures = verdict(rows, bound)
    for failure in failures:
        print(f"FAILED: {failure}")
    if not failures:
        print(f"OK: mismatch within {bound:.0e} at every step"
              + ("; the reward rose" if len(rows) >= 8 else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
