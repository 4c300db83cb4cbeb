"""ExFlow (Yao et al., arXiv 2401.08383; YJHMITWEB/ExFlow ``solve_affinity.py``): affinity ILP.

A **baseline implemented as published** (docs/reference/placement.md section 2). It
targets context-coherent execution, where a token's state follows its top-1 expert, so it
minimises the number of top-1 transitions between consecutive layers that cross GPUs.

**One split.** A part of the experts (``m`` per layer) is split into P sub-parts: binary
``x[l, e, p]``; each expert in exactly one sub-part; exactly ``m / P`` experts per sub-part per
layer; ``R[l, i, j] >= |x[l, i, p] - x[l+1, j, p]|`` for every p; minimise
``sum T[l, i, j] * R[l, i, j]`` over the transitions with both ends in the part.

**Aggregation.** The repository has one binary ``cost[k, s]`` per token k and transition s. Its
constraints depend only on the transition's ``(l, i, j)``, so every token with the same
``(l, i, j)`` has the same feasible cost values, all equal to ``max_p |x - x'|`` at the optimum.
One ``R[l, i, j]`` per nonzero entry of ``T = stats.top1_transitions``, weighted by the count,
therefore has the **same optimum and the same optimal placements** as the per-token model (the
repository's division by the number of transitions is a constant). The model then has at most
``(L-1) E^2`` cost variables whatever the number of tokens.

**Schemes** (``scheme``; each level splits every part of the previous one):

- ``"bipartition"`` (default, the repository's ``use_bipart = True``): log2 G levels of 2-way
  splits; needs G a power of two (otherwise ``"staged"`` runs). With nodes of a power-of-two
  size the first levels are exactly the splits across nodes.
- ``"staged"`` (the paper's text): across nodes first (P = number of nodes) when there are
  several, then across the GPUs inside each node.
- ``"direct"``: one P = G solve (older repository commits).

A split only sees the transitions inside its part: one cut at an earlier level stays cross-GPU.

**Tokens in batches** (``token_batch``, the repository adds 5 000 at a time): every split is
solved on the top-1 counts of the first ``b * token_batch`` tokens of the stats' reservoir
sample, b = 1, 2, ..., then on the full counts, each solve hinted with the previous answer.
Default ``None``: the full counts at once (the aggregated model's size does not grow with the
tokens, so batching only changes the search path).

**Budget.** ``time_limit_s`` (wall) and ``deterministic_time`` (CP-SAT units) cover the whole
solve and are split over the sub-solves in proportion to m^2 for an m-expert part (unused time
rolls over); ``subsolve_time_s`` caps each (default 60 s, the repository's value: at Mixtral
size the first bisection is not proven optimal in minutes, so an uncapped solve would not end). Each sub-solve is hinted with the contiguous split (or the
previous batch's answer) and never returns something worse than its hint on its own objective;
the final placement is never worse than contiguous (else contiguous is returned).

**Bound.** The first level's split relaxes the whole problem: grouping the G GPUs of any
balanced placement into the first level's P groups gives a balanced P-way split that cuts no
more transitions. Its proven bound is therefore a lower bound on the best G-way placement, and
``status`` is ``optimal`` only when the placement meets it (always possible for G = 2 or
``"direct"``); ``timeout`` when a sub-solve stopped at a limit; ``feasible`` otherwise.

**Objective**: the fraction of top-1 transitions crossing GPUs, in-sample, from
:func:`placer.metrics.context_coherent_traffic` (``frac_top1_transitions_cross_gpu``).
Requires top-1 experts (``stats.require_top1``), no replicas (``num_redundant > 0`` raises
InvalidInputError, as for moetuner) and ``E % G == 0``.

**Backends**: ``"cpsat"`` (default), ``"pulp"`` / ``"pulp-cbc"``, ``"pulp-highs"`` through
:class:`placer.ilp.mip.MipModel`, as in :mod:`placer.ilp.moetuner` (``R`` is continuous in
[0, 1] in PuLP, integral at the optimum), and ``"dp"``: each split's **exact** optimum by dynamic programming. The cost couples
consecutive layers only, so a split's ILP is a shortest path through each layer's balanced
splits; ``dp`` enumerates them when there are at most :data:`DP_MAX_STATES` per layer (every
split of Mixtral's 8 experts into 2 or 4 parts). It answers the same ILP as the solvers, only
exactly. At Mixtral size one CP-SAT worker stays far from a split's optimum (fit on 4 MT-Bench
categories, 4 GPUs: 0.677 of top-1 transitions cross GPUs after 10 deterministic seconds per
solve, against 0.550 with exact splits; HiGHS, 60 s: 0.547; the repository used Gurobi), so
``dp`` is the faithful way to run the baseline there (benchmarks/eval_baselines.py). Token
batches do not change its answer and are skipped.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import replace

import numpy as np

from placer import metrics
from placer.errors import InvalidInputError
from placer.ilp._cpsat import relative_gap
from placer.ilp.base import PlacementProblem, register
from placer.ilp.mip import Budget, MipModel, normalise_backend
from placer.ilp.simple import contiguous_map
from placer.types import Placement, RoutingStats, SolveResult, Topology

__all__ = ["BACKENDS", "DP_MAX_STATES", "SCHEMES", "balanced_splits", "batch_counts", "cut",
           "exflow_assignment", "num_balanced_splits", "plan_weight", "solve_exflow", "split_part",
           "split_part_dp", "split_plan", "top1_counts"]

SCHEMES = ("bipartition", "staged", "direct")
BACKENDS = ("auto", "cpsat", "pulp", "pulp-cbc", "pulp-highs", "dp")
DP_MAX_STATES = 3000
"""Largest number of balanced splits per layer the ``dp`` backend enumerates, and the size up to
which ``auto`` picks it (Mixtral: 70 for a bisection of 8 experts, 2 520 for 4 parts of 2)."""


def top1_counts(top1: np.ndarray, num_experts: int) -> np.ndarray:
    """``[l, i, j]`` = tokens with top-1 expert i at layer l and j at l+1; ``top1`` int [T, L]."""
    num_tokens, num_layers = top1.shape
    flat = (np.arange(num_layers - 1)[None, :] * num_experts + top1[:, :-1].astype(np.int64)) \
        * num_experts + top1[:, 1:]
    counts = np.bincount(flat.ravel(), minlength=(num_layers - 1) * num_experts ** 2)
    return counts.reshape(num_layers - 1, num_experts, num_experts).astype(np.int64)


def batch_counts(stats: RoutingStats, token_batch: int | None) -> list[np.ndarray]:
    """Cumulative top-1 counts of the sample's first ``b * token_batch`` tokens, then the full counts."""
    full = stats.require_top1("exflow")
    if token_batch is None:
        return [full]
    if token_batch < 1:
        raise InvalidInputError(f"token_batch must be positive, got {token_batch}", source="token_batch")
    top1 = stats.require_sample("exflow token batches")[:, :, 0]
    ends = range(token_batch, top1.shape[0], token_batch)
    return [top1_counts(top1[:end], stats.num_experts) for end in ends] + [full]


