"""Reload time and memory: tp-reload against the machine's floor and real peers, in one run.

    python -m benchmarks.reload_bench [--engine native|vllm] [--size 0.5b] [--quick]
                                      [--json out.json] [--plot out.png]

Cases: TP in {1, 2} x quantization in {none, fp8} (vLLM: fp8_per_channel) x source in
{dir, memory, trainer} x order in {plan, source}. For each: ours (``orch.reload`` end to end, stage
breakdown), the floor and the peers (``benchmarks.baselines``), repeated (min and median),
peak buffered bytes and the peak RSS of each path's rank processes. Peers: DCP and full load
for the native engine; vLLM's own ``reload_weights`` on the same engines for ``--engine
vllm``; for the trainer source, the same trainer over a process group (``process_group``).
Prints a table and whether each target holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from safetensors.torch import load_file

from actors.transports.files import checkpoint_files
from benchmarks.baselines import run_peer, vllm_reload_seconds
from benchmarks.checkpoints import (
    SCRATCH_PREFIX,
    SIZES,
    ensure_checkpoint,
    half_depth,
    one_tensor,
    parameter_count,
)
from benchmarks.floors import FloorProcesses, FloorTimes
from benchmarks.reload_report import MB, format_pauses, format_table, plot, targets
from orchestrator import (
    EngineConfig,
    RankError,
    ReloadOrchestrator,
    TrainerEndpoint,
    TrainerSource,
)
from orchestrator.scratch import inductor_cache_in, local_ray, owned_temp_dir

log = logging.getLogger("tp_reload.bench")
PEERS = ("dcp", "full")
QUANTIZATIONS = {"native": (None, "fp8"), "vllm": (None, "fp8_per_channel")}


@dataclass
class Case:
    engine: str
    tp: int
    quantization: str | None
    source: str
    order: str
    ours: list[float] = field(default_factory=list)
    ours_stages: list[dict[str, float]] = field(default_factory=list)
    pauses: list[float] = field(default_factory=list)
    """Seconds serving waited in each of ours (all of a plain reload)."""
    floors: dict[str, FloorTimes] = field(default_factory=dict)
    """``strict``, ``concurrent`` and, for sources in another process, ``transport``
    (``benchmarks.floors``)."""
    peers: dict[str, list[float]] = field(default_factory=dict)
    peer_stages: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    peak_buffered: int = 0
    predicted_peak: int = 0
    peak_rss: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        prefix = "" if self.engine == "native" else f"{self.engine}-"
        return f"{prefix}tp{self.tp}-{self.quantization or 'none'}-{self.source}-{self.order}"

    @property
    def floor_kind(self) -> str:
        """The floor that applies: a directory every rank reads itself has the concurrent
        floor; tensors in another process (the driver's, a trainer's) the transport floor."""
        return "concurrent" if self.source == "dir" else "transport"

    def summary(self) -> dict[str, Any]:
        best_peer = min((min(v) for v in self.peers.values()), default=None)
        floor = self.floors[self.floor_kind]
        transport = self.floors.get("transport")
        return {
            "name": self.name, "engine": self.engine, "tp": self.tp,
            "quantization": self.quantization,
            "source": self.source, "order": self.order,
            "ours_s": min(self.ours), "ours_median_s": statistics.median(self.ours),
            "ours_stage_seconds": median_stages(self.ours_stages),
            "floor_kind": self.floor_kind,
            "floor_s": min(floor.seconds), "floor_median_s": statistics.median(floor.seconds),
            "floor_stage_seconds": median_stages(floor.stages),
            "strict_floor_s": min(self.floors["strict"].seconds),
            "concurrent_floor_s": min(self.floors["concurrent"].seconds),
            "transport_floor_s": min(transport.seconds) if transport else None,
            "peers": {k: min(v) for k, v in self.peers.items()},
            "peers_median_s": {k: statistics.median(v) for k, v in self.peers.items()},
            "peer_stage_seconds": {k: median_stages(v) for k, v in self.peer_stages.items()},
            "ratio_to_floor": min(self.ours) / min(floor.seconds),
            "ratio_to_best_peer": min(self.ours) / best_peer if best_peer else None,
            "peak_buffered_bytes": self.peak_buffered,
            "predicted_peak_buffered_bytes": self.predicted_peak,
            "peak_rss_bytes": dict(self.peak_rss),
        }


def median_stages(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} if rows else {}


# ---- measuring ---------------------------------------------------------------------------


@dataclass
class Options:
    size: str
    repeats: int
    tps: tuple[int, ...]
    workdir: Path
    bucket_bytes: int
    check_finite: bool = True
    engine: str = "native"
    quantizations: tuple[str | None, ...] = ()
    """The quantizations to measure (None: unquantized); empty: every one of the engine's
    (``QUANTIZATIONS``)."""


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint as a trainer would hand it over: one dict, file by file."""
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        tensors.update({n: t.clone() for n, t in load_file(file).items()})
    return tensors


