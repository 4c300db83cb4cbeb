"""Results of context-coherent placement: measurement, the SolveResult, replica fills.

Objective and terms come from :mod:`placer.metrics` and are checked against the solver's own
value (:func:`_result`); :func:`_fill_replicas` fills redundant slots (see
:mod:`placer.ilp.coherent`, "Replicas").
"""

from __future__ import annotations

import time

import numpy as np

from placer import metrics
from placer.ilp._cpsat import relative_gap
from placer.ilp.base import PlacementProblem
from placer.ilp.coherent.objective import CoherentObjective
from placer.ilp.coherent.search import _onehot
from placer.types import Placement, SolveResult


def _p2l(gpu: np.ndarray, capacities: tuple[int, ...]) -> np.ndarray:
    """Experts of GPU g (ascending) fill its first slots. int32 [L, E] (equal capacities)."""
    del capacities
    return np.argsort(gpu, axis=1, kind="stable").astype(np.int32)


def _measure(problem: PlacementProblem, placement: Placement) -> dict[str, float | None]:
    """Cross-GPU top-1 transitions and max GPU loads of a placement, from placer.metrics."""
    stats = problem.stats
    gl = metrics.gpu_load(placement, problem.topology, stats, dispatch=problem.dispatch)
    lb = metrics.load_balance(gl)
    out: dict[str, float | None] = {
        "sum_max_gpu_load": float(gl.max(axis=1).sum()),
        "load_max_over_mean_median": lb["median"], "load_max_over_mean_worst": lb["worst"],
        "frac_top1_transitions_cross_gpu": None, "cross_gpu_transitions": 0.0}
    if stats.top1_transitions is not None and stats.num_layers > 1:
        if placement.num_redundant and stats.sample_size == 0:
            out["cross_gpu_transitions"] = None
            return out
        cc = metrics.context_coherent_traffic(placement, problem.topology, problem.model, stats,
                                              dispatch=problem.dispatch)
        frac = cc["frac_top1_transitions_cross_gpu"]
        out["frac_top1_transitions_cross_gpu"] = frac
        if placement.num_redundant:
            out["cross_gpu_transitions"] = None if frac is None else frac * float(stats.top1_transitions.sum())
        else:
            per = np.nan_to_num(cc["per_layer"]["frac_top1_transitions_cross_gpu"])
            out["cross_gpu_transitions"] = float((per * stats.top1_transitions.sum(axis=(1, 2))).sum())
    return out


def _result(problem: PlacementProblem, obj: CoherentObjective, p2l: np.ndarray, *, status: str,
            bound_j: float | None, wall: float, method: str, backend: str,
            extra: dict[str, float] | None = None, internal_j: float | None = None,
            cross_override: float | None = None) -> SolveResult:
    """Build the SolveResult; objective and terms come from placer.metrics (checked against J).

    ``cross_override``: cross-GPU transitions to use when the metrics cannot measure them (a
    replica placement without a token sample; see :func:`solve_coherent`).
    """
    placement = Placement(p2l, problem.slots_per_gpu, problem.model.num_experts)
    m = _measure(problem, placement)
    if m["cross_gpu_transitions"] is None and cross_override is not None:
        m["cross_gpu_transitions"] = cross_override
        total = float(problem.stats.require_top1("the replica fill").sum())
        m["frac_top1_transitions_cross_gpu"] = cross_override / total if total > 0 else None
    cross, max_load = m["cross_gpu_transitions"], m["sum_max_gpu_load"]
    assert max_load is not None  # always measured
    objective = obj.affinity * (cross or 0.0) + obj.balance * float(max_load)
    if internal_j is not None:
        mine = obj.unit * internal_j
        if abs(mine - objective) > 1e-6 * max(1.0, abs(objective)) + 1e-12:
            raise RuntimeError(f"objective check failed: solver says {mine}, placer.metrics {objective}")
    bound = None if bound_j is None else obj.unit * bound_j
    if bound is not None:
        tol = 1e-6 * max(1.0, abs(objective))
        if bound > objective + tol:
            raise RuntimeError(f"bound {bound} exceeds the objective {objective}")
        bound = min(bound, objective)
    if status == "optimal":
        bound = objective
    gap = relative_gap(objective, bound)
    terms: dict[str, float] = {k: float(v) for k, v in m.items() if v is not None}
    terms.update({"affinity_cost": obj.affinity * (cross or 0.0),
                  "balance_cost": obj.balance * float(max_load),
                  "weight_affinity": obj.affinity, "weight_balance": obj.balance})
    if obj.load_cap is not None:
        terms["load_cap"] = float(obj.load_cap)
    terms.update(extra or {})
    return SolveResult(placement=placement, status=status, objective=float(objective), terms=terms,
                       bound=bound, gap=gap if gap is not None else None, wall_time_s=wall,
                       method=method, backend=backend)



