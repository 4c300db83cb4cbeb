"""Library-level glue behind the CLI: read several inputs, agree on one model, build statistics.

Every CLI command calls one of these functions with the same parameter names as its flags.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from placer._ray import ADDRESS_ENV as RAY_ADDRESS_ENV
from placer.errors import InvalidInputError
from placer.io.atomic import check_writable
from placer.io.placements import export_placement, read_placement_file, write_placement_json
from placer.io.routing import (
    Routing,
    agree_model,
    check_top1,
    chunk_tokens_for,
    gather_routing,
    stream_chunks,
)
from placer.io.traces import (
    read_input,
    write_stats_npz,
    write_trace_npz_chunks,
    write_trace_parquet,
)
from placer.metrics import TraceStream, evaluate, evaluate_many
from placer.presets import check_problem_size
from placer.profiling.summary import summarize
from placer.resources import human_bytes
from placer.stacks import Stack, resolve_dispatch
from placer.stats import load_only_stats
from placer.synthetic import perturbed, profile_for, synthesize
from placer.types import ModelSpec, RoutingTrace

CHUNK_MB = 512.0
"""Default memory budget (MiB) of one chunk of routing read by the streaming commands."""


def write_synthetic(model: ModelSpec, tokens: int, *, seed: int = 0, perturb: float = 0.0,
                    phase: str | None = None, output: str,
                    progress: Callable[[int], None] | None = None) -> int:
    """Write a synthetic trace (native .npz, or .parquet in row groups) marked synthetic, streamed
    chunk by chunk (memory bounded by one chunk, whatever ``tokens``); return tokens written.
    ``progress(tokens_so_far)`` is called after each chunk is handed to the writer."""
    if not output.endswith((".npz", ".parquet")):
        raise InvalidInputError("synthetic traces are written as .npz or .parquet", source=output)
    check_writable(output)
    # At least ~2 bytes per id and gate weight even compressed; an npz also spools its gate
    # weights (4 bytes each) next to the output before copying them in.
    per_entry = 2.0 if output.endswith(".parquet") else 6.0
    folder = os.path.dirname(os.path.abspath(output))
    need, free = per_entry * tokens * model.num_moe_layers * model.top_k, shutil.disk_usage(folder).free
    if need > free:
        raise InvalidInputError(f"{tokens:,} tokens of {model.name} need at least about {human_bytes(need)} "
                                f"on disk; {human_bytes(free)} free in {folder}", source="--tokens")
    profile = profile_for(model)
    if perturb > 0:
        profile = perturbed(profile, perturb, seed)
    chunks = synthesize(model, tokens, seed=seed, profile=profile, phase=phase)
    if progress is not None:
        chunks = _counted(chunks, progress)
    if output.endswith(".parquet"):
        return write_trace_parquet(output, chunks, synthetic=True)
    return write_trace_npz_chunks(output, chunks, tokens, synthetic=True)


def _counted(chunks: Iterable[RoutingTrace], progress: Callable[[int], None]) -> Iterator[RoutingTrace]:
    """``chunks`` as they are, calling ``progress(tokens so far)`` after each one is consumed."""
    done = 0
    for chunk in chunks:
        yield chunk
        done += chunk.num_tokens
        progress(done)


def write_stats(routing: Routing, output: str) -> None:
    """Write the statistics of ``routing`` (native stats .npz, every phase it holds)."""
    write_stats_npz(output, routing.stats, synthetic=routing.synthetic)


def summarize_routing(inputs: Sequence[str], *, model: ModelSpec | None, phase: str = "all",
                      output: str | None = None) -> tuple[Routing, dict[str, Any]]:
    """Merge routing ``inputs`` and summarise them (per-layer skew and affinity, whether the top-1
    experts are known); write their statistics to ``output`` when given (checked before any work)."""
    if output:
        check_writable(output)
    routing = gather_routing(inputs, model=model, phase=phase, keep_trace=False)
    summary = summarize(routing.stats)
    summary["synthetic"] = routing.synthetic
    summary["top1_known"] = routing.stats.has_top1
    summary["top1_note"] = routing.top1_note
    if output:
        write_stats(routing, output)
    return routing, summary


@dataclass(frozen=True)
class SolveOutcome:
    """A solve and its scores: ``rows`` compare the result with the baselines on the fitting data
    and, when given, on held-out data (each row: method, data, status, gap, solve_seconds, metrics)."""

    result: object
    metrics: dict
    rows: list[dict]
    exported: list[tuple[str, str, list[str]]]
    stack: Stack | None = None
    dispatch: str = "nearest"
    notes: tuple[str, ...] = ()
    """Lines the command prints about the solve (e.g. an objective term the routing could not give)."""


COMPARE_WITH = ("contiguous", "eplb")
PULP_ALIASES = {"pulp": ("pulp", "cbc"), "pulp-cbc": ("pulp", "cbc"), "pulp-highs": ("pulp", "highs")}


def method_options(method: str, execution: str, *, backend: str | None, ray_address: str | None,
                   num_workers: int | None) -> dict:
    """Solver keyword options from the CLI's flags (only those given)."""
    options: dict = {}
    if backend is not None:
        coherent = method == "exact" or (method == "placer" and execution == "context-coherent")
        if coherent and backend in PULP_ALIASES:
            options["backend"], options["pulp_backend"] = PULP_ALIASES[backend]
        else:
            options["backend"] = backend
    if ray_address is not None:
        options["ray_address"] = ray_address
    if num_workers is not None:
        options["num_workers"] = num_workers
    return options


