"""Library-level glue behind the CLI: read several inputs, agree on one model, build statistics.

Every CLI command calls one of these functions with the same parameter names as its flags.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from placer.errors import InvalidInputError
from placer.profiling.stats import DEFAULT_SAMPLE_SIZE, StatsBuilder, merge_stats
from placer.stacks import Stack, resolve_dispatch
from placer.types import PHASE_CODES, ModelSpec, RoutingStats, RoutingTrace

MAX_TRACE_TOKENS = 4_000_000
"""Traces up to this many tokens are also kept whole, so metrics are exact on every token."""


@dataclass(frozen=True)
class Routing:
    """Routing gathered from one or more inputs.

    ``stats`` always exists. ``trace`` holds every token when all inputs are per-token traces
    of at most :data:`MAX_TRACE_TOKENS` tokens (after the phase filter), else it is None and
    metrics fall back to the statistics and their sample.
    """

    stats: RoutingStats
    trace: RoutingTrace | None
    model: ModelSpec
    sources: tuple[str, ...]
    synthetic: bool
    top1_source: str | None = None
    """The first input whose top-1 expert is unknown (None when every input's is known)."""
    top1_reason: str | None = None
    """Why that input's top-1 is unknown (see :func:`top1_reason`)."""

    @property
    def data(self) -> RoutingTrace | RoutingStats:
        return self.trace if self.trace is not None else self.stats

    @property
    def top1_note(self) -> str | None:
        """``"SOURCE: why"`` when the top-1 expert of the routing is unknown, else None."""
        return None if self.top1_reason is None else f"{self.top1_source}: {self.top1_reason}"


TOP1_METHODS = ("exflow",)
"""Methods whose objective is top-1 transitions: they refuse routing whose top-1 is unknown."""


def top1_reason(format: str, kind: str) -> str:
    """Why an input of ``format`` (``kind`` "trace" or "stats") has no known top-1 expert."""
    if format == "megatron-jsonl":
        from placer.io.external import MEGATRON_ASCENDING_NOTE
        return MEGATRON_ASCENDING_NOTE
    if kind == "stats":
        return "the statistics hold no top-1 transitions (counts only, or built from routing of unknown order)"
    return "the trace's expert order is unknown and it carries no gate weights; top-1 unknown"


def check_top1(routing: Routing | None, *, execution: str = "standard", methods: Sequence[str] = ()) -> None:
    """Refuse (InvalidInputError naming the input) when ``execution`` or one of ``methods`` needs each
    token's top-1 expert and ``routing`` does not know it; nothing to check without routing."""
    if routing is None or routing.top1_reason is None:
        return
    needs = [f"method {m}" for m in dict.fromkeys(methods) if m in TOP1_METHODS]
    if execution == "context-coherent":
        needs.insert(0, "context-coherent execution")
    if needs:
        raise InvalidInputError(f"{' and '.join(needs)} needs the top-1 expert of each token, but "
                                f"{routing.top1_reason}", source=str(routing.top1_source))


def agree_model(explicit: ModelSpec | None, found: Sequence[tuple[str, ModelSpec | None]]) -> ModelSpec | None:
    """The one model of a command: ``--model`` and every input header must agree."""
    model = explicit
    for source, m in found:
        if m is None:
            continue
        if model is None:
            model = m
        elif (m.num_moe_layers, m.num_experts, m.top_k) != (model.num_moe_layers, model.num_experts, model.top_k):
            raise InvalidInputError(f"describes model {m.name} ({m.num_moe_layers} MoE layers, E={m.num_experts}, "
                                    f"top_k={m.top_k}), which contradicts {model.name} ({model.num_moe_layers} "
                                    f"MoE layers, E={model.num_experts}, top_k={model.top_k})", source=source)
    return model


def _filter_phase(chunk: RoutingTrace, phase: str, source: str) -> RoutingTrace:
    if phase == "all":
        return chunk
    if chunk.phase is None:
        raise InvalidInputError(f"cannot select phase {phase!r}: the input records no phases", source=source)
    return chunk.select_tokens(chunk.phase == PHASE_CODES[phase])


def _concat(chunks: list[RoutingTrace], model: ModelSpec) -> RoutingTrace:
    if len(chunks) == 1 and chunks[0].model == model:
        return chunks[0]
    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(c, name) for c in chunks]
        return None if any(p is None for p in parts) else np.concatenate(parts)
    sorted_order = all(c.order == "sorted" for c in chunks)
    return RoutingTrace(np.concatenate([c.expert_ids for c in chunks]), model.num_experts,
                        "sorted" if sorted_order else "unknown", cat("gate_weights"), cat("request_ids"),
                        cat("phase"), cat("home_rank"), model)