def cut(counts: np.ndarray, part_of: np.ndarray) -> int:
    """Transitions whose ends lie in different parts: ``counts`` [L-1, m, m], ``part_of`` [L, m]."""
    return int((counts * (part_of[:-1, :, None] != part_of[1:, None, :])).sum())


def _sub_counts(counts: np.ndarray, members: np.ndarray) -> np.ndarray:
    """The transitions among one part's experts: int64 [L-1, m, m]."""
    return np.stack([counts[lay][np.ix_(members[lay], members[lay + 1])]
                     for lay in range(counts.shape[0])])


def split_part(counts_seq: list[np.ndarray], members: np.ndarray, num_parts: int, *,
               backend: str = "cpsat", budget: Budget | None = None, weight: float = 1.0,
               num_workers: int = 1, seed: int = 0) -> tuple[np.ndarray, str, float | None]:
    """Split one part (``members`` [L, m], sorted expert ids) into ``num_parts`` equal sub-parts.

    Solves once per count matrix of ``counts_seq`` (the last is the full counts), each hinted
    with the previous answer, the first with the contiguous split; each solve takes ``weight``
    of the budget. Returns ``part_of`` int64 [L, m], the status of the last solve and its
    proven bound on the cut (None when unknown).
    """
    if backend == "dp":  # exact; token batches would not change the answer
        part_of, value = split_part_dp(counts_seq[-1], members, num_parts)
        return part_of, "optimal", float(value)
    num_layers, size = members.shape
    per_part = size // num_parts
    budget = budget or Budget(None, None, weight * len(counts_seq))
    layers, slots, parts = range(num_layers), range(size), range(num_parts)
    current = np.tile(np.arange(size) // per_part, (num_layers, 1))  # the contiguous split
    status, bound = "optimal", None
    for counts in counts_seq:
        sub = _sub_counts(counts, members)
        model = MipModel(backend, "exflow-split")
        # Symmetry: the sub-parts are interchangeable, so layer 0's a-th expert joins parts p <= a.
        x = {(lay, a, p): model.bool_var(f"x_l{lay}_e{members[lay, a]}_p{p}")
             for lay in layers for a in slots for p in parts if lay > 0 or p <= a}
        # Each expert goes to exactly one part.
        for lay in layers:
            for a in slots:
                row = [x[lay, a, p] for p in parts if (lay, a, p) in x]
                model.add(model.dot([1] * len(row), row) == 1)
        # Every part holds exactly m / P experts in every layer.
        for lay in layers:
            for p in parts:
                col = [x[lay, a, p] for a in slots if (lay, a, p) in x]
                model.add(model.dot([1] * len(col), col) == per_part)
        # R[l, i, j] >= |x[l, i, p] - x[l+1, j, p]|: 1 when the transition i -> j crosses parts.
        terms, cost_vars = [], {}
        for lay, a, b in zip(*np.nonzero(sub), strict=True):
            r = model.aux_var(1, f"R_l{lay}_i{members[lay, a]}_j{members[lay + 1, b]}")
            for p in parts:
                left, right = x.get((lay, a, p)), x.get((lay + 1, b, p))
                if left is None and right is None:
                    continue
                model.add(r >= (left if left is not None else 0) - (right if right is not None else 0))
                model.add(r >= (right if right is not None else 0) - (left if left is not None else 0))
            terms.append((int(sub[lay, a, b]), r))
            cost_vars[lay, a, b] = r
        # Redundant (a valid cut that tightens the bound): only m / P experts of the next layer
        # share expert i's part, so at least (its nonzero transitions - m / P) of them are cut;
        # likewise into expert j from the previous layer.
        for lay in range(num_layers - 1):
            for a in slots:
                for row in ([cost_vars[key] for key in ((lay, a, b) for b in slots) if key in cost_vars],
                            [cost_vars[key] for key in ((lay, b, a) for b in slots) if key in cost_vars]):
                    if len(row) > per_part:
                        model.add(model.dot([1] * len(row), row) >= len(row) - per_part, cut=True)
        model.minimize(model.dot([c for c, _ in terms], [r for _, r in terms]))
        # Warm start: the contiguous split, or the previous batch's answer.
        for (lay, a, p), var in x.items():
            model.hint(var, int(current[lay, a] == p))

        outcome = budget.run(model, weight, num_workers=num_workers, seed=seed)
        status, bound, read = outcome.status, outcome.bound, outcome.value
        if read is not None:  # solved
            found = np.array([[next(p for p in parts if (lay, a, p) in x and read(x[lay, a, p]))
                               for a in slots] for lay in layers], dtype=np.int64)
            if cut(sub, found) <= cut(sub, current):
                current = found
    return current, status, bound


def balanced_splits(size: int, num_parts: int) -> np.ndarray:
    """Every labelling of ``size`` items with ``size / num_parts`` items per label: int64 [n, size]."""
    per_part = size // num_parts
    out: list[np.ndarray] = []

    def place(labels: np.ndarray, free: list[int], part: int) -> None:
        if part == num_parts - 1:
            labels[free] = part
            out.append(labels.copy())
            return
        for chosen in itertools.combinations(free, per_part):
            labels[list(chosen)] = part
            place(labels, [i for i in free if i not in chosen], part + 1)

    place(np.zeros(size, dtype=np.int64), list(range(size)), 0)
    return np.array(out, dtype=np.int64)


def num_balanced_splits(size: int, num_parts: int) -> int:
    return math.factorial(size) // math.factorial(size // num_parts) ** num_parts


def split_part_dp(counts: np.ndarray, members: np.ndarray, num_parts: int) -> tuple[np.ndarray, int]:
    """The split's exact optimum by dynamic programming over each layer's balanced splits.

    The cost couples consecutive layers only, so the ILP's optimum is a shortest path through
    the layers' balanced splits (``m! / ((m/P)!)^P`` per layer, at most :data:`DP_MAX_STATES`).
    Returns ``part_of`` int64 [L, m] and its cut. Ties go to the lowest-numbered split.
    """
    num_layers, size = members.shape
    if num_balanced_splits(size, num_parts) > DP_MAX_STATES:
        raise InvalidInputError(f"the dp backend enumerates {num_balanced_splits(size, num_parts)} "
                                f"splits per layer (> {DP_MAX_STATES}); use cpsat or pulp",
                                source="--backend")
    states = balanced_splits(size, num_parts)
    onehot = (states[:, :, None] == np.arange(num_parts)).astype(np.float64)  # [n, m, P]
    sub = _sub_counts(counts, members).astype(np.float64)
    best = np.zeros(len(states))
    back = []
    for lay in range(num_layers - 1):
        toward = np.einsum("aip,ij->apj", onehot, sub[lay])        # [n, P, m]
        kept = np.einsum("apj,bjp->ab", toward, onehot)             # same-part transitions
        total = best[:, None] + (sub[lay].sum() - kept)
        back.append(total.argmin(axis=0))
        best = total.min(axis=0)
    path = [int(best.argmin())]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    part_of = states[path[::-1]]
    return part_of, cut(sub, part_of)


def split_plan(scheme: str, topology: Topology) -> list[int]:
    """Arity of each level's splits (their product is G)."""
    if scheme not in SCHEMES:
        raise InvalidInputError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}", source="scheme")
    gpus = topology.num_gpus
    if gpus == 1:
        return []
    if scheme == "direct":
        return [gpus]
    if scheme == "bipartition" and gpus & (gpus - 1) == 0:
        return [2] * (gpus.bit_length() - 1)
    return [a for a in (topology.num_nodes, topology.gpus_per_node) if a > 1]


