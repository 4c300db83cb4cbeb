"""Entry points of context-coherent placement: :func:`solve_coherent`, :func:`compare_backends`
and the registered method ``exact`` (see :mod:`placer.ilp.coherent`)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from placer.errors import InvalidInputError
from placer.ilp._pulp import highs_available
from placer.ilp.base import PlacementProblem, register
from placer.ilp.coherent.formulation import MAX_MIP_SIZE, solve_mip
from placer.ilp.coherent.objective import (
    CoherentObjective,
    _capacities,
    _lower_bound,
    make_objective,
)
from placer.ilp.coherent.result import _fill_replicas, _measure, _p2l, _result
from placer.ilp.coherent.search import _greedy_gpu, local_search
from placer.ilp.exact import (
    MAX_PARTITIONS,
    count_partitions,
    exact_one_per_gpu,
    gpu_of_expert,
    partition_dp,
)
from placer.types import Placement, SolveResult

__all__ = ["BACKENDS", "compare_backends", "frontier_requested", "solve_coherent", "solve_exact"]

BACKENDS = ("auto", "exact", "local", "cpsat", "pulp")


def _exact_possible(obj: CoherentObjective) -> str | None:
    """None when an exact method applies, else the reason it does not."""
    e, g = obj.num_experts, obj.num_gpus
    if not obj.equal:
        return f"{e} experts do not split evenly over {g} GPUs"
    if e == g:
        return None
    n = count_partitions(e, g)
    if n > MAX_PARTITIONS:
        return f"{e} experts on {g} GPUs have {n:,} labelled partitions per layer (limit {MAX_PARTITIONS:,})"
    return None


def _proven(j: float, bound: float | None, violation: float = 0.0) -> str:
    """``optimal`` when a proven bound meets the objective (and no cap is violated), else ``feasible``."""
    if bound is not None and violation <= 0 and j - bound <= 1e-9 * max(1.0, abs(j)):
        return "optimal"
    return "feasible"


def _solve_primary(obj: CoherentObjective, backend: str, *, time_limit_s: float | None, seed: int,
                   deterministic_time: float | None, num_workers: int, pulp_backend: str,
                   warm_start: str | None, max_rounds: int) -> dict[str, Any]:
    """Place the E experts (no replicas). Returns gpu, status, J, bound (J units), backend."""
    if backend == "auto":
        backend = "exact" if _exact_possible(obj) is None else "local"
    if backend == "exact":
        why = _exact_possible(obj)
        if why is not None:
            raise InvalidInputError(f"exact needs no redundant slots and at most ~{MAX_PARTITIONS // 1000}k "
                                    f"partitions per layer ({why}); use --method placer", source="--method")
        if obj.num_experts == obj.num_gpus:
            # One expert per GPU: the load term is the same for every placement, the transition
            # term a chain of assignment problems (exact_one_per_gpu, here on the problem's T).
            p2l = exact_one_per_gpu(np.round(obj.transitions)) if obj.num_layers > 1 else \
                np.arange(obj.num_experts, dtype=np.int32)[None, :]
            gpu = gpu_of_expert(p2l, 1)
            j = obj.parts(gpu)[0]
            return {"gpu": gpu, "status": "optimal", "j": j, "bound": j, "backend": "ortools-lap"}
        res = partition_dp(obj.transitions, obj.load, obj.num_gpus, affinity_weight=obj.aff_int,
                           load_weight=obj.bal_int,
                           cap_load=obj.cap_load if obj.has_cap else None)
        return {"gpu": res.gpu, "status": "optimal", "j": res.objective, "bound": res.objective,
                "backend": "numpy-dp"}
    if backend not in ("local", "cpsat", "pulp"):
        raise InvalidInputError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}", source="--backend")
    size = max(obj.num_layers - 1, 1) * obj.num_experts ** 2 * obj.num_gpus
    if backend in ("cpsat", "pulp") and size > MAX_MIP_SIZE:
        raise InvalidInputError(f"the {backend} model would have {size:,} linking constraints (limit "
                                f"{MAX_MIP_SIZE:,}); use backend 'local'", source="--backend")
    start = time.perf_counter()
    ls_limit = time_limit_s if backend == "local" else (None if time_limit_s is None else 0.25 * time_limit_s)
    gpu, info = local_search(obj, seed=seed, max_rounds=max_rounds, time_limit_s=ls_limit)
    bound = _lower_bound(obj)
    if backend == "local":
        return {"gpu": gpu, "status": _proven(info.key[1], bound, info.key[0]), "j": info.key[1],
                "bound": bound, "backend": "numpy-local", "start": info.start, "start_j": info.start_key[1]}
    hint = None
    if warm_start == "local":
        hint = gpu
    elif warm_start == "greedy":
        hint = _greedy_gpu(obj)
    elif warm_start is not None:
        raise InvalidInputError(f"warm_start must be 'local', 'greedy' or None, got {warm_start!r}",
                                source="warm_start")
    rest = None if time_limit_s is None else max(0.1, time_limit_s - (time.perf_counter() - start))
    name = "cpsat" if backend == "cpsat" else f"pulp-{pulp_backend}"
    out = solve_mip(obj, hint, backend=name, time_limit_s=rest, deterministic_time=deterministic_time,
                    num_workers=num_workers, seed=seed)
    solver_bound = out["bound"]
    if backend == "cpsat" and not (np.all(obj.load == np.round(obj.load))
                                   and np.all(obj.transitions == np.round(obj.transitions))):
        # CP-SAT solved the rounded data: its bound and proof say nothing about the real objective.
        solver_bound = None
        if out["status"] == "optimal":
            out["status"] = "feasible"
    bounds = [b for b in (bound, solver_bound) if b is not None]
    best_bound = max(bounds) if bounds else None
    if out["gpu"] is None:
        # The solver found nothing (or nothing readable): keep the local search's placement.
        status = "infeasible" if out["status"] == "infeasible" else "timeout"
        if status == "infeasible":
            raise RuntimeError("the MIP is infeasible although a feasible placement is known")
        return {"gpu": gpu, "status": status, "j": info.key[1], "bound": best_bound, "backend": name,
                "mip_j": out["objective"], "mip_bound": solver_bound}
    cand = out["gpu"]
    ckey = obj.key(cand)
    status = out["status"]
    if ckey > info.key:  # the solver's incumbent is worse than the local search: keep the better
        cand, ckey = gpu, info.key
        if status == "optimal":
            status = "feasible"
    if status == "optimal" and ckey[0] > 0:
        status = "feasible"
    if status not in ("optimal", "timeout", "feasible"):
        status = "timeout"
    if _proven(ckey[1], best_bound, ckey[0]) == "optimal":
        status = "optimal"  # the b-matching + load bound (or the solver's) closes the gap
    return {"gpu": cand, "status": status, "j": ckey[1], "bound": best_bound, "backend": name,
            "mip_j": out["objective"], "mip_bound": solver_bound}



def solve_coherent(problem: PlacementProblem, *, time_limit_s: float | None = None, seed: int = 0,
                   backend: str = "auto", pulp_backend: str = "cbc", load_cap: float | None = None,
                   deterministic_time: float | None = None, num_workers: int = 1,
                   warm_start: str | None = "local", max_rounds: int = 200,
                   method: str | None = None, **_) -> SolveResult:
    """Context-coherent placement of ``problem`` (any shape; see the module docstring).

    ``backend``: "auto" | "exact" | "local" | "cpsat" | "pulp" (``pulp_backend`` "cbc" |
    "highs"). ``warm_start``: "local" (default), "greedy" or None for CP-SAT / PuLP.
    ``deterministic_time`` and ``num_workers`` go to CP-SAT (``num_workers`` is also the MIP
    thread count); ``max_rounds`` bounds the local search. ``load_cap`` adds a hard per-layer
    max/mean GPU load cap. ``bound`` / ``gap`` are proven (exact, CP-SAT, MIP, or the
    b-matching + load bound for local search); None with replicas.
    """
    start = time.perf_counter()
    num_experts, num_gpus = problem.model.num_experts, problem.topology.num_gpus
    replicas = problem.num_redundant > 0
    caps = _capacities(num_experts, num_gpus)
    if replicas and max(caps) > problem.slots_per_gpu:  # cannot happen: P >= E
        raise InvalidInputError("not enough slots per GPU", source="--redundant")
    if backend == "exact" and replicas:
        raise InvalidInputError(f"exact needs no redundant slots (got --redundant {problem.num_redundant}) "
                                f"and at most ~{MAX_PARTITIONS // 1000}k partitions per layer; "
                                "use --method placer", source="--method")
    obj = make_objective(problem, capacities=caps, load_cap=load_cap)
    primary_backend = backend
    if replicas and backend in ("auto", "exact", "cpsat", "pulp") and not obj.equal:
        primary_backend = "local"  # the exact, CP-SAT and MIP models assume equal groups
    primary_limit = time_limit_s if time_limit_s is None or not replicas else 0.7 * time_limit_s
    out = _solve_primary(obj, primary_backend, time_limit_s=primary_limit, seed=seed,
                         deterministic_time=deterministic_time, num_workers=num_workers,
                         pulp_backend=pulp_backend, warm_start=warm_start, max_rounds=max_rounds)
    gpu = out["gpu"]
    extra: dict[str, float] = {}
    if "start_j" in out:
        extra["start_objective"] = obj.unit * out["start_j"]
    for key in ("mip_j", "mip_bound"):  # the MIP's own incumbent and bound (before the local fallback)
        if out.get(key) is not None:
            extra["mip_objective" if key == "mip_j" else "mip_bound"] = obj.unit * out[key]
    exact_backend = out["backend"] in ("ortools-lap", "numpy-dp")
    name = method or ("exact" if exact_backend and not replicas else f"coherent-{out['backend']}")
    if not replicas:
        wall = time.perf_counter() - start
        return _result(problem, obj, _p2l(gpu, caps), status=out["status"], bound_j=out["bound"],
                       wall=wall, method=name, backend=out["backend"], extra=extra, internal_j=out["j"])
    p2l, info = _fill_replicas(problem, obj, gpu, None if time_limit_s is None else start + time_limit_s)
    extra.update(info)
    override = None
    if problem.stats.has_top1 and problem.stats.sample_size == 0:
        # Neutral fill (no token sample to measure replicas): it routes exactly like the E
        # experts alone, whose transitions placer.metrics measures exactly from the stats when
        # the GPUs hold equal numbers of them (else the same count from coherent_cost).
        if obj.equal:
            primary = Placement(_p2l(gpu, caps), caps[0], num_experts)
            override = _measure(replace(problem, num_redundant=0), primary)["cross_gpu_transitions"]
        else:
            override = float(obj.parts(gpu)[1].sum())
    wall = time.perf_counter() - start
    return _result(problem, obj, p2l, status="feasible", bound_j=None, wall=wall, method=name,
                   backend=out["backend"], extra=extra, cross_override=override)


def compare_backends(problem: PlacementProblem, *, time_limit_s: float = 60.0, seed: int = 0,
                     backends: tuple[str, ...] = ("exact", "local", "cpsat", "cbc", "highs"),
                     warm_start: str | None = "local", num_workers: int = 1,
                     load_cap: float | None = None) -> dict[str, dict[str, Any]]:
    """Run several backends on one problem (no replicas) and compare them with the exact optimum.

    Returns ``{backend: {status, objective, bound, gap, wall_time_s, frac_top1_transitions_cross_gpu,
    load_max_over_mean_median, mip_objective, mip_bound, placement, rel_to_exact}}`` (``mip_*``:
    the MIP's own incumbent and bound before the local-search fallback) (``rel_to_exact`` = objective / exact - 1 when
    ``exact`` ran; ``error`` instead when a backend could not run).
    """
    out: dict[str, dict[str, Any]] = {}
    for name in backends:
        kwargs: dict[str, Any] = dict(time_limit_s=time_limit_s, seed=seed, load_cap=load_cap,
                                      num_workers=num_workers, warm_start=warm_start)
        if name in ("cbc", "highs"):
            if name == "highs" and not highs_available():
                out[name] = {"error": "highspy is not installed"}
                continue
            kwargs.update(backend="pulp", pulp_backend=name)
        else:
            kwargs["backend"] = name
        try:
            res = solve_coherent(problem, **kwargs)
        except InvalidInputError as exc:
            out[name] = {"error": str(exc)}
            continue
        out[name] = {"status": res.status, "objective": res.objective, "bound": res.bound, "gap": res.gap,
                     "wall_time_s": res.wall_time_s, "backend": res.backend,
                     "frac_top1_transitions_cross_gpu": res.terms.get("frac_top1_transitions_cross_gpu"),
                     "load_max_over_mean_median": res.terms.get("load_max_over_mean_median"),
                     "mip_objective": res.terms.get("mip_objective"), "mip_bound": res.terms.get("mip_bound"),
                     "placement": res.placement}
    exact = out.get("exact", {}).get("objective")
    for row in out.values():
        if exact is not None and "objective" in row:
            row["rel_to_exact"] = row["objective"] / exact - 1.0 if exact else 0.0
    return out


def frontier_requested(problem: PlacementProblem, load_cap: float | None = None) -> bool:
    """Whether method ``exact`` solves ``problem`` by the standard-execution frontier
    (:mod:`placer.ilp.frontier`): standard execution with redundant slots, a load cap
    (``load_cap`` or ``problem.weights["load_cap"]``) or ``problem.weights["frontier"]``."""
    if problem.execution != "standard":
        return False
    w = problem.weights or {}
    return problem.num_redundant > 0 or load_cap is not None or "load_cap" in w or bool(w.get("frontier"))


def solve_exact(problem: PlacementProblem, *, time_limit_s: float | None = None, seed: int = 0,
                load_cap: float | None = None, **options) -> SolveResult:
    """Method ``exact``: proven optima where the structure allows them.

    **Standard execution** with redundant slots, a load cap or ``problem.weights["frontier"]``:
    the exact frontier of inter-node dispatches against max/mean GPU load
    (:func:`placer.ilp.frontier.solve_frontier`): the fewest dispatches at max/mean <=
    ``load_cap`` (or ``problem.weights["load_cap"]``) in every layer, the most balanced point
    without one; shapes it cannot enumerate raise InvalidInputError naming what to use instead.

    **Otherwise** (context-coherent execution, or standard execution with none of those): the
    proven-optimal context-coherent placement without replicas. One expert per GPU: chain of
    assignment problems. E / G experts per GPU with at most
    :data:`~placer.ilp.exact.MAX_PARTITIONS` labelled partitions per layer: the partition DP
    (:mod:`placer.ilp.exact`) with the default load term of :func:`solve_coherent` (a weighted
    penalty on each layer's max GPU load; ``load_cap`` adds the hard cap instead or as well).
    Any other shape, or redundant slots, raises InvalidInputError naming why.
    ``time_limit_s`` and ``seed`` are ignored (the result is deterministic).
    """
    if frontier_requested(problem, load_cap):
        from placer.ilp.frontier import solve_frontier  # deferred: only this path needs it

        used = sorted(k for k, v in options.items()
                      if v is not None and k != "num_workers" and not (k == "backend" and v == "exact"))
        if used:
            raise InvalidInputError(f"the exact frontier takes no option {used[0]!r}", source="--method")
        cap = load_cap if load_cap is not None else (problem.weights or {}).get("load_cap")
        return solve_frontier(problem, load_cap=None if cap is None else float(cap))
    if (problem.weights or {}).get("frontier"):
        raise InvalidInputError("the exact frontier is for standard execution (--execution standard)",
                                source="--frontier")
    return solve_coherent(problem, time_limit_s=time_limit_s, seed=seed, backend="exact", load_cap=load_cap,
                          **options)


register("exact", forwards_to="placer.ilp.coherent:solve_coherent")(solve_exact)