def solve_placement(inputs: Sequence[str], *, model: ModelSpec | None, topology, dispatch: str | None = None,
                    stack: Stack | None = None,
                    execution: str = "standard", phase: str = "all", redundant: int = 0,
                    groups: int | None = None, method: str = "placer", seed: int = 0,
                    time_limit_s: float | None = None, objective: str | None = None,
                    weights: dict[str, float] | None = None, backend: str | None = None,
                    ray_address: str | None = None, num_workers: int | None = None,
                    holdout: Sequence[str] = (), compare: Sequence[str] = COMPARE_WITH,
                    output: str, exports: Sequence[tuple[str, str]] = (), progress=None,
                    started_at: float | None = None, current: str | None = None,
                    horizon_s: float = 600.0) -> SolveOutcome:
    """Gather inputs, solve, score on the fitting (and held-out) data against the baselines, write
    the placement and its exports.

    ``stack`` (:mod:`placer.stacks`) sets the rule solved and scored under (``dispatch``
    overrides it; neither: ``nearest``), checks that the stack can place the model, and is
    recorded in the placement file. ``started_at`` (``time.time()`` seconds; the CLI passes its
    process start): ``time_limit_s`` counts from then, the scoring included, not from the solve.
    Routing is read chunk by chunk: the solve takes the statistics, and the scores stream the
    trace again (memory bounded by the statistics and one chunk of :data:`CHUNK_MB` MiB), every
    placement scored from one pass (two with ``time_limit_s`` and ``started_at``: the baselines
    first, to leave the solve what remains).
    ``current`` (a placement file, any format :func:`read_placement_file` reads): the placement
    running now; the solve is then movement-aware over ``horizon_s`` seconds
    (:func:`placer.ilp.movement.solve_from`) and the outcome's notes give the move and its payback.
    """
    from placer.ilp import (  # deferred: keeps ortools off placer synth, stats and evaluate
        METHODS,
        PlacementProblem,
        solve,
    )
    from placer.ilp import (
        method_options as solver_options,  # deferred: keeps ortools off placer synth, stats and evaluate
    )
    from placer.ilp.movement import (
        solve_from,  # deferred: keeps ortools off placer synth, stats and evaluate
    )

    say = progress or (lambda message: None)
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}", source="--method")
    for path in [output, *(path for _, path in exports)]:  # before any work: nothing is half done
        check_writable(path)
    routing = None
    if inputs:
        say(f"reading {len(inputs)} input(s)")
        routing = gather_routing(inputs, model=model, phase=phase, keep_trace=False,
                                 chunk_tokens=chunk_tokens_for(model, CHUNK_MB) if model is not None else 65536)
        model, stats = routing.model, routing.stats
        say(f"{stats.num_tokens:,} tokens of {model.name} routing ({model.num_moe_layers} MoE layers, "
            f"E={model.num_experts}, top_k={model.top_k})" + (", synthetic" if routing.synthetic else ""))
    else:
        if model is None:
            raise InvalidInputError("give a routing input or --model PRESET", source="--model")
        stats = load_only_stats(np.zeros((model.num_moe_layers, model.num_experts)), model.top_k, model=model)
    dispatch = resolve_dispatch(dispatch, stack, model)
    check_problem_size(model, topology)
    if groups is not None:
        model = with_groups(model, groups)
        stats = replace(stats, model=model)
    held = None
    if holdout:
        say(f"reading {len(holdout)} held-out input(s)")
        held = gather_routing(holdout, model=model, phase=phase, keep_trace=False,
                              chunk_tokens=chunk_tokens_for(model, CHUNK_MB))
    check_top1(routing, execution=execution, methods=[method])
    check_top1(held, execution=execution)
    notes = []
    if method == "exact" and routing is not None and routing.top1_note is not None:
        notes.append(f"note: exact solved without its inter-layer affinity term (balance only): "
                     f"{routing.top1_note}")
    problem_weights: dict[str, Any] = dict(weights or {})  # the terms' weights, and "objective"
    if objective is not None:
        problem_weights["objective"] = objective
    problem = PlacementProblem(stats, model, topology, num_redundant=redundant, dispatch=dispatch,
                               execution=execution, weights=problem_weights,
                               distinct_per_gpu=True if stack is not None and stack.distinct_per_gpu else None)
    if ray_address is None and "ray_address" in solver_options(method):  # as Ray's own tools read it
        ray_address = os.environ.get(RAY_ADDRESS_ENV) or None
    options = method_options(method, execution, backend=backend, ray_address=ray_address, num_workers=num_workers)
    limit = f", time limit {time_limit_s:g} s" if time_limit_s is not None else ""
    say(f"solving with {method} on {topology.num_gpus} GPUs in {topology.num_nodes} node(s), "
        f"{problem.slots_per_gpu} slots per GPU{limit}")
    # Checked after the sizes and the stack (those errors name a flag): a placement fitted to no
    # routing would be any placement, reported as optimal.
    if routing is None:
        raise InvalidInputError("no routing input: pass a trace or statistics, or make one with `placer synth`",
                                source="INPUTS")
    if not np.any(routing.stats.load):
        raise InvalidInputError("holds no routing (every expert load is zero): pass a trace or statistics, "
                                "or make one with `placer synth`", source=", ".join(routing.sources))

    running = None if current is None else read_placement_file(current, model=model, topology=topology).placement

    def score_many(placements: list, data_routing) -> list:
        if data_routing is None:
            return [None] * len(placements)
        out = evaluate_many(placements, topology, model, data_routing.exact_data, dispatch=dispatch,
                            execution=execution)
        for m in out:
            m["data"]["synthetic"] = data_routing.synthetic
            m["data"]["inputs"] = list(data_routing.sources)
            if not m["top1_known"]:
                m["top1_note"] = data_routing.top1_note
        return out

    scored_before: dict[bytes, dict] = {}  # a timed-out solve often returns a baseline's placement

    def key_of(placement) -> bytes:
        p2l = placement.physical_to_logical  # what the scores depend on (replica ranks order exports only)
        return repr(p2l.shape).encode() + p2l.tobytes()

    def score_all(placements) -> None:
        """Score the placements not scored yet, all of them from one pass over each routing."""
        todo = {key_of(p): p for p in placements if key_of(p) not in scored_before}
        if not todo:
            return
        fit, holdout = (score_many(list(todo.values()), data_routing) for data_routing in (routing, held))
        for key, f, h in zip(todo, fit, holdout, strict=True):
            scored_before[key] = {"fit": f, "holdout": h}

    def scores(placement) -> dict:
        return copy.deepcopy(scored_before[key_of(placement)])

    baselines = [solve(problem, m, seed=seed) for m in compare if m != method and (routing is not None or m != "eplb")]
    solve_limit = time_limit_s
    if time_limit_s is not None and started_at is not None:
        # The baselines are scored first, in one pass: the time limit counts from ``started_at``
        # (the CLI: process start), and the solve is left what remains after scoring its result
        # (one more pass). Without a deadline every placement is scored in one pass at the end.
        t_score = time.time()
        score_all([r.placement for r in baselines])
        score_s = time.time() - t_score
        solve_limit = max(0.01, started_at + time_limit_s - time.time() - 1.2 * score_s - 0.3)
    if running is None:
        result = solve(problem, method, time_limit_s=solve_limit, seed=seed, **options)
    else:
        result = solve_from(problem, method, running, horizon_s=horizon_s, time_limit_s=solve_limit, seed=seed,
                            **options)
    on_ray = (f" ({int(result.terms['ray_tasks'])} Ray tasks on {int(result.terms['ray_nodes'])} node(s))"
              if "ray_nodes" in result.terms else "")
    say(f"{method}: {result.status} in {result.wall_time_s:.2f} s{on_ray}; scoring")
    placement = result.placement
    assert placement is not None  # a posed problem is feasible (PlacementProblem checks it)
    score_all([placement, *(r.placement for r in baselines)])
    scored = scores(placement)
    rows = []
    for r, r_scores in [(result, scored), *((r, scores(r.placement)) for r in baselines)]:
        for label, metrics in r_scores.items():
            if metrics is not None:
                rows.append({"method": r.method, "data": label, "status": r.status, "gap": r.gap,
                             "solve_seconds": r.wall_time_s, "metrics": metrics})
    metrics = dict(scored["fit"] or {})
    if held is not None:
        metrics["holdout"] = scored["holdout"]
    metrics["objective"] = {"value": result.objective, "terms": dict(result.terms), "bound": result.bound,
                            "gap": result.gap, "backend": result.backend}
    if running is not None and current is not None:
        metrics["movement"] = movement_summary(running, result, topology, model, horizon_s)
        notes.append(movement_line(current, metrics["movement"]))
    # The exports first (a stack may refuse the placement): on a refusal nothing is left behind.
    exported, created = [], []
    try:
        for fmt, path in exports:
            new = not os.path.exists(path)
            exported.append((fmt, path, export_placement(placement, fmt, path, model=model,
                                                         topology=topology)))
            if new:
                created.append(path)
    except BaseException:
        for path in created:  # files this call created (an overwritten one's old content is gone)
            with contextlib.suppress(OSError):
                os.remove(path)
        raise
    write_placement_json(output, placement, model=model, topology=topology, dispatch=dispatch,
                         method=result.method, status=result.status, solve_seconds=result.wall_time_s,
                         metrics=metrics, stack=stack)
    return SolveOutcome(result=result, metrics=metrics, rows=rows, exported=exported, stack=stack,
                        dispatch=dispatch, notes=tuple(notes))