def _balanced_states(num_experts: int, arity: int) -> int:
    """Number of balanced labelled splits of ``num_experts`` into ``arity`` equal parts."""
    size, states, left = num_experts // arity, 1, num_experts
    for _ in range(arity):
        states *= math.comb(left, size)
        left -= size
    return states


def plan_weight(plan: list[int], num_experts: int) -> float:
    """Budget weight of a plan: every split of an m-expert part weighs m^2 (the R variables)."""
    total, parts, size = 0.0, 1, num_experts
    for arity in plan:
        total += parts * size ** 2
        parts, size = parts * arity, size // arity
    return total


def exflow_assignment(counts_seq: list[np.ndarray], num_experts: int, plan: list[int], *,
                      backend: str = "cpsat", budget: Budget | None = None, num_workers: int = 1,
                      seed: int = 0) -> tuple[np.ndarray, list[str], float | None]:
    """Run the split plan. Returns ``gpu`` int64 [L, E], the sub-solve statuses and the first
    level's bound on the cut (a lower bound for the whole problem)."""
    num_layers = counts_seq[-1].shape[0] + 1
    budget = budget or Budget(None, None, len(counts_seq) * plan_weight(plan, num_experts))
    parts = [(np.tile(np.arange(num_experts), (num_layers, 1)), 0)]  # (members [L, m], first GPU)
    width = int(np.prod(plan)) if plan else 1
    statuses: list[str] = []
    first_bound: float | None = 0.0
    for level, arity in enumerate(plan):
        width //= arity
        children = []
        for members, first in parts:
            part_of, status, bound = split_part(counts_seq, members, arity, backend=backend, budget=budget,
                                                weight=members.shape[1] ** 2, num_workers=num_workers,
                                                seed=seed)
            statuses.append(status)
            if level == 0:
                first_bound = bound
            for p in range(arity):
                sub = np.stack([members[lay][part_of[lay] == p] for lay in range(num_layers)])
                children.append((sub, first + p * width))
        parts = children
    gpu = np.empty((num_layers, num_experts), dtype=np.int64)
    for members, first in parts:
        np.put_along_axis(gpu, members, first, axis=1)
    return gpu, statuses, first_bound