def gather_routing(inputs: Sequence[str], *, model: ModelSpec | None = None, phase: str = "all",
                   sample_size: int = DEFAULT_SAMPLE_SIZE, seed: int = 0,
                   keep_trace: bool = True) -> Routing:
    """Read and merge routing inputs of any supported format into one :class:`Routing`.

    Per-token inputs stream through one :class:`StatsBuilder` (memory bounded by the
    statistics); count-only inputs (load matrices, SGLang stat dumps) merge in as counts.
    """
    from placer.io.traces import read_input

    if not inputs:
        raise InvalidInputError("no routing input given", source="TRACE")
    read = [read_input(path, model=model) for path in inputs]
    model = agree_model(model, [(r.source, r.model) for r in read])
    builder: StatsBuilder | None = None
    kept: list[RoutingTrace] = []
    count_only: list[RoutingStats] = []
    kept_tokens = 0
    top1_source = top1_why = None
    for r in read:
        if r.kind == "stats":
            assert r.stats is not None
            if top1_why is None and not r.stats.has_top1:
                top1_source, top1_why = r.source, top1_reason(r.format, "stats")
            if phase != "all" and r.stats.phase != phase:
                raise InvalidInputError(f"holds {r.stats.phase} counts only; cannot select phase {phase!r}",
                                        source=r.source)
            count_only.append(r.stats)
            continue
        for chunk in r.chunks():
            chunk = _filter_phase(chunk, phase, r.source)
            if model is None:
                model = ModelSpec.from_shape(chunk.num_layers, chunk.num_experts, chunk.top_k)
            if (chunk.num_layers, chunk.top_k) != (model.num_moe_layers, model.top_k) or \
                    chunk.num_experts > model.num_experts:
                raise InvalidInputError(f"routing shape [T, {chunk.num_layers}, {chunk.top_k}] with E={chunk.num_experts} "
                                        f"does not match {model.name} ({model.num_moe_layers} MoE layers, "
                                        f"E={model.num_experts}, top_k={model.top_k})", source=r.source)
            if chunk.num_experts != model.num_experts or chunk.model != model:  # else: validated already
                chunk = RoutingTrace(chunk.expert_ids, model.num_experts, chunk.order, chunk.gate_weights,
                                     chunk.request_ids, chunk.phase, chunk.home_rank, model)
            if top1_why is None and not chunk.has_top1:
                top1_source, top1_why = r.source, top1_reason(r.format, "trace")
            if builder is None:
                builder = StatsBuilder(model.num_moe_layers, model.num_experts, model.top_k,
                                       sample_size=sample_size, seed=seed, model=model)
            builder.update(chunk)
            kept_tokens += chunk.num_tokens
            if keep_trace and kept_tokens <= MAX_TRACE_TOKENS:
                kept.append(chunk)
    parts = ([builder.result("all", final=True)] if builder is not None else []) + count_only
    if model is None:
        first = count_only[0]
        model = ModelSpec.from_shape(first.num_layers, first.num_experts, first.top_k)
    for s in parts:
        if s.load.shape != (model.num_moe_layers, model.num_experts):
            raise InvalidInputError(f"counts of shape {s.load.shape} do not match {model.name} "
                                    f"({model.num_moe_layers} MoE layers x {model.num_experts} experts)",
                                    source="input")
    stats = merge_stats(parts) if len(parts) > 1 else parts[0]
    stats = replace(stats, model=model, phase=phase)
    trace = None
    if keep_trace and not count_only and kept and kept_tokens <= MAX_TRACE_TOKENS:
        trace = _concat(kept, model)
    synthetic = any(r.synthetic for r in read)
    return Routing(stats=stats, trace=trace, model=model, sources=tuple(r.source for r in read),
                   synthetic=synthetic, top1_source=top1_source, top1_reason=top1_why)




