"""``tp-reload`` command line (also ``python -m orchestrator``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from orchestrator.demo import DemoOptions, format_summary, run_demo


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tp-reload", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="build a small random model, serve it with TP, "
                                            "check it against transformers")
    defaults = DemoOptions()
    demo.add_argument("--tp", type=int, default=defaults.tensor_parallel_size)
    demo.add_argument("--layers", type=int, default=defaults.num_layers)
    demo.add_argument("--cpus-per-rank", type=float, default=defaults.num_cpus_per_rank)
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        result = run_demo(DemoOptions(tensor_parallel_size=args.tp, num_layers=args.layers,
                                      num_cpus_per_rank=args.cpus_per_rank))
        print(json.dumps(result, indent=2) if args.json else format_summary(result))
        return 0 if result["ok"] else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
