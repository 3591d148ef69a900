"""What ``benchmarks.reload_bench`` prints from a run's result: the targets (each held or
missed, with what was measured), the tables and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MB = 1e6
FIXED_COST_TARGET_S = 0.010
"""A reload that carries one small tensor at TP=2 (the cost every reload pays)."""


FLOOR_BOUND = 1.3
"""Ours against the floor that applies to the case, every case and source."""
PEER_BOUND = 1.0
"""Ours against the best peer, and against vLLM's own reload_weights."""
VLLM_MEMORY_BOUND = 0.5
"""Ours against vLLM's reload_weights from the driver's in-memory tensors."""
STREAM_BOUND = 0.5
"""Ours from a trainer on the node against the same trainer over a process group."""


PLAN_ORDER_NOISE = 1.05
"""Plan order "never slower" than source order allows this much run-to-run noise."""


def targets(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The targets, each with whether it holds in this run and what was measured: ours
    against the floor, the best peer and vLLM's own reload; and every floor below every peer
    of its case (a floor above a peer that does more work is mis-measured)."""
    out = []
    for case in result["cases"]:
        out.append(_floor_target(case))
        out += _peer_targets(case)
    by_name = {c["name"]: c for c in result["cases"]}
    for case in result["cases"]:
        if case["order"] == "plan":
            other = by_name[case["name"].replace("-plan", "-source")]
            # Medians: one lucky repeat (warm object-store pages) must not decide it.
            ratio = case["ours_median_s"] / other["ours_median_s"]
            out.append((f"plan order not slower than source order (median), {case['name']}",
                        ratio <= PLAN_ORDER_NOISE, f"plan/source {ratio:.2f}"))
    fixed = result["fixed_cost"]
    out.append((f"fixed cost of a reload < {FIXED_COST_TARGET_S * 1e3:.0f} ms, TP={fixed['tp']} "
                "(median, one-tensor reload)", fixed["seconds_median"] < FIXED_COST_TARGET_S,
                f"{fixed['seconds_median'] * 1e3:.1f} ms"))
    depths = result["depths"]
    if depths:
        same = len({d["peak_buffered_bytes"] for d in depths}) == 1
        detail = ", ".join(f"{d['layers']} layers: {d['peak_buffered_bytes'] / MB:.1f} MB "
                           f"(largest layer {d['largest_layer_rank_bytes'] / MB:.1f} MB)"
                           for d in depths)
        out.append(("plan-order peak buffered <= largest layer + one bucket, independent of "
                    "depth", all(d["holds"] for d in depths) and same, detail))
    return out


def _floor_target(case: dict[str, Any]) -> tuple[str, bool, str]:
    ratio = case["ratio_to_floor"]
    return (f"ours <= {FLOOR_BOUND}x the {case['floor_kind']} floor, {case['name']}",
            ratio <= FLOOR_BOUND, f"{ratio:.2f}")


def _peer_targets(case: dict[str, Any]) -> list[tuple[str, bool, str]]:
    peers = case["peers"]
    if not peers:
        return []
    best = min(peers, key=peers.get)
    out = [(f"ours <= {PEER_BOUND}x the best peer ({best}), {case['name']}",
            case["ratio_to_best_peer"] <= PEER_BOUND, f"{case['ratio_to_best_peer']:.2f}")]
    if "vllm" in peers:
        bound = VLLM_MEMORY_BOUND if case["source"] == "memory" else PEER_BOUND
        ratio = case["ours_s"] / peers["vllm"]
        out.append((f"ours <= {bound}x vLLM's reload_weights, {case['name']}", ratio <= bound,
                    f"{ratio:.2f}"))
    if "process_group" in peers:
        ratio = case["ours_s"] / peers["process_group"]
        out.append((f"ours <= {STREAM_BOUND}x the trainer's process-group stream, "
                    f"{case['name']}", ratio <= STREAM_BOUND, f"{ratio:.2f}"))
    out += [(f"{case['floor_kind']} floor <= peer {name}, {case['name']}",
             case["floor_s"] <= seconds, f"floor {case['floor_s']:.3f}s, {name} {seconds:.3f}s")
            for name, seconds in peers.items()]
    return out


def format_table(result: dict[str, Any]) -> str:
    header = (f"{'case':<36} {'ours min/med s':>15} {'floor s (kind)':>20} {'x floor':>7} "
              f"{'peers min s':>22} {'x peer':>6} {'buf MB (pred)':>14} {'RSS MB ours':>11}")
    lines = [header, "-" * len(header)]
    for c in result["cases"]:
        ratio_peer = f"{c['ratio_to_best_peer']:.2f}" if c["ratio_to_best_peer"] else "-"
        peers = " ".join(f"{k} {v:.3f}" for k, v in c["peers"].items()) or "-"
        lines.append(
            f"{c['name']:<36} {c['ours_s']:>7.3f}/{c['ours_median_s']:<7.3f} "
            f"{c['floor_s']:>8.3f} ({c['floor_kind']:>10}) {c['ratio_to_floor']:>7.2f} "
            f"{peers:>22} {ratio_peer:>6} "
            f"{c['peak_buffered_bytes'] / MB:>6.1f} "
            f"({c['predicted_peak_buffered_bytes'] / MB:>5.1f}) "
            f"{c['peak_rss_bytes']['ours'] / MB:>11.0f}")
    return "\n".join(lines)


def format_pauses(rows: list[dict[str, Any]]) -> str:
    """Plain and staged reloads side by side: seconds, and seconds serving waited."""
    header = (f"{'staged vs plain, dir':<22} {'plain s':>8} {'plain pause_s':>13} "
              f"{'staged s':>9} {'staged pause_s':>14} {'staging MB/rank':>15}")
    lines = [header, "-" * len(header)]
    for r in rows:
        staged = ("  refused (the JSON row says why)" if "refused" in r else
                  f"{r['staged_s']:>9.3f} {r['staged_pause_s']:>14.3f} "
                  f"{r['staging_bytes'] / MB:>15.1f}")
        lines.append(f"{r['name']:<22} {r['plain_s']:>8.3f} {r['plain_pause_s']:>13.3f} "
                     f"{staged}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    for label, timeline in result["buffered_timelines"].items():
        xs = [i / max(1, len(timeline) - 1) for i in range(len(timeline))]
        left.plot(xs, [b / MB for b in timeline], label=label)
    left.set(title="buffered bytes, rank 0, one reload (TP=2)", xlabel="progress of the reload",
             ylabel="MB buffered")
    left.legend()
    case = next((c for c in result["cases"] if c["name"] == "tp2-fp8-dir-plan"),
                result["cases"][0])
    paths = {"ours": case["ours_stage_seconds"], "floor": case["floor_stage_seconds"],
             **case["peer_stage_seconds"]}
    for i, (name, stages) in enumerate(paths.items()):
        bottom = 0.0
        for stage, seconds in stages.items():
            right.bar(i, seconds, bottom=bottom, label=f"{name}: {stage}")
            bottom += seconds
    right.set_xticks(range(len(paths)), list(paths))
    right.set(title=f"seconds per stage, {case['name']} (median)", ylabel="seconds")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