def _fill_replicas(problem: PlacementProblem, obj: CoherentObjective, gpu: np.ndarray,
                   deadline: float | None = None) -> tuple[np.ndarray, dict]:
    """Slots of every GPU: its experts, then replicas (see the module docstring). int32 [L, P].

    Candidate fills per layer: ``affinity`` (the experts most often the next top-1 of tokens
    whose state is on the GPU) and ``balance`` (each free slot, lightest GPU first, gets the
    expert with the largest load per copy that it does not hold yet). Layer by layer, a
    candidate replaces the layer's current fill only when placer.metrics scores the whole
    placement better, so the result is never worse than the neutral fill.
    """
    num_layers, num_experts = gpu.shape
    num_gpus, slots = problem.topology.num_gpus, problem.slots_per_gpu
    neutral = np.empty((num_layers, num_gpus * slots), dtype=np.int32)
    cands: list[dict[str, np.ndarray]] = []
    for layer in range(num_layers):
        own = [np.flatnonzero(gpu[layer] == g) for g in range(num_gpus)]
        free = [slots - len(o) for o in own]
        for g in range(num_gpus):
            neutral[layer, g * slots:(g + 1) * slots] = np.concatenate([own[g], np.resize(own[g], free[g])])
        if layer > 0:
            inflow = obj.transitions[layer - 1].T @ _onehot(gpu[layer - 1], num_gpus)   # [E, G]
        else:
            inflow = np.repeat(obj.load[0][:, None], num_gpus, axis=1)
        aff = neutral[layer].copy()
        for g in range(num_gpus):
            pull = inflow[:, g].astype(np.float64).copy()
            pull[own[g]] = -np.inf
            pick = [int(e) for e in np.argsort(-pull, kind="stable")[:free[g]] if np.isfinite(pull[e])]
            pick += list(np.resize(own[g], free[g] - len(pick)))
            aff[g * slots + len(own[g]):(g + 1) * slots] = pick
        bal = neutral[layer].copy()
        copies = np.ones(num_experts)
        held = [set(o.tolist()) for o in own]
        gl = np.array([obj.load[layer, o].sum() for o in own])
        for g in np.argsort(gl, kind="stable"):
            for k in range(free[g]):
                share = obj.load[layer] / copies
                share[list(held[g])] = -np.inf
                e = int(np.argmax(share))
                if not np.isfinite(share[e]):
                    break
                bal[g * slots + len(own[g]) + k] = e
                held[g].add(e)
                copies[e] += 1
        cands.append({"affinity": aff, "balance": bal})
    info: dict[str, float] = {}
    stats = problem.stats
    if not (stats.has_top1 and stats.sample_size > 0):
        info["replica_layers_filled"] = 0.0
        return neutral, info

    def score(p2l: np.ndarray) -> float:
        m = _measure(problem, Placement(p2l, slots, num_experts))
        max_load = m["sum_max_gpu_load"]
        assert max_load is not None  # always measured
        return obj.affinity * (m["cross_gpu_transitions"] or 0.0) + obj.balance * max_load

    cur, cur_score = neutral.copy(), score(neutral)
    info["objective_neutral_fill"] = cur_score
    changed = 0
    for layer in range(num_layers):
        if deadline is not None and time.perf_counter() > deadline:
            break
        best_name = None
        for name, row in cands[layer].items():
            trial = cur.copy()
            trial[layer] = row
            sc = score(trial)
            if sc < cur_score - 1e-12 * max(1.0, abs(cur_score)):
                best_name, best_row, cur_score_new = name, row, sc
                cur_score = sc
        if best_name is not None:
            cur[layer] = best_row
            cur_score = cur_score_new
            changed += 1
    info["replica_layers_filled"] = float(changed)
    return cur, info