def movement_summary(running, result, topology, model: ModelSpec, horizon_s: float) -> dict:
    """The move from ``running`` to ``result.placement`` (:func:`placer.ilp.movement.solve_from`):
    the live plan's bytes and rounds (:func:`placer.runtime.plan_migration`), the estimated
    transfer seconds, the objective and bottleneck-load ratios, the layers kept, re-solved and
    repacked, and the serving seconds after which the move has paid for itself."""
    from placer.runtime.plan import plan_migration  # deferred: keeps the runtime off synth, stats

    plan = plan_migration(running, result.placement, topology, expert_bytes=model.expert_weight_bytes)
    t = result.terms
    gain = 1.0 - t["objective_ratio"]
    seconds = t["move_seconds"]
    return {"bytes_moved": plan.bytes_moved, "transfers": len(plan.transfers), "rounds": plan.num_rounds,
            "move_seconds": seconds, "objective_ratio": t["objective_ratio"], "step_ratio": t["step_ratio"],
            "horizon_s": horizon_s,
            "payback_s": seconds / gain if gain > 0 else (0.0 if seconds == 0 else float("inf")),
            "layers_kept": int(t["layers_kept"]), "layers_resolved": int(t["layers_resolved"]),
            "layers_repacked": int(t["layers_repacked"]),
            "resolve_bytes_moved": t["resolve_bytes_moved"], "resolve_objective_ratio": t["resolve_objective_ratio"]}


