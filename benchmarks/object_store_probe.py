"""Why in-memory reloads vary: ``ray.put`` into object-store memory that was never touched
runs at page-fault speed; into memory the store already used, at memcpy speed.

    python -m benchmarks.object_store_probe [--mb 256] [--puts 12] [--held 4]

Puts ``--mb`` of arrays ``--puts`` times, keeping the last ``--held`` alive (as a reload's
commit log and buckets in flight do) and prints the rate of each put and the ratio of the
first puts to the warm ones (the floor: the same copy into reused pages).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ray

from orchestrator.scratch import local_ray


def put_rates(mb: int, puts: int, held: int) -> list[float]:
    """GB/s of each put of ``mb`` MB (as 4 arrays, like a packed bucket)."""
    arrays = [np.ones((mb << 20) // 4, dtype=np.uint8) for _ in range(4)]
    alive: list[ray.ObjectRef] = []
    rates = []
    for _ in range(puts):
        begin = time.perf_counter()
        alive.append(ray.put(arrays))
        rates.append((mb << 20) / 1e9 / (time.perf_counter() - begin))
        if len(alive) > held:
            alive.pop(0)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.object_store_probe")
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--puts", type=int, default=12)
    parser.add_argument("--held", type=int, default=4)
    args = parser.parse_args(argv)
    with local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False):
        rates = put_rates(args.mb, args.puts, args.held)
    for i, rate in enumerate(rates):
        print(f"put {i:2d}: {args.mb} MB at {rate:5.1f} GB/s")
    warm, cold = max(rates), statistics.median(rates[: args.held])
    print(f"first {args.held} puts (median) {cold:.1f} GB/s, fastest {warm:.1f} GB/s: "
          f"cold/warm time ratio {warm / cold:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