def engine_config(path: Path, tp: int, quantization: str | None, opts: Options,
                  engine: str | None = None) -> EngineConfig:
    cores = os.cpu_count() or 1
    engine = engine or opts.engine
    return EngineConfig(model=str(path), engine=engine, tensor_parallel_size=tp,
                        dtype="bfloat16", quantization=quantization,
                        num_cpus_per_rank=max(0.5, cores / tp), bucket_bytes=opts.bucket_bytes,
                        timeout_s=1800, check_finite=opts.check_finite,
                        engine_args={"kv_cache_memory_bytes": 256 << 20}
                        if engine == "vllm" else {})


def measure_ours(orch: ReloadOrchestrator, case: Case, source: Any) -> None:
    orch.reset_peak_memory()
    report = orch.reload(source, order=case.order)
    case.ours.append(report.seconds)
    case.pauses.append(report.pause_seconds)
    case.ours_stages.append(report.stage_seconds)
    case.peak_buffered = max(case.peak_buffered, report.peak_buffered_bytes)
    case.predicted_peak = report.predicted_peak_buffered_bytes
    rss = max(orch.memory(peak=True)[0])
    case.peak_rss["ours"] = max(case.peak_rss.get("ours", 0), rss)


class BenchTrainer(TrainerEndpoint):
    """A one-rank trainer actor holding the checkpoint's tensors in memory."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def tp_reload_weights(self) -> dict[str, torch.Tensor]:
        return self.tensors


SOURCES = ("dir", "memory", "trainer")
"""A checkpoint directory; the driver's in-memory dict; a trainer actor on the same node
(``TrainerSource``). Both of the last two go through the node's shared memory."""


def run_engine_cases(path: Path, tp: int, quantization: str | None, tensors: dict,
                     opts: Options) -> tuple[list[Case], dict[str, Any] | None, dict[str, Any]]:
    """Per source: untimed reloads, then the two orders taken in turn, so both meet the
    same machine state. The in-memory source warms up until the object store's memory was
    all used once (``store_warmup_reloads``): until then ray.put lands on fresh pages at
    ~2 GB/s instead of ~12 GB/s here, and whichever case ran first looked 2-3x slower
    (issue 14's "plan order is 3x slower"). A long RL run lives in the warm state.
    Also returns the staged-reload row (``measure_pause``) where the engine stages, and
    what ``same_engine_rows`` measures on this engine when it is the unquantized one."""
    cases = [Case(opts.engine, tp, quantization, s, o)
             for s in SOURCES for o in ("plan", "source")]
    trainer = ray.remote(num_cpus=0)(BenchTrainer).remote(tensors)
    # Up before anything is timed: its start (taking the tensors) competes for the cores.
    ray.get(trainer.tp_reload_manifest.remote())
    sources = {"dir": str(path), "memory": tensors, "trainer": TrainerSource([trainer])}
    with ReloadOrchestrator(engine_config(path, tp, quantization, opts)) as orch:
        for kind, source in sources.items():
            for _ in range(store_warmup_reloads(tensors) if kind == "memory" else 1):
                orch.reload(source)
            for _ in range(opts.repeats):
                for case in (c for c in cases if c.source == kind):
                    measure_ours(orch, case, source)
        for case in cases:
            log.warning("ours %-28s min %.3fs", case.name, min(case.ours))
        measure_stream_peer(orch, sources["trainer"], cases, opts.repeats)
        if opts.engine == "vllm":
            measure_vllm_peer(orch, path, tensors, cases, opts.repeats)
        stages = orch.config.plugin.supports("staging")
        staged = measure_pause(orch, path, cases, opts.repeats) if stages else None
        extras = same_engine_rows(orch, path, tensors, tp, quantization, opts)
    ray.kill(trainer)
    return cases, staged, extras