def movement_line(current: str, m: dict) -> str:
    payback = ("never (no gain)" if m["payback_s"] == float("inf") else
               "at once" if m["payback_s"] == 0 else f"after {m['payback_s']:.3g} s of serving")
    return (f"from {current}: {m['layers_kept']} layers kept, {m['layers_resolved']} re-solved, "
            f"{m['layers_repacked']} repacked; moves {human_bytes(m['bytes_moved'])} ({m['transfers']} transfers "
            f"in {m['rounds']} rounds), about {m['move_seconds']:.3g} s of transfers; objective "
            f"{m['objective_ratio'] - 1:+.1%} (bottleneck load {m['step_ratio'] - 1:+.1%}) vs the running "
            f"placement; pays back {payback} (horizon {m['horizon_s']:g} s); the re-solve as it is would receive "
            f"{human_bytes(m['resolve_bytes_moved'])} for {m['resolve_objective_ratio'] - 1:+.1%}")


def with_groups(model: ModelSpec, groups: int) -> ModelSpec:
    """``model`` with ``groups`` expert groups (the group-limited routing EPLB's hierarchical policy uses)."""
    if model.num_experts % groups:
        raise InvalidInputError(f"{groups} groups do not divide {model.num_experts} experts", source="--groups")
    return replace(model, num_groups=groups, topk_groups=min(model.topk_groups, groups))


