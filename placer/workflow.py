"""Library-level glue behind the CLI: read several inputs, agree on one model, build statistics.

Every CLI command calls one of these functions with the same parameter names as its flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from placer.errors import InvalidInputError
from placer.profiling.stats import DEFAULT_SAMPLE_SIZE, StatsBuilder, merge_stats
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

    @property
    def data(self) -> RoutingTrace | RoutingStats:
        return self.trace if self.trace is not None else self.stats


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
    for r in read:
        if r.kind == "stats":
            assert r.stats is not None
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
            chunk = RoutingTrace(chunk.expert_ids, model.num_experts, chunk.order, chunk.gate_weights,
                                 chunk.request_ids, chunk.phase, chunk.home_rank, model)
            if builder is None:
                builder = StatsBuilder(model.num_moe_layers, model.num_experts, model.top_k,
                                       sample_size=sample_size, seed=seed, model=model)
            builder.update(chunk)
            kept_tokens += chunk.num_tokens
            if keep_trace and kept_tokens <= MAX_TRACE_TOKENS:
                kept.append(chunk)
    parts = ([builder.result("all")] if builder is not None else []) + count_only
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
                   synthetic=synthetic)




def write_synthetic(model: ModelSpec, tokens: int, *, seed: int = 0, perturb: float = 0.0,
                    phase: str | None = None, output: str) -> int:
    """Write a synthetic trace (native .npz, or chunked .parquet) marked synthetic; return tokens written."""
    from placer.io.traces import write_trace_npz, write_trace_parquet
    from placer.synthetic import perturbed, profile_for, synthesize

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
    result: object
    metrics: dict
    exported: list[tuple[str, str, list[str]]]


def solve_placement(inputs: Sequence[str], *, model: ModelSpec | None, topology, dispatch: str = "nearest",
                    execution: str = "standard", phase: str = "all", redundant: int = 0,
                    groups: int | None = None, method: str = "contiguous", seed: int = 0, time_limit_s: float | None = None,
                    output: str, exports: Sequence[tuple[str, str]] = ()) -> SolveOutcome:
    """Gather inputs, solve, score on the fitting data, write the placement and its exports."""
    from placer.ilp import PlacementProblem, solve
    from placer.io.placements import export_placement, write_placement_json
    from placer.metrics import evaluate
    from placer.profiling.stats import load_only_stats

    if inputs:
        routing = gather_routing(inputs, model=model, phase=phase)
        model = routing.model
        stats, data, synthetic = routing.stats, routing.data, routing.synthetic
    else:
        if model is None:
            raise InvalidInputError("give a routing input or --model PRESET", source="--model")
        stats = load_only_stats(np.zeros((model.num_moe_layers, model.num_experts)), model.top_k, model=model)
        data, synthetic = None, False
    if groups is not None:
        model = with_groups(model, groups)
        stats = replace(stats, model=model)
    problem = PlacementProblem(stats, model, topology, num_redundant=redundant, dispatch=dispatch,
                               execution=execution)
    result = solve(problem, method, time_limit_s=time_limit_s, seed=seed)
    metrics: dict = {}
    if data is not None:
        metrics = evaluate(result.placement, topology, model, data, dispatch=dispatch, execution=execution)
        metrics["data"]["synthetic"] = synthetic
        metrics["data"]["inputs"] = list(routing.sources)
    write_placement_json(output, result.placement, model=model, topology=topology, dispatch=dispatch,
                         method=result.method, status=result.status, solve_seconds=result.wall_time_s,
                         metrics=metrics)
    exported = [(fmt, path, export_placement(result.placement, fmt, path, model=model, topology=topology))
                for fmt, path in exports]
    return SolveOutcome(result=result, metrics=metrics, exported=exported)


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
    metrics = evaluate(placement_file.placement, placement_file.topology, routing.model, routing.data,
                       dispatch=dispatch, execution=execution)
    metrics["data"]["synthetic"] = routing.synthetic
    metrics["data"]["inputs"] = list(routing.sources)
    return metrics
