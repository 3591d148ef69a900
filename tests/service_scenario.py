"""Run as a subprocess by test_service.py: an RL driver (its own Ray connection, apart from
the session's) that plays the trainer and the client of a `tp-reload serve` job. Writes
step_1 and marks it, writes step_2 and leaves it unmarked for a while, then marks it; records
the versions the client sees and checks the served greedy rollouts against transformers (the
largest |log-prob difference|; the engine serves tokens and log-probs, not logits). Prints
one JSON line with what the test asserts."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from orchestrator import connect
from orchestrator.demo import transformers_logprobs
from tests.support import write_checkpoint

MARKER = "COMPLETE"


def wait_for_version(client, version: int, timeout_s: float = 120.0) -> float:
    begin = time.monotonic()
    while client.version < version:
        if time.monotonic() - begin > timeout_s:
            raise TimeoutError(f"version {version} not served after {timeout_s}s")
        time.sleep(0.2)
    return time.monotonic() - begin


def main(address: str, name: str, namespace: str, watch: str, unmarked_s: str) -> None:
    watch_dir = Path(watch)
    client = connect(name, namespace=namespace, address=address, wait_s=180)
    prompt = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(8))

    def error(step: Path) -> float:
        """Served greedy log-probs against transformers' log-probs of the same tokens."""
        served = client.generate(prompt, max_new_tokens=4, ignore_eos=True)
        tokens, logprobs, _ = served.padded()
        expected = transformers_logprobs(step, prompt, tokens)
        return (logprobs - expected).abs().max().item()

    seen = {"start": client.version}

    step1 = write_checkpoint(watch_dir / "step_1", "llama", seed=72, head_dim=32)
    (step1 / MARKER).touch()
    seen["step_1_after_s"] = wait_for_version(client, 1)
    seen["after_step_1"] = client.version
    error_1 = error(step1)

    step2 = write_checkpoint(watch_dir / "step_2", "llama", seed=73, head_dim=32)  # unmarked
    time.sleep(float(unmarked_s))
    seen["step_2_unmarked"] = client.version
    (step2 / MARKER).touch()
    wait_for_version(client, 2)
    seen["after_step_2"] = client.version
    error_2 = error(step2)
    greedy = client.generate(prompt, max_new_tokens=4, ignore_eos=True)
    rollouts = [client.sample(prompt, 4, n=2, temperature=1.0, seed=3) for _ in range(2)]
    status = client.status()
    print(json.dumps({
        "versions": seen, "status": status,
        "errors": {"step_1": error_1, "step_2": error_2},
        "generated_shape": list(greedy.padded()[0].shape),
        "rollout": {"versions": sorted(rollouts[0].versions),
                    "completions": len(rollouts[0]),
                    "seeded_repeats": [c.token_ids for c in rollouts[0]]
                    == [c.token_ids for c in rollouts[1]]},
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
