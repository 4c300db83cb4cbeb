"""What the ``placer simulate`` commands call: gather inputs, simulate, write the results layout.

Placements come from native placement files or from solver methods run on the routing input
(``method:NAME`` labels), so a sweep over GPU counts can re-solve at each count.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from placer.display import MISSING, format_value, is_missing, table
from placer.errors import InvalidInputError
from placer.ilp import METHODS, PlacementProblem, solve
from placer.io.placements import read_placement_file, write_placement_json
from placer.presets import check_problem_size
from placer.simulator.config import ReplayWorkload, ServingWorkload, SimConfig
from placer.simulator.results import RunOutput, sha256_of, write_results
from placer.simulator.simulate import simulate
from placer.stats import compute_stats, load_only_stats
from placer.synthetic import synthesize_trace
from placer.types import ModelSpec, Placement, RoutingStats, RoutingTrace, Topology


@dataclass(frozen=True)
class Candidate:
    """A placement to simulate: its ``label``, the placement, where it came from."""

    label: str
    placement: Placement
    path: str | None
    method: str | None
    status: str = "feasible"
    dispatch: str | None = None


def _unique_labels(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def placement_candidates(paths: Sequence[str], methods: Sequence[str], *, model: ModelSpec | None,
                         topology: Topology | None, stats: RoutingStats | None, redundant: int = 0,
                         dispatch: str = "nearest", execution: str = "standard",
                         seed: int = 0) -> tuple[list[Candidate], ModelSpec, Topology]:
    """Read ``paths`` (placement files of any stack) and solve ``methods``; all share one model and cluster.

    A native file's model and cluster are authoritative; ``model``/``topology`` given alongside
    must agree. A serving stack's file holds only the map: it needs ``model`` and ``topology``. Methods need ``stats`` for the load (balance-only methods accept none) and a
    ``topology``.
    """
    found: list[tuple[str, Placement, str | None, str | None, str, str]] = []
    for path in paths:
        pf = read_placement_file(path, model=model, topology=topology)
        if model is not None and (pf.model.num_moe_layers, pf.model.num_experts, pf.model.top_k) != \
                (model.num_moe_layers, model.num_experts, model.top_k):
            raise InvalidInputError(f"placement is for {pf.model.name}, not {model.name}", source=path)
        if topology is not None and pf.topology.num_gpus != topology.num_gpus:
            raise InvalidInputError(f"placement spans {pf.topology.num_gpus} GPUs, the cluster has "
                                    f"{topology.num_gpus}", source=path)
        model = model if model is not None and model.sizes_known else pf.model
        topology = topology or pf.topology
        found.append((pf.method, pf.placement, path, pf.method, pf.status, pf.dispatch))
    if methods:
        if model is None or topology is None:
            raise InvalidInputError("solving a placement needs the model and cluster (--model, --gpus)",
                                    source="--method")
        check_problem_size(model, topology, simulate=True)
        if stats is None:
            if not model.sizes_known and model.name == "custom":
                stats = load_only_stats(np.zeros((model.num_moe_layers, model.num_experts)), model.top_k, model=model)
            else:
                stats = synthetic_stats(model, seed)
        problem = PlacementProblem(stats, model, topology, num_redundant=redundant, dispatch=dispatch,
                                   execution=execution)
        for method in methods:
            if method not in METHODS:
                raise InvalidInputError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}",
                                        source="--method")
            result = solve(problem, method, seed=seed)
            assert result.placement is not None  # a posed problem is feasible (PlacementProblem checks it)
            found.append((method, result.placement, None, method, result.status, dispatch))
    if not found:
        raise InvalidInputError("give at least one --placement FILE or --method NAME", source="--placement")
    if model is None or topology is None:
        raise InvalidInputError("the model and cluster are unknown", source="--model")
    check_problem_size(model, topology, simulate=True)
    labels = _unique_labels([name for name, *_ in found])
    return [Candidate(label, p, path, method, status if status != "infeasible" else "feasible", rule)
            for label, (_, p, path, method, status, rule) in zip(labels, found, strict=True)], model, topology


SYNTHETIC_FIT_TOKENS = 20000


def synthetic_stats(model: ModelSpec, seed: int) -> RoutingStats:
    """Statistics to solve on when there is no routing input: the model's synthetic preset at seed
    ``seed + 1`` (the simulation's own synthetic pool uses ``seed``, so they do not overlap)."""
    return compute_stats(synthesize_trace(model, SYNTHETIC_FIT_TOKENS, seed=seed + 1))


def routing_identity(sources: Sequence[str], routing: RoutingTrace | RoutingStats | None, model: ModelSpec,
                     synthetic: bool) -> dict[str, Any]:
    """The routing input's identity for ``metrics.json``."""
    if not sources:
        return {"source": f"synthetic:{model.name}", "sha256": None, "tokens": None}
    digest = hashlib.sha256()
    for path in sources:
        digest.update(sha256_of(path).encode())
    tokens = routing.num_tokens if routing is not None else None
    return {"source": ", ".join(sources), "sha256": digest.hexdigest(), "tokens": tokens, "synthetic": synthetic}


def run_comparison(candidates: Sequence[Candidate], topology: Topology, model: ModelSpec, *,
                   routing: RoutingTrace | RoutingStats | None, routing_info: dict[str, Any],
                   workload: ServingWorkload | ReplayWorkload, config: SimConfig, level: str = "count",
                   output: str | None = None,
                   progress: Callable[[str, int, float], None] | None = None) -> list[RunOutput]:
    """Simulate every candidate with the same routing, workload and seeds; write ``output`` when given.

    Candidates solved on the fly (no file) are written to ``output/placement-<label>.json``, so
    the results directory names every placement it simulated.
    """
    if output is not None:
        os.makedirs(output, exist_ok=True)
        written = []
        for c in candidates:
            if c.path is None:
                path = os.path.join(output, f"placement-{c.label.replace('/', '_')}.json")
                write_placement_json(path, c.placement, model=model, topology=topology,
                                     dispatch=config.dispatch or c.dispatch or "nearest",
                                     method=c.method or c.label, status=c.status, solve_seconds=0.0)
                c = Candidate(c.label, c.placement, path, c.method, c.status, c.dispatch)
            written.append(c)
        candidates = written
    runs = []
    rules = {c.label: config.dispatch or c.dispatch or "nearest" for c in candidates}
    for c in candidates:
        def tick(step: int, now: float, label: str = c.label) -> None:
            if progress is not None:
                progress(label, step, now)
        runs.append(simulate(c.placement, topology, model, routing=routing, workload=workload,
                             config=replace(config, dispatch=rules[c.label]), label=c.label, level=level,
                             progress=tick))
    if output is not None:
        inputs = {
            "model": model.to_dict(), "topology": topology.to_dict(), "routing": routing_info,
            "placements": {c.label: {"path": c.path, "sha256": sha256_of(c.path) if c.path else None,
                                     "method": c.method, "dispatch": rules[c.label]} for c in candidates},
            "workload": {"kind": workload.kind, **{k: v for k, v in asdict(workload).items() if k != "kind"}},
            "config": {**config.to_dict(), "level": level,
                       "dispatch": rules[candidates[0].label] if len(set(rules.values())) == 1 else "per-placement"},
        }
        write_results(output, inputs, runs)
    return runs


COMPARE_KEYS = ("iterations", "simulated_s", "throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
                "tpot_p99_s", "e2e_p99_s", "iteration_p50_s", "iteration_p99_s", "a2a_p50_s", "a2a_p99_s",
                "dispatch_s", "compute_s", "combine_s", "attention_s", "straggler_share", "max_link_utilisation",
                "nvlink_bytes", "rdma_bytes")


def comparison_table(runs: Sequence[RunOutput]) -> str:
    """Metrics side by side, one column per placement, with the ratio of each to the first."""
    labels = [r.label for r in runs]
    header = ["metric"] + labels + [f"{lab}/{labels[0]}" for lab in labels[1:]]
    rows = []
    for key in COMPARE_KEYS:
        vals = [r.summary.get(key) for r in runs]
        if all(is_missing(v) for v in vals):
            continue
        base = vals[0]
        ratios = [format_value("ratio", v / base) if isinstance(v, int | float) and isinstance(base, int | float)
                  and base else MISSING for v in vals[1:]]
        rows.append([key] + [format_value(key, v) for v in vals] + ratios)
    return table(rows, header=header)