def same_engine_rows(orch: ReloadOrchestrator, path: Path, tensors: dict, tp: int,
                     quantization: str | None, opts: Options) -> dict[str, Any]:
    """On the unquantized engine already started for the cases (no engine of their own):
    the fixed cost at FIXED_COST_TP and, on the native engine at the largest TP, the
    buffered timelines and the full-depth row of the depth check."""
    if quantization is not None:
        return {}
    rows: dict[str, Any] = {}
    if tp == FIXED_COST_TP:
        rows["fixed_cost"] = fixed_cost(orch, path, opts)
    if opts.engine == "native" and tp == max(opts.tps):
        rows["buffered_timelines"] = buffered_timelines(orch, tensors)
        rows["full_depth"] = depth_row(orch, path, opts)
    return rows


def measure_pause(orch: ReloadOrchestrator, path: Path, cases: list[Case], repeats: int
                  ) -> dict[str, Any]:
    """How long serving waits: a plain reload from the directory (the whole reload) beside
    a staged one (only its flip), on the same engines. A staged reload the engine refuses
    (layers processed collectively: vLLM's online FP8 at TP>1) is a row saying why."""
    plain = next(c for c in cases if (c.source, c.order) == ("dir", "plan"))
    row = {"name": plain.name.replace("-plan", ""), "tp": plain.tp,
           "quantization": plain.quantization,
           "plain_s": min(plain.ours), "plain_pause_s": min(plain.pauses)}
    try:
        reports = [orch.reload(str(path), staged=True) for _ in range(repeats + 1)][1:]
    except RankError as error:
        log.warning("staged %s refused: %s", row["name"], error)
        return {**row, "refused": str(error).splitlines()[0]}
    return {**row, "staged_s": min(r.seconds for r in reports),
            "staged_pause_s": min(r.pause_seconds for r in reports),
            "staging_bytes": max(r.staging_bytes for r in reports)}


MAX_WARMUP_RELOADS = 12


def store_warmup_reloads(tensors: dict[str, torch.Tensor]) -> int:
    """In-memory reloads that touch every page of the object store once (each puts the
    whole dict), plus one; at most ``MAX_WARMUP_RELOADS``."""
    store = ray.cluster_resources().get("object_store_memory", 0)
    nbytes = sum(t.nbytes for t in tensors.values())
    return min(MAX_WARMUP_RELOADS, 1 + math.ceil(store / nbytes))


def measure_vllm_peer(orch: ReloadOrchestrator, path: Path, tensors: dict, cases: list[Case],
                      repeats: int) -> None:
    """vLLM's own reload_weights on the same engines, from the same sources; then one of
    ours, so the engines serve through our records again."""
    for kind in ("dir", "memory"):
        seconds = [vllm_reload_seconds(orch.engines, path if kind == "dir" else None,
                                       tensors if kind == "memory" else None, 1800)
                   for _ in range(repeats)]
        log.warning("peer vllm %-4s tp%d %-15s min %.3fs", kind, cases[0].tp,
                    cases[0].quantization or "none", min(seconds))
        for case in cases:
            if case.source == kind:
                case.peers["vllm"] = seconds
    orch.reload(str(path))


def measure_stream_peer(orch: ReloadOrchestrator, trainer: TrainerSource, cases: list[Case],
                        repeats: int) -> None:
    """The same trainer source over a process group (``shared_memory=False``: what carried
    every trainer source before, and still does across nodes), on the same engines."""
    orch.config.shared_memory = False
    try:
        orch.reload(trainer)
        seconds = [orch.reload(trainer).seconds for _ in range(repeats)]
    finally:
        orch.config.shared_memory = True
    log.warning("peer process_group tp%d %-15s min %.3fs", cases[0].tp,
                cases[0].quantization or "none", min(seconds))
    for case in cases:
        if case.source == "trainer":
            case.peers["process_group"] = seconds


