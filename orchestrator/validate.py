"""Validation before any byte moves: a source is checked against the model from its headers
and the dry-run routing alone, so a bad source is refused while every engine still serves
its last committed version untouched."""

from __future__ import annotations

from collections import defaultdict

from actors.dtypes import ENGINE_DTYPE_NAMES, ENGINE_DTYPES
from actors.reload import Routing
from actors.transports.base import Source
from orchestrator.errors import CheckpointError

MAX_LISTED = 20


def validate_source(source: Source, routing: Routing, *, strict: bool,
                    require_all: bool) -> None:
    """CheckpointError listing every problem: unknown names (unless not ``strict``), dtypes,
    layers the source feeds only partly, and with ``require_all`` (a first load) layers it
    lacks."""
    problems = [f"'{name}' matches no parameter of the model (pass strict=False to ignore "
                "unknown names)" for name in routing.unknown] if strict else []
    problems += _dtype_problems(source, routing)
    problems += _completeness_problems(routing, require_all)
    if problems:
        listed = problems[:MAX_LISTED]
        extra = len(problems) - MAX_LISTED
        more = f"\n  ... and {extra} more" if extra > 0 else ""
        raise CheckpointError(f"{source.description}: refused before any byte moved; the "
                              f"engines keep serving their weights:\n  " + "\n  ".join(listed)
                              + more)


def _dtype_problems(source: Source, routing: Routing) -> list[str]:
    problems = []
    for info in source.tensors:
        calls = routing.reads.get(info.name)
        if not calls or info.torch_dtype in (*ENGINE_DTYPES, calls[0].param_dtype):
            continue
        where = info.file or "in-memory source"
        problems.append(f"'{info.name}' ({where}) has dtype {info.dtype}; {calls[0].param} is "
                        f"{calls[0].param_dtype}: give {' or '.join(ENGINE_DTYPE_NAMES)} weights"
                        " (an engine converts those)")
    return problems


def _completeness_problems(routing: Routing, require_all: bool) -> list[str]:
    written: dict[str, int] = defaultdict(int)
    shards: dict[str, list] = defaultdict(list)
    reads = [read for calls in routing.reads.values() for read in calls]
    for read in reads:
        written[read.param] += read.written
        if read.shard is not None:
            shards[read.param].append(read.shard)
    touched = {read.layer for read in reads}
    problems = []
    for layer, params in routing.layer_params.items():
        if layer not in touched and not (require_all and params):
            continue
        for param, numel in params.items():
            if written[param] < numel:
                got = f", it has shards {sorted(shards[param], key=str)}" if shards[param] else ""
                problems.append(f"layer {layer} is incomplete: {param} would get "
                                f"{written[param]} of {numel} elements{got} (a missing tensor)")
    return problems