def evaluate_placement(placement_file, inputs: Sequence[str], *, dispatch: str, execution: str = "standard",
                       phase: str = "all", chunk_mb: float = CHUNK_MB) -> dict:
    """Score a placement file's placement on routing inputs (the file's model is authoritative).

    Per-token inputs are read once, chunk by chunk, exact on every token: memory is bounded by
    one chunk of about ``chunk_mb`` MiB, whatever the trace length. With count-only inputs (or a
    trace whose top-1 expert turns out unknown) the routing is gathered first, its statistics
    built, and the tokens streamed again.
    """
    chunk_tokens = chunk_tokens_for(placement_file.model, chunk_mb)
    metrics = _evaluate_streamed(placement_file, inputs, dispatch=dispatch, execution=execution, phase=phase,
                                 chunk_tokens=chunk_tokens)
    if metrics is not None:
        return metrics
    routing = gather_routing(inputs, model=placement_file.model, phase=phase, keep_trace=False,
                             chunk_tokens=chunk_tokens)
    check_top1(routing, execution=execution)
    metrics = evaluate(placement_file.placement, placement_file.topology, routing.model, routing.exact_data,
                       dispatch=dispatch, execution=execution)
    metrics["data"]["synthetic"] = routing.synthetic
    metrics["data"]["inputs"] = list(routing.sources)
    if not metrics["top1_known"]:
        metrics["top1_note"] = routing.top1_note
    return metrics


class _Top1Unknown(Exception):
    """A streamed chunk does not know its tokens' top-1 expert (the one pass is abandoned)."""


def _evaluate_streamed(placement_file, inputs: Sequence[str], *, dispatch: str, execution: str, phase: str,
                       chunk_tokens: int) -> dict | None:
    """:func:`evaluate_placement` in one pass over per-token inputs whose top-1 expert is known
    (tokens counted as they stream, no statistics built); None where that does not apply
    (count-only inputs, a chunk without top-1, no token): the caller then reads them as before."""
    read = [read_input(path, model=placement_file.model, chunk_tokens=chunk_tokens, gate_weights=False)
            for path in inputs]
    if not read or any(r.kind != "trace" for r in read):
        return None
    model = agree_model(placement_file.model, [(r.source, r.model) for r in read])
    assert model is not None  # a placement file always names its model

    every_chunk = stream_chunks(read, phase, model, 0)  # total unknown: no statistics pass

    def chunks() -> Iterator[RoutingTrace]:
        for chunk in every_chunk():
            if not chunk.has_top1:
                raise _Top1Unknown
            yield chunk

    stream = TraceStream(chunks, None, model.num_moe_layers, model.num_experts, model.top_k, True, model)
    try:
        metrics = evaluate(placement_file.placement, placement_file.topology, model, stream, dispatch=dispatch,
                           execution=execution)
    except _Top1Unknown:
        return None
    if metrics["data"]["tokens"] == 0:
        return None
    metrics["data"]["synthetic"] = any(r.synthetic for r in read)
    metrics["data"]["inputs"] = [r.source for r in read]
    return metrics
