"""One rank's reload in one process, without Ray, against that rank's floor in the same
process: the rank side of a ``dir`` reload, stage by stage, for measuring a change to the
reload engine (``benchmarks.reload_bench`` measures the whole system).

    python -m benchmarks.rank_bench [--size 0.5b|moe-0.25b] [--tp 2] [--rank 0] [--reloads 12]
                                    [--quantization fp8] [--no-check-finite]

Rank ``--rank`` of a TP=``--tp`` native engine, unquantized unless ``--quantization`` names
an online quantization, on the CPU with one torch thread
(what a rank actor given one core has), loads the benchmark's checkpoint once, then reloads it
from the files ``--reloads`` times, each reload followed by the floor's work for the same rank
(``RankWork``: the files mapped, each window copied once into a model of its own), so both
meet the same machine state. Prints the minimum and median seconds of each, their ratio, and
the stages of our fastest reload.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from actors.engines.native import TPGroup, load_spec
from actors.engines.native.reloadable import build_reloadable
from actors.reload import RankReloadStats, ReloadEngine
from actors.transports import BucketReader
from actors.transports.files import FileBucket, checkpoint_inventory, file_entry
from benchmarks.baselines import RankWork
from benchmarks.checkpoints import MOE_SIZES, SIZES, ensure_checkpoint
from benchmarks.floors import from_files
from quant import QuantConfig

log = logging.getLogger("tp_reload.bench")


class RankReload:
    """One rank's model and reload engine, fed every tensor of the checkpoint as one bucket
    of file entries (what the driver sends for a directory)."""

    def __init__(self, path: Path, tp: int, rank: int, check_finite: bool,
                 quantization: str | None = None) -> None:
        self.model, reloadable = build_reloadable(
            load_spec(path), tp=TPGroup(rank, tp), dtype=torch.bfloat16,
            device=torch.device("cpu"), quant=QuantConfig(quantization))
        self.engine = ReloadEngine(reloadable, torch.device("cpu"), log, check_finite)
        self.bucket = FileBucket(tuple(file_entry(i) for i in checkpoint_inventory(path)))
        self.load("first")

    def load(self, mode: str = "reload") -> RankReloadStats:
        reader = BucketReader()
        self.engine.start(mode)
        try:
            self.engine.load(reader.items(self.bucket))
            return self.engine.finish()
        except BaseException:
            self.engine.abort()
            raise
        finally:
            reader.close()


def floor_seconds(work: RankWork, path: Path) -> float:
    """The floor's work for one rank from the files, as ``benchmarks.floors`` runs it."""
    begin = time.perf_counter()
    from_files(work, path)
    return time.perf_counter() - begin


def measure(path: Path, tp: int, rank: int, reloads: int, check_finite: bool = True,
            quantization: str | None = None) -> tuple[dict[str, Any], RankReload]:
    """Our reloads and the floor's, alternating; the figures and our rank (to inspect)."""
    torch.set_num_threads(1)
    ours = RankReload(path, tp, rank, check_finite, quantization)
    work = RankWork(path, tp, rank, torch.bfloat16, quantization)
    floor_seconds(work, path)  # first touches
    seconds: dict[str, list[float]] = {"ours": [], "floor": []}
    stats = []
    for _ in range(reloads):
        begin = time.perf_counter()
        stats.append(ours.load())
        seconds["ours"].append(time.perf_counter() - begin)
        seconds["floor"].append(floor_seconds(work, path))
    fastest = min(range(reloads), key=seconds["ours"].__getitem__)
    result = {f"{k}_{stat.__name__}_s": stat(v) for k, v in seconds.items()
              for stat in (min, statistics.median)}
    result["ratio_to_floor"] = result["ours_min_s"] / result["floor_min_s"]
    result["ours_stage_seconds"] = stats[fastest].stage_seconds
    result["ours_bytes_read"] = stats[fastest].bytes_read
    result["ours_layers_reloaded"] = len(stats[fastest].layers_reloaded)
    return result, ours


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rank_bench")
    parser.add_argument("--size", choices=[*SIZES, *MOE_SIZES], default="0.5b",
                        help="a Llama size, or a Qwen3-MoE one (the expert methods)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--reloads", type=int, default=12)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tp-reload-bench"))
    parser.add_argument("--quantization", default=None,
                        help="an online quantization of the native engine (e.g. fp8)")
    parser.add_argument("--no-check-finite", action="store_true",
                        help="reload without the per-tensor NaN/Inf check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    path = ensure_checkpoint(args.workdir, args.size)
    result, _ = measure(path, args.tp, args.rank, args.reloads, not args.no_check_finite,
                        args.quantization)
    stages = ", ".join(f"{k} {v:.4f}" for k, v in result["ours_stage_seconds"].items())
    print(f"rank {args.rank} of TP={args.tp}, {args.size} {args.quantization or 'bf16'}, "
          "NaN/Inf check "
          f"{'off' if args.no_check_finite else 'on'}, {args.reloads} reloads\n"
          f"ours  min {result['ours_min_s']:.4f} s  median {result['ours_median_s']:.4f} s"
          f"  ({stages})\n"
          f"floor min {result['floor_min_s']:.4f} s  median {result['floor_median_s']:.4f} s\n"
          f"ours / floor (min) {result['ratio_to_floor']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
