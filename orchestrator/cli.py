"""``tp-reload`` command line (also ``python -m orchestrator``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from actors.engines import engine_names
from orchestrator.config import DTYPES, KV_CACHE_DTYPES, EngineConfig
from orchestrator.demo import (
    DEMO_MODELS,
    DemoOptions,
    format_summary,
    missing_requirements,
    run_demo,
)
from orchestrator.fields import default
from orchestrator.plan import ORDERS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tp-reload", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="serve a small random model with TP, reload it, "
                                            "check both against transformers")
    defaults = DemoOptions()
    demo.add_argument("--engine", default=defaults.engine, choices=tuple(engine_names()),
                      help="inference engine (default: %(default)s)")
    demo.add_argument("--tp", type=int, default=defaults.tensor_parallel_size)
    demo.add_argument("--layers", type=int, default=defaults.num_layers)
    demo.add_argument("--cpus-per-rank", type=float, default=defaults.num_cpus_per_rank)
    demo.add_argument("--quantization", default=defaults.quantization,
                      help="online quantization the engine runs (native: fp8, fp8_per_channel, "
                           "fp8_block, w4a8; vllm on CPU: fp8_per_channel)")
    demo.add_argument("--kv-cache-dtype", default=defaults.kv_cache_dtype,
                      choices=KV_CACHE_DTYPES)
    demo.add_argument("--model", default=defaults.model, choices=tuple(DEMO_MODELS),
                      help="random model family (default: %(default)s)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    serve = commands.add_parser("serve", help="run the service: a named service actor "
                                              "owning the engines (the Ray job entrypoint)")
    serve.add_argument("--config", required=True, help="YAML config (see configs/)")
    serve.add_argument("--model", help="first checkpoint; overrides engine.model")
    serve.add_argument("--watch", help="reload each step_* directory published here once "
                                       "it holds the marker file; overrides service.watch_dir")
    serve.add_argument("--name", help="service actor name; overrides service.name")
    serve.add_argument("--namespace", help="Ray namespace; overrides service.namespace")
    plan = commands.add_parser("plan", help="print the reload schedule of a checkpoint and its "
                                            "predicted buffering (no Ray)")
    plan.add_argument("checkpoint", help="checkpoint directory (config.json + safetensors)")
    plan.add_argument("--tp", type=int, default=default(EngineConfig, "tensor_parallel_size"),
                      help="tensor-parallel size (default: %(default)s)")
    plan.add_argument("--bucket-bytes", type=int, default=default(EngineConfig, "bucket_bytes"),
                      help="streamed bucket bound (default: %(default)s)")
    plan.add_argument("--dtype", default=default(EngineConfig, "dtype"), choices=DTYPES,
                      help="engine dtype (default: %(default)s, the checkpoint's)")
    plan.add_argument("--order", choices=ORDERS, default=ORDERS[0])
    plan.add_argument("--quantization", default=default(EngineConfig, "quantization"),
                      help="online quantization method of the native engine")
    plan.add_argument("--kv-cache-dtype", default=default(EngineConfig, "kv_cache_dtype"),
                      choices=KV_CACHE_DTYPES)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        return run_demo_command(args)
    if args.command == "serve":
        return run_serve(args)
    return print_plan(args)


def run_demo_command(args: argparse.Namespace) -> int:
    from orchestrator.errors import TPReloadError

    missing = missing_requirements(args.engine)
    if missing:
        print("error: tp-reload demo needs\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    try:
        result = run_demo(DemoOptions(
            engine=args.engine, tensor_parallel_size=args.tp, num_layers=args.layers,
            num_cpus_per_rank=args.cpus_per_rank, quantization=args.quantization,
            kv_cache_dtype=args.kv_cache_dtype, model=args.model))
    except TPReloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_summary(result))
    return 0 if result["ok"] else 1


def run_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from orchestrator.errors import TPReloadError
    from orchestrator.service import serve
    from orchestrator.yaml_config import FileConfig, load_file_config

    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_file_config(args.config,
                                  **({"model": args.model} if args.model else {}))
        overrides = {k: v for k, v in (("watch_dir", args.watch), ("name", args.name),
                                       ("namespace", args.namespace)) if v is not None}
        config = FileConfig(config.engine, replace(config.service, **overrides))
        return serve(config)
    except TPReloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def print_plan(args: argparse.Namespace) -> int:
    """The native engine's schedule, planned in this process on meta copies of its ranks."""
    from orchestrator.errors import TPReloadError
    from orchestrator.reload_orchestrator import ReloadOrchestrator

    try:
        config = EngineConfig(model=args.checkpoint, tensor_parallel_size=args.tp,
                              bucket_bytes=args.bucket_bytes, dtype=args.dtype,
                              quantization=args.quantization,
                              kv_cache_dtype=args.kv_cache_dtype, progress=False)
        plan = ReloadOrchestrator(config).plan(args.checkpoint, order=args.order)
    except TPReloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan, args.checkpoint, args.tp, args.bucket_bytes))
    return 0


def format_plan(plan, checkpoint: str, tp: int, bucket_bytes: int) -> str:
    mb = 1e6
    tensors = plan.tensors
    lines = [
        f"reload plan for {checkpoint}: TP={tp}, order={plan.order}, {len(plan.layers)} layers, "
        f"{len(tensors)} tensors ({sum(t.nbytes for t in tensors) / mb:.2f} MB), "
        f"buckets of <= {bucket_bytes / mb:.2f} MB -> {len(plan.buckets)} bucket(s)",
        "predicted peak buffered bytes per rank:",
        f"  plan order (parent layer): {plan.plan_order_peak_bytes / mb:10.3f} MB",
        f"  source order (file order): {plan.source_order_peak_bytes / mb:10.3f} MB",
        f"  largest layer per rank:    {plan.largest_layer_rank_bytes / mb:10.3f} MB",
        "",
        f"{'bucket':>6} {'tensors':>7} {'MB':>9}  files / layers",
    ]
    for index, bucket in enumerate(plan.buckets):
        files = ", ".join(Path(f).name for f in bucket.files) or "-"
        layers = list(dict.fromkeys(t.layer for t in bucket.tensors))
        lines.append(f"{index:>6} {len(bucket.tensors):>7} {bucket.nbytes / mb:>9.3f}  {files}")
        lines.append(f"{'':>25}{', '.join(layers)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