def write_synthetic(model: ModelSpec, tokens: int, *, seed: int = 0, perturb: float = 0.0,
                    phase: str | None = None, output: str) -> int:
    """Write a synthetic trace (native .npz, or chunked .parquet) marked synthetic; return tokens written."""
    from placer.io.atomic import check_writable
    from placer.io.traces import write_trace_npz, write_trace_parquet
    from placer.synthetic import check_trace_memory, perturbed, profile_for, synthesize

    if not output.endswith((".npz", ".parquet")):
        raise InvalidInputError("synthetic traces are written as .npz or .parquet", source=output)
    check_writable(output)
    if output.endswith(".npz"):  # built whole in memory (the chunks and their concatenation)
        check_trace_memory(model, tokens, copies=2, source="--tokens")
    else:  # streamed to disk: at least ~2 bytes per id and gate weight even compressed
        import shutil

        from placer.io._common import human_bytes
        folder = os.path.dirname(os.path.abspath(output))
        need, free = 2.0 * tokens * model.num_moe_layers * model.top_k, shutil.disk_usage(folder).free
        if need > free:
            raise InvalidInputError(f"{tokens:,} tokens of {model.name} need at least about {human_bytes(need)} "
                                    f"on disk; {human_bytes(free)} free in {folder}", source="--tokens")
    profile = profile_for(model)
    if perturb > 0:
        profile = perturbed(profile, perturb, seed)
    chunks = synthesize(model, tokens, seed=seed, profile=profile, phase=phase)
    if output.endswith(".parquet"):
        return write_trace_parquet(output, chunks, synthetic=True)
    if not output.endswith(".npz"):
        raise InvalidInputError("synthetic traces are written as .npz or .parquet", source=output)
    trace = _concat(list(chunks), model)
    write_trace_npz(output, trace, synthetic=True)
    return trace.num_tokens