def run_floor(path: Path, tp: int, quantization: str | None, cases: list[Case],
              repeats: int) -> None:
    """Every floor of ``cases`` (one engine shape), in processes of their own
    (``benchmarks.floors``); a trainer's tensors are in another process too: the in-memory
    source's floors."""
    with FloorProcesses(path, tp, quantization) as processes:
        for kind in ("dir", "memory"):
            floors = processes.measure(kind, repeats)
            for case in cases:
                if case.source == kind or (kind, case.source) == ("memory", "trainer"):
                    case.floors = floors
            log.warning("floors %-6s tp%d %-15s %s", kind, tp, quantization or "none",
                        " ".join(f"{k} {min(v.seconds):.3f}s" for k, v in floors.items()))


def run_peers(path: Path, tp: int, quantization: str | None, cases: list[Case],
              repeats: int) -> None:
    for kind in PEERS:
        seconds, stages, peak = run_peer(kind, path, tp, "bfloat16", quantization, repeats)
        log.warning("peer %-4s tp%d %-5s min %.3fs", kind, tp, quantization or "none",
                    min(seconds))
        for case in cases:
            if case.source == "dir":
                case.peers[kind] = seconds
                case.peer_stages[kind] = stages
                case.peak_rss[kind] = peak


def buffered_timelines(orch: ReloadOrchestrator, tensors: dict) -> dict[str, list[int]]:
    """Rank 0 of the unquantized native engine at the largest TP: buffered bytes through one
    reload, per source and order. 'shuffled' is the dict in a random order, as an unordered
    trainer export would be."""
    names = list(tensors)
    random.Random(0).shuffle(names)
    shuffled = {n: tensors[n] for n in names}
    timelines = {}
    for label, source in (("dir", orch.config.model), ("shuffled dict", shuffled)):
        for order in ("plan", "source"):
            report = orch.reload(source, order=order)
            timelines[f"{label}, {order} order"] = report.buffered_timeline
    return timelines


def depth_row(orch: ReloadOrchestrator, model: Path, opts: Options) -> dict[str, Any]:
    """Plan-order peak buffered bytes of ``model`` on ``orch`` against the bound."""
    report = orch.reload(str(model), order="plan")
    plan = orch.plan(str(model))
    bound = plan.largest_layer_rank_bytes + opts.bucket_bytes
    return {"layers": json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"],
            "peak_buffered_bytes": report.peak_buffered_bytes,
            "largest_layer_rank_bytes": plan.largest_layer_rank_bytes,
            "bucket_bytes": opts.bucket_bytes,
            "holds": report.peak_buffered_bytes <= bound}


def depth_check(path: Path, full_depth: dict[str, Any], opts: Options) -> list[dict[str, Any]]:
    """Plan-order peak buffered bytes at two depths of the same width: half of ``path``'s
    layers on an engine of its own, beside the full depth measured on the cases' engine."""
    half = half_depth(path)
    with ReloadOrchestrator(engine_config(half, max(opts.tps), None, opts, "native")) as orch:
        return [depth_row(orch, half, opts), full_depth]


FIXED_COST_TP = 2
FIXED_COST_REPEATS = 15


def fixed_cost(orch: ReloadOrchestrator | None, path: Path, opts: Options) -> dict[str, Any]:
    """Seconds of a reload that carries one small tensor (``one_tensor``) at TP=2: the
    cost every reload pays whatever its size, on the engine benchmarked (``orch``, or one
    of its own when the cases had none at that TP)."""
    if orch is None:
        with ReloadOrchestrator(engine_config(path, FIXED_COST_TP, None, opts)) as orch:
            return fixed_cost(orch, path, opts)
    small = one_tensor(path)
    orch.reload(str(small))
    seconds = [orch.reload(str(small)).seconds for _ in range(FIXED_COST_REPEATS)]
    orch.reload(str(path))  # the engine serves the whole checkpoint again
    return {"tp": FIXED_COST_TP, "engine": opts.engine, "repeats": FIXED_COST_REPEATS,
            "seconds_min": min(seconds), "seconds_median": statistics.median(seconds)}


def run(opts: Options) -> dict[str, Any]:
    """Every case of ``opts``, on the Ray already initialized or on a local one of its own;
    torch's Inductor cache goes with a scratch directory."""
    with owned_temp_dir(SCRATCH_PREFIX) as scratch, inductor_cache_in(scratch):
        path = ensure_checkpoint(opts.workdir, opts.size)
        tensors = load_tensors(path)
        with local_ray(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False):
            return measure(opts, path, tensors)