def _placement(gpu: np.ndarray, num_gpus: int) -> Placement:
    num_layers, num_experts = gpu.shape
    p2l = np.argsort(gpu, axis=1, kind="stable").astype(np.int32)  # experts grouped by GPU, ids ascending
    return Placement(p2l, num_experts // num_gpus, num_experts)


@register("exflow")
def solve_exflow(problem: PlacementProblem, *, time_limit_s: float | None = None, seed: int = 0,
                 backend: str = "auto", deterministic_time: float | None = None, num_workers: int = 1,
                 scheme: str = "bipartition", token_batch: int | None = None,
                 subsolve_time_s: float | None = 60.0) -> SolveResult:
    """ExFlow's staged affinity ILP (see the module docstring).

    ``subsolve_time_s`` caps every sub-solve's wall time (the repository's 60 s; None: no cap).
    ``backend="auto"`` (default) solves each split exactly by DP when it is small enough
    (:data:`DP_MAX_STATES`; Mixtral's 8 experts give 70 per bisection), standing in for the
    repository's Gurobi, which reaches those optima; larger splits go to CP-SAT.
    """
    wall_start = time.perf_counter()
    if backend not in BACKENDS:
        raise InvalidInputError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}",
                                source="--backend")
    if backend == "auto":
        first = split_plan(scheme, problem.topology)[:1]
        states = _balanced_states(problem.model.num_experts, first[0]) if first else 1
        backend = "dp" if states <= DP_MAX_STATES else "cpsat"
    backend = backend if backend == "dp" else normalise_backend(backend)
    stats, topo = problem.stats, problem.topology
    if problem.num_redundant > 0:
        raise InvalidInputError("exflow places no replicas; use --redundant 0 or --method eplb/placer",
                                source="--redundant")
    stats.require_top1("exflow")
    num_layers, num_experts = stats.load.shape
    if num_experts % topo.num_gpus:
        raise InvalidInputError(f"exflow needs E % G == 0, got E={num_experts}, G={topo.num_gpus}",
                                source="--gpus")
    plan = split_plan(scheme, topo)
    counts_seq = batch_counts(stats, token_batch) if num_layers > 1 else []
    budget = Budget(time_limit_s, deterministic_time, len(counts_seq) * plan_weight(plan, num_experts),
                    cap_s=subsolve_time_s)

    contiguous = Placement(contiguous_map(num_layers, num_experts, num_experts),
                           num_experts // topo.num_gpus, num_experts)
    exact = replace(stats, sample_ids=None)  # exact transition counts, no sample-based extras

    def score(placement: Placement) -> dict:
        return metrics.context_coherent_traffic(placement, topo, problem.model, exact)

    if plan and counts_seq:
        gpu, statuses, bound_count = exflow_assignment(counts_seq, num_experts, plan, backend=backend,
                                                       budget=budget, num_workers=num_workers, seed=seed)
        placement = _placement(gpu, topo.num_gpus)
    else:  # one GPU or one layer: nothing to cut
        placement, statuses, bound_count = contiguous, [], 0.0
    total = int(counts_seq[-1].sum()) if counts_seq else 0
    found, base = score(placement), score(contiguous)
    fell_back = (found["frac_top1_transitions_cross_gpu"] or 0.0) > (base["frac_top1_transitions_cross_gpu"] or 0.0)
    if fell_back:
        placement, found = contiguous, base
    objective = float(found["frac_top1_transitions_cross_gpu"] or 0.0)
    bound = None if bound_count is None else min(objective, bound_count / total if total else 0.0)
    if bound is not None and objective <= bound + 1e-12:
        status = "optimal"
    else:
        status = "timeout" if budget.limited else "feasible"
    terms = {"cross_gpu_transitions": float(round(objective * total)), "transitions": float(total),
             "frac_top1_transitions_cross_node": float(found["frac_top1_transitions_cross_node"] or 0.0),
             "contiguous_frac_cross_gpu": float(base["frac_top1_transitions_cross_gpu"] or 0.0),
             "levels": float(len(plan)), "subsolves": float(len(statuses) * (1 if backend == "dp" else len(counts_seq))),
             "subsolves_optimal": float(sum(s == "optimal" for s in statuses)),
             "fell_back_to_contiguous": float(fell_back)}
    return SolveResult(placement=placement, status=status, objective=objective, terms=terms, bound=bound,
                       gap=relative_gap(objective, bound) if bound is not None else None,
                       wall_time_s=time.perf_counter() - wall_start, method="exflow", backend=backend)