def write_stats(routing: Routing, output: str) -> None:
    """Write the statistics of ``routing`` (native stats .npz, every phase it holds)."""
    from placer.io.traces import write_stats_npz
    write_stats_npz(output, routing.stats, synthetic=routing.synthetic)


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
                    started_at: float | None = None) -> SolveOutcome:
    """Gather inputs, solve, score on the fitting (and held-out) data against the baselines, write
    the placement and its exports.

    ``stack`` (:mod:`placer.stacks`) sets the rule solved and scored under (``dispatch``
    overrides it; neither: ``nearest``), checks that the stack can place the model, and is
    recorded in the placement file. ``started_at`` (``time.time()`` seconds; the CLI passes its
    process start): ``time_limit_s`` counts from then, the scoring included, not from the solve.
    """
    from placer.ilp import METHODS, PlacementProblem, solve
    from placer.io.placements import export_placement, write_placement_json
    from placer.metrics import evaluate
    from placer.profiling.stats import load_only_stats

    say = progress or (lambda message: None)
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}", source="--method")
    from placer.io.atomic import check_writable
    for path in [output, *(path for _, path in exports)]:  # before any work: nothing is half done
        check_writable(path)
    routing = None
    if inputs:
        say(f"reading {len(inputs)} input(s)")
        routing = gather_routing(inputs, model=model, phase=phase)
        model, stats = routing.model, routing.stats
        say(f"{stats.num_tokens:,} tokens of {model.name} routing ({model.num_moe_layers} MoE layers, "
            f"E={model.num_experts}, top_k={model.top_k})" + (", synthetic" if routing.synthetic else ""))
    else:
        if model is None:
            raise InvalidInputError("give a routing input or --model PRESET", source="--model")
        stats = load_only_stats(np.zeros((model.num_moe_layers, model.num_experts)), model.top_k, model=model)
    dispatch = resolve_dispatch(dispatch, stack, model)
    from placer.presets import check_problem_size
    check_problem_size(model, topology)
    if groups is not None:
        model = with_groups(model, groups)
        stats = replace(stats, model=model)
    held = None
    if holdout:
        say(f"reading {len(holdout)} held-out input(s)")
        held = gather_routing(holdout, model=model, phase=phase)
    check_top1(routing, execution=execution, methods=[method])
    check_top1(held, execution=execution)
    notes = []
    if method == "exact" and routing is not None and routing.top1_note is not None:
        notes.append(f"note: exact solved without its inter-layer affinity term (balance only): "
                     f"{routing.top1_note}")
    problem_weights = dict(weights or {})
    if objective is not None:
        problem_weights["objective"] = objective
    problem = PlacementProblem(stats, model, topology, num_redundant=redundant, dispatch=dispatch,
                               execution=execution, weights=problem_weights,
                               distinct_per_gpu=True if stack is not None and stack.distinct_per_gpu else None)
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

    def score(placement, data_routing):
        if data_routing is None:
            return None
        m = evaluate(placement, topology, model, data_routing.data, dispatch=dispatch, execution=execution)
        m["data"]["synthetic"] = data_routing.synthetic
        m["data"]["inputs"] = list(data_routing.sources)
        if not m["top1_known"]:
            m["top1_note"] = data_routing.top1_note
        return m

    scored_before: dict[bytes, dict] = {}  # a timed-out solve often returns a baseline's placement

    def scores(placement) -> dict:
        p2l = placement.physical_to_logical  # what the scores depend on (replica ranks order exports only)
        key = repr(p2l.shape).encode() + p2l.tobytes()
        if key not in scored_before:
            scored_before[key] = {label: score(placement, data_routing)
                                  for label, data_routing in (("fit", routing), ("holdout", held))}
        return copy.deepcopy(scored_before[key])

    # The baselines are scored first: with ``started_at`` the time limit counts from then (the
    # CLI: process start), and the solve is left what remains after scoring its own result.
    t_score = time.time()
    baselines = [(r, scores(r.placement)) for r in (solve(problem, m, seed=seed) for m in compare
                                                   if m != method and (routing is not None or m != "eplb"))]
    score_s = (time.time() - t_score) / max(1, len(baselines))
    solve_limit = time_limit_s
    if time_limit_s is not None and started_at is not None:
        solve_limit = max(0.01, started_at + time_limit_s - time.time() - 1.2 * score_s - 0.3)
    result = solve(problem, method, time_limit_s=solve_limit, seed=seed, **options)
    say(f"{method}: {result.status} in {result.wall_time_s:.2f} s; scoring")
    scored = scores(result.placement)
    rows = []
    for r, r_scores in [(result, scored), *baselines]:
        for label, metrics in r_scores.items():
            if metrics is not None:
                rows.append({"method": r.method, "data": label, "status": r.status, "gap": r.gap,
                             "solve_seconds": r.wall_time_s, "metrics": metrics})
    metrics = dict(scored["fit"] or {})
    if held is not None:
        metrics["holdout"] = scored["holdout"]
    metrics["objective"] = {"value": result.objective, "terms": dict(result.terms), "bound": result.bound,
                            "gap": result.gap, "backend": result.backend}
    # The exports first (a stack may refuse the placement): on a refusal nothing is left behind.
    exported, created = [], []
    try:
        for fmt, path in exports:
            new = not os.path.exists(path)
            exported.append((fmt, path, export_placement(result.placement, fmt, path, model=model,
                                                         topology=topology)))
            if new:
                created.append(path)
    except BaseException:
        for path in created:  # files this call created (an overwritten one's old content is gone)
            with contextlib.suppress(OSError):
                os.remove(path)
        raise
    write_placement_json(output, result.placement, model=model, topology=topology, dispatch=dispatch,
                         method=result.method, status=result.status, solve_seconds=result.wall_time_s,
                         metrics=metrics, stack=stack)
    return SolveOutcome(result=result, metrics=metrics, rows=rows, exported=exported, stack=stack,
                        dispatch=dispatch, notes=tuple(notes))


def with_groups(model: ModelSpec, groups: int) -> ModelSpec:
    """``model`` with ``groups`` expert groups (the group-limited routing EPLB's hierarchical policy uses)."""
    if model.num_experts % groups:
        raise InvalidInputError(f"{groups} groups do not divide {model.num_experts} experts", source="--groups")
    return replace(model, num_groups=groups, topk_groups=min(model.topk_groups, groups))


def evaluate_placement(placement_file, inputs: Sequence[str], *, dispatch: str, execution: str = "standard",
                       phase: str = "all") -> dict:
    """Score a placement file's placement on routing inputs (the file's model is authoritative)."""
    from placer.metrics import evaluate

    routing = gather_routing(inputs, model=placement_file.model, phase=phase)
    check_top1(routing, execution=execution)
    metrics = evaluate(placement_file.placement, placement_file.topology, routing.model, routing.data,
                       dispatch=dispatch, execution=execution)
    metrics["data"]["synthetic"] = routing.synthetic
    metrics["data"]["inputs"] = list(routing.sources)
    if not metrics["top1_known"]:
        metrics["top1_note"] = routing.top1_note
    return metrics