def measure(opts: Options, path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    cases: list[Case] = []
    staged: list[dict[str, Any]] = []
    extras: dict[str, Any] = {}
    for tp in opts.tps:
        for quantization in opts.quantizations or QUANTIZATIONS[opts.engine]:
            group, pause, more = run_engine_cases(path, tp, quantization, tensors, opts)
            staged += [pause] if pause else []
            extras.update(more)
            run_floor(path, tp, quantization, group, opts.repeats)
            if opts.engine == "native":
                run_peers(path, tp, quantization, group, opts.repeats)
            cases += group
    # Buffering is the planner's and the reload engine's: the same for every engine, so it is
    # measured on the native one (an --engine vllm run compares against vLLM instead).
    native = opts.engine == "native"
    depths = depth_check(path, extras["full_depth"], opts) if native else []
    fields, _ = SIZES[opts.size]
    return {
        "machine": machine_description(),
        "model": {"size": opts.size, "parameters": parameter_count(fields), **fields,
                  "dtype": "bfloat16", "checkpoint_bytes": sum(t.nbytes for t in tensors.values()),
                  "files": len(checkpoint_files(path))},
        "engine": opts.engine, "repeats": opts.repeats, "bucket_bytes": opts.bucket_bytes,
        "memory_warmup_reloads": store_warmup_reloads(tensors),
        "check_finite": opts.check_finite,
        "cases": [c.summary() for c in cases],
        "staged": staged,
        "fixed_cost": extras.get("fixed_cost") or fixed_cost(None, path, opts),
        "buffered_timelines": extras.get("buffered_timelines", {}),
        "depths": depths,
    }


def machine_description() -> dict[str, Any]:
    with open("/proc/meminfo") as f:
        total_kb = int(f.readline().split()[1])
    return {"cpus": os.cpu_count(), "memory_gib": round(total_kb / 2**20, 1),
            "torch": torch.__version__, "ray": ray.__version__,
            "date": time.strftime("%Y-%m-%d")}


def quantizations(engine: str, names: list[str] | None) -> tuple[str | None, ...]:
    known = {q or "none": q for q in QUANTIZATIONS[engine]}
    unknown = sorted(set(names or ()) - set(known))
    if unknown:
        raise SystemExit(f"--quantization {' '.join(unknown)}: the {engine} benchmark measures "
                         f"{', '.join(known)}")
    return tuple(known[n] for n in names or ())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reload_bench")
    parser.add_argument("--engine", choices=list(QUANTIZATIONS), default="native")
    parser.add_argument("--size", choices=list(SIZES), default="0.5b")
    parser.add_argument("--quick", action="store_true", help="small model, 2 repeats (~1 min)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--bucket-bytes", type=int, default=256 << 20)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tp-reload-bench"))
    parser.add_argument("--quantization", nargs="+", metavar="Q",
                        help="only these (none, or the engine's quantizations); default all")
    parser.add_argument("--no-check-finite", action="store_true",
                        help="measure ours without the per-tensor NaN/Inf check")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="write the PNG plot here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    opts = Options(size="quick" if args.quick else args.size,
                   repeats=2 if args.quick else args.repeats, tps=tuple(args.tp),
                   workdir=args.workdir, bucket_bytes=args.bucket_bytes,
                   check_finite=not args.no_check_finite, engine=args.engine,
                   quantizations=quantizations(args.engine, args.quantization))
    result = run(opts)
    result["targets"] = [{"target": t, "holds": ok, "measured": m} for t, ok, m in targets(result)]
    model = result["model"]
    print(f"\nmodel {model['size']}: {model['parameters'] / 1e9:.2f}B parameters, bf16, "
          f"{model['checkpoint_bytes'] / MB:.0f} MB in {model['files']} files; "
          f"machine {result['machine']}; repeats {opts.repeats}; NaN/Inf check "
          f"{'on' if opts.check_finite else 'off'}\n")
    print(format_table(result))
    if result["staged"]:
        print("\n" + format_pauses(result["staged"]))
    print("\ntargets:")
    for row in result["targets"]:
        print(f"  [{'holds' if row['holds'] else 'MISSED'}] {row['target']}: {row['measured']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
