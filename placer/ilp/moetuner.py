"""MoETuner (Go & Mahajan, arXiv 2502.06643): balance experts first, then inter-layer traffic.

A **baseline implemented as published**, with the fixes listed in
docs/reference/placement.md section 1. Two integer programs, solved in order:

**ILP1** (per layer ``l``, separable): put the E experts into G clusters of exactly ``E/G``
experts (fix 5: serving stacks need equal slots per GPU; each expert in exactly one cluster),
minimising ``sum_c |T_c - Tbar|`` with ``T_c`` the load of cluster c and ``Tbar = sum_e P_e / G``.
Scaled by G so CP-SAT sees integers: ``d_c >= +-(G * T_c - sum_e P_e)``. Symmetry: the clusters
are interchangeable, so expert ``e`` may only join clusters ``c <= e``. ``P`` is
``stats.load`` (token-slots: a token counts once for each of its K experts). Float loads are
rounded to integers on a 1e6 scale and the bound is corrected by the rounding error.

**ILP2** (all layers): map each layer's clusters one-to-one onto the G GPUs, minimising
``sum_l max_{g1 != g2} w(g1, g2) * C[l, c(g1, l), c(g2, l+1)]`` where ``c(g, l)`` is the
cluster on GPU g at layer l. Fixes 2-4: ``C[l, c1, c2]`` counts traffic from cluster c1 at layer
l to cluster c2 at layer l+1 (``x_{c2,e2,l+1}``), the max runs over GPU pairs, and traffic
inside a GPU is free. ``w = B_nvlink / B_{g1,g2}``: 1 inside a node (NVLink), ``nvlink_gbps /
nic_gbps`` across nodes (NIC), so the objective is in **NVLink-equivalent tokens** (the paper's
``C / B`` times the constant ``B_nvlink``). The paper's Eq. 13 (experts per GPU over all layers)
holds automatically with equal cluster sizes.

``C`` comes from ``stats.pair_transitions`` by default: ``R[l, e1, e2]`` = (token, a, b) triples
with a among the token's experts at layer l and b among them at layer l+1, i.e. "tokens routed
from e1 at l to e2 at l+1" counting each of the K x K expert pairs of a token once.
``transitions="top1"`` uses ``stats.top1_transitions`` instead.

ILP2 is solved **exactly** when ``G <= exact_max_gpus`` (default 8, the Mixtral scale): binary
``y[l, c, g]``, exactly one GPU per cluster and one cluster per GPU per layer, and the epigraph
``z_l >= w(g1,g2) * C[l,c1,c2] * (y[l,c1,g1] + y[l+1,c2,g2] - 1)`` for every ``g1 != g2`` and
every ``(c1, c2)``. Because each GPU holds exactly one cluster, the traffic of the pair
``(g1, g2)`` is the single term ``C[l, c(g1), c(g2)]``, so this is the usual product
linearisation ``v >= y1 + y2 - 1`` with the product substituted into the max in place (no extra
variables): G^4 (L-1) inequalities, 126 976 at G = 8. Symmetry: on one node every GPU pair costs
the same, so layer 0's map is fixed to the identity; on several nodes cluster 0 of layer 0 is
fixed to GPU 0.

Beyond that size (the sheet's table: 6e7 product terms at DeepSeek-V3 scale) ILP2 becomes a
**sequential bottleneck assignment**: layer 0's map is the identity; given layer l's map, layer
l+1's is the assignment minimising the layer pair's max (a linear bottleneck assignment: putting
cluster c2 on GPU g2 costs ``max_{g1 != g2} w(g1,g2) C[l, c(g1), c2]``), ties broken by the least
total weighted off-GPU traffic. No bound is proven for ILP2 then.

**Anytime.** Every sub-solve is hinted with the contiguous start (ILP1: experts in id order,
E/G per cluster; ILP2: the better of the identity map and the sequential assignment) and its
result is compared with the start, so a time limit never returns something worse on the stage's
own objective than the start; a sub-solve that finds nothing keeps the start. Limits
(``time_limit_s`` wall clock, ``deterministic_time`` CP-SAT units) cover the whole solve and are
split over the sub-solves (each ILP1 layer weight 1, ILP2 weight L; unused time rolls over).

**Result.** MoETuner is lexicographic: ``objective``, ``bound`` and ``gap`` are ILP1's
(``sum_l sum_c |T_c - Tbar|`` in token-slots, from :func:`placer.metrics.gpu_load`); ILP2's are
in ``terms`` (``ilp2_*``). ``status`` is ``optimal`` when both stages are proven optimal,
``timeout`` when any sub-solve stopped at a limit, ``feasible`` otherwise (e.g. sequential ILP2).

**Replicas.** MoETuner places no replicas: ``num_redundant > 0`` raises InvalidInputError.

Backends: ``"cpsat"`` (default), ``"pulp"`` (= ``"pulp-cbc"``) and ``"pulp-highs"``. PuLP runs
get no MIP start (``run_pulp`` passes none) and ignore ``deterministic_time``; the comparison
with the start keeps them anytime all the same. PuLP models use continuous epigraph / absolute
value variables (integral at the optimum anyway).

Both ILPs are :class:`placer.ilp.mip.MipModel` programs, budgeted by :class:`placer.ilp.mip.Budget`.
"""

from __future__ import annotations

import time
from fractions import Fraction

import numpy as np

from placer import metrics
from placer.errors import InvalidInputError
from placer.ilp._cpsat import relative_gap
from placer.ilp.assignment import min_cost_assignment
from placer.ilp.base import PlacementProblem, register
from placer.ilp.mip import BACKENDS, Budget, MipModel, normalise_backend, worst_status
from placer.ilp.simple import contiguous_map
from placer.types import Placement, SolveResult, Topology

__all__ = ["BACKENDS", "bandwidth_weights", "cluster_layer",
           "cluster_traffic", "clusters_to_placement", "ilp1_cost", "ilp2_cost",
           "map_clusters_exact", "map_clusters_sequential", "solve_moetuner"]

_FLOAT_SCALE = 1e6


# --------------------------------------------------------------------------------------------
# ILP1: balanced clusters per layer
# --------------------------------------------------------------------------------------------


def _integer_load(load: np.ndarray) -> tuple[np.ndarray, float]:
    """Integer loads for CP-SAT and the scale applied (1.0 for integer input)."""
    if np.issubdtype(load.dtype, np.integer):
        return load.astype(np.int64), 1.0
    top = float(load.max()) if load.size else 0.0
    scale = _FLOAT_SCALE / top if top > 0 else 1.0
    return np.rint(load * scale).astype(np.int64), scale


def ilp1_cost(load_row: np.ndarray, clusters: np.ndarray) -> float:
    """``sum_c |T_c - Tbar|`` of one layer for clusters ``[G, E/G]`` (independent check)."""
    totals = np.asarray(load_row, dtype=np.float64)[clusters].sum(axis=1)
    return float(np.abs(totals - totals.sum() / clusters.shape[0]).sum())


def _canonical(clusters: np.ndarray) -> np.ndarray:
    """Rows sorted, rows ordered by their smallest expert."""
    rows = np.sort(clusters, axis=1)
    return rows[np.argsort(rows[:, 0], kind="stable")]


def cluster_layer(load_row: np.ndarray, num_clusters: int, *, backend: str = "cpsat",
                  budget: Budget | None = None, weight: float = 1.0, num_workers: int = 1,
                  seed: int = 0) -> tuple[np.ndarray, str, float | None]:
    """ILP1 on one layer: ``E/G``-expert clusters minimising ``sum_c |T_c - Tbar|``.

    ``load_row``: integer loads [E]. Returns ``clusters`` int64 [G, E/G] (canonical order),
    ``status`` and a proven lower bound on ``G * sum_c |T_c - Tbar|`` (None when unknown).
    """
    load_row = np.asarray(load_row, dtype=np.int64)
    num_experts = load_row.shape[0]
    size = num_experts // num_clusters
    start = np.arange(num_experts).reshape(num_clusters, size)
    if size == 1 or num_clusters == 1:  # only one clustering up to relabelling
        cost = round(num_clusters * ilp1_cost(load_row, start))
        return start, "optimal", float(cost)
    budget = budget or Budget(None, None, weight)
    total = int(load_row.sum())
    all_clusters, all_experts = range(num_clusters), range(num_experts)

    model = MipModel(backend, "moetuner-ilp1")
    # Expert e may join cluster c only when c <= e (the clusters are interchangeable).
    x = {(c, e): model.bool_var(f"x_c{c}_e{e}") for c in all_clusters for e in all_experts if c <= e}
    d = [model.aux_var(num_clusters * total, f"d_c{c}") for c in all_clusters]
    # Each expert joins exactly one cluster.
    for e in all_experts:
        model.add(model.dot([1] * min(e + 1, num_clusters),
                            [x[c, e] for c in all_clusters if c <= e]) == 1)
    # Every cluster holds exactly E/G experts (equal slots per GPU, fix 5).
    for c in all_clusters:
        model.add(model.dot([1] * (num_experts - c), [x[c, e] for e in all_experts if c <= e]) == size)
    # d_c >= |G * T_c - sum_e P_e|: the deviation of cluster c's load from the mean, times G.
    for c in all_clusters:
        members = [e for e in all_experts if c <= e]
        scaled = model.dot([num_clusters * int(load_row[e]) for e in members], [x[c, e] for e in members])
        model.add(d[c] >= scaled - total)
        model.add(d[c] >= total - scaled)
    model.minimize(model.dot([1] * num_clusters, d))
    # Warm start: the contiguous clusters.
    for (c, e), var in x.items():
        model.hint(var, int(e // size == c))

    outcome = budget.run(model, weight, num_workers=num_workers, seed=seed)
    start_cost = num_clusters * ilp1_cost(load_row, start)
    value = outcome.value
    if value is None:  # not solved
        return start, outcome.status, outcome.bound
    member = np.array([[c for c in all_clusters if c <= e and value(x[c, e])][0]
                       for e in all_experts])
    found = _canonical(np.argsort(member, kind="stable").reshape(num_clusters, size))
    if num_clusters * ilp1_cost(load_row, found) > start_cost:  # keep the start if it is better
        return start, outcome.status, outcome.bound
    return found, outcome.status, outcome.bound


# --------------------------------------------------------------------------------------------
# ILP2: clusters to GPUs
# --------------------------------------------------------------------------------------------


def cluster_traffic(transitions: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """``C[l, c1, c2]`` = transitions from cluster c1 at layer l to cluster c2 at layer l+1.

    ``transitions`` [L-1, E, E], ``clusters`` [L, G, E/G]. Returns int64 [L-1, G, G].
    """
    num_pairs = transitions.shape[0]
    num_clusters = clusters.shape[1]
    out = np.zeros((num_pairs, num_clusters, num_clusters), dtype=np.int64)
    for layer in range(num_pairs):
        src = np.zeros((num_clusters, transitions.shape[1]), dtype=np.int64)
        dst = np.zeros_like(src)
        src[np.repeat(np.arange(num_clusters), clusters.shape[2]), clusters[layer].ravel()] = 1
        dst[np.repeat(np.arange(num_clusters), clusters.shape[2]), clusters[layer + 1].ravel()] = 1
        out[layer] = src @ transitions[layer].astype(np.int64) @ dst.T
    return out


def bandwidth_weights(topology: Topology) -> tuple[np.ndarray, int]:
    """Integer GPU-pair weights ``W`` [G, G] and denominator D with ``W / D = B_nvlink / B``.

    0 on the diagonal (traffic inside a GPU is free), D inside a node, ``D * nvlink / nic``
    (floored; exact for bandwidth ratios with denominators up to 1000) across nodes. Flooring
    keeps CP-SAT's bound a valid lower bound on the true objective.
    """
    ratio = Fraction(topology.nvlink_gbps / topology.nic_gbps).limit_denominator(1000)
    denom = ratio.denominator
    cross = int(np.floor(topology.nvlink_gbps / topology.nic_gbps * denom + 1e-9))
    node = np.arange(topology.num_gpus) // topology.gpus_per_node
    weight = np.where(node[:, None] == node[None, :], denom, cross).astype(np.int64)
    np.fill_diagonal(weight, 0)
    return weight, denom


def ilp2_cost(traffic: np.ndarray, weight: np.ndarray, gpu_of_cluster: np.ndarray) -> np.ndarray:
    """Per layer pair: ``max_{c1, c2} W[gpu(c1, l), gpu(c2, l+1)] * C[l, c1, c2]`` (int64 [L-1])."""
    out = np.zeros(traffic.shape[0], dtype=np.int64)
    for layer in range(traffic.shape[0]):
        w = weight[np.ix_(gpu_of_cluster[layer], gpu_of_cluster[layer + 1])]
        out[layer] = int((w * traffic[layer]).max()) if traffic[layer].size else 0
    return out


def bottleneck_assignment(cost: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Assignment minimising the largest ``cost``, then the total ``secondary`` (int64 [n])."""
    values = np.unique(cost)
    lo, hi = 0, len(values) - 1
    while lo < hi:  # smallest threshold admitting a perfect matching
        mid = (lo + hi) // 2
        over = (cost > values[mid]).astype(np.float64)
        if over[np.arange(len(cost)), min_cost_assignment(over)].sum() == 0:
            hi = mid
        else:
            lo = mid + 1
    span = float(np.abs(secondary).sum()) + 1.0
    return min_cost_assignment(secondary + span * (cost > values[lo]))


def map_clusters_sequential(traffic: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Layer 0 on the identity, then each layer by a bottleneck assignment given the previous.

    Returns ``gpu_of_cluster`` int64 [L, G].
    """
    num_pairs, num_clusters, _ = traffic.shape
    gpu = np.empty((num_pairs + 1, num_clusters), dtype=np.int64)
    gpu[0] = np.arange(num_clusters)
    for layer in range(num_pairs):
        cluster_on = np.argsort(gpu[layer])  # cluster on each GPU at this layer
        # flow[g1, c2, g2] = W[g1, g2] * C[l, c(g1), c2]
        flow = traffic[layer][cluster_on][:, :, None] * weight[:, None, :]
        gpu[layer + 1] = bottleneck_assignment(flow.max(axis=0).astype(np.float64),
                                               flow.sum(axis=0).astype(np.float64))
    return gpu


def map_clusters_exact(traffic: np.ndarray, weight: np.ndarray, single_node: bool,
                       start: np.ndarray, *, backend: str = "cpsat", budget: Budget | None = None,
                       weight_share: float = 1.0, num_workers: int = 1,
                       seed: int = 0) -> tuple[np.ndarray, str, float | None]:
    """ILP2 exactly: returns ``gpu_of_cluster`` [L, G], status and a lower bound (units of W).

    ``start`` [L, G] is the hint (layer 0 must be the identity on one node and put cluster 0 on
    GPU 0 otherwise); it is returned when the solver finds nothing better.
    """
    num_pairs, num_clusters, _ = traffic.shape
    num_layers = num_pairs + 1
    budget = budget or Budget(None, None, weight_share)
    layers, clusters, gpus = range(num_layers), range(num_clusters), range(num_clusters)

    model = MipModel(backend, "moetuner-ilp2")
    y = {(lay, c, g): model.bool_var(f"y_l{lay}_c{c}_g{g}") for lay in layers for c in clusters for g in gpus}
    top = int(weight.max()) * int(traffic.max()) if traffic.size else 0
    z = [model.aux_var(top, f"z_l{lay}") for lay in range(num_pairs)]
    ones = [1] * num_clusters
    for lay in layers:
        # Each cluster goes to exactly one GPU ...
        for c in clusters:
            model.add(model.dot(ones, [y[lay, c, g] for g in gpus]) == 1)
        # ... and each GPU holds exactly one cluster.
        for g in gpus:
            model.add(model.dot(ones, [y[lay, c, g] for c in clusters]) == 1)
    # Symmetry: on one node fix layer 0 to the identity; on several, cluster 0 of layer 0 on GPU 0.
    for c in (clusters if single_node else [0]):
        model.add(y[0, c, c] == 1)
    # z_l bounds the weighted traffic of every GPU pair (g1 != g2) from layer l to layer l+1.
    for lay in range(num_pairs):
        for g1 in gpus:
            for g2 in gpus:
                if weight[g1, g2] == 0:
                    continue
                for c1 in clusters:
                    for c2 in clusters:
                        cost = int(weight[g1, g2] * traffic[lay, c1, c2])
                        if cost:
                            model.add(z[lay] >= cost * (y[lay, c1, g1] + y[lay + 1, c2, g2] - 1))
    model.minimize(model.dot([1] * num_pairs, z))
    # Warm start.
    for (lay, c, g), var in y.items():
        model.hint(var, int(start[lay, c] == g))

    outcome = budget.run(model, weight_share, num_workers=num_workers, seed=seed)
    value = outcome.value
    if value is None:  # not solved
        return start, outcome.status, outcome.bound
    found = np.array([[next(g for g in gpus if value(y[lay, c, g])) for c in clusters]
                      for lay in layers], dtype=np.int64)
    if ilp2_cost(traffic, weight, found).sum() > ilp2_cost(traffic, weight, start).sum():
        return start, outcome.status, outcome.bound
    return found, outcome.status, outcome.bound


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


def clusters_to_placement(clusters: np.ndarray, gpu_of_cluster: np.ndarray, num_experts: int) -> Placement:
    """GPU g holds the (sorted) experts of the cluster mapped to it, layer by layer."""
    num_layers, num_clusters, size = clusters.shape
    p2l = np.empty((num_layers, num_clusters, size), dtype=np.int32)
    for layer in range(num_layers):
        p2l[layer, gpu_of_cluster[layer]] = np.sort(clusters[layer], axis=1)
    return Placement(p2l.reshape(num_layers, -1), size, num_experts)


def _check_supported(problem: PlacementProblem, transitions: str) -> np.ndarray | None:
    if problem.num_redundant > 0:
        raise InvalidInputError("moetuner places no replicas; use --redundant 0 or --method eplb/placer",
                                source="--redundant")
    stats = problem.stats
    if stats.num_layers == 1:
        return None
    if transitions == "top1":
        return stats.require_top1("moetuner with transitions='top1'")
    if transitions != "pair":
        raise InvalidInputError(f"unknown transition matrix {transitions!r}; known: pair, top1",
                                source="transitions")
    if stats.pair_transitions is None:
        raise InvalidInputError("moetuner's ILP2 needs inter-layer transitions (per-token routing); "
                                "the input is load-only", source="stats")
    return stats.pair_transitions


@register("moetuner")
def solve_moetuner(problem: PlacementProblem, *, time_limit_s: float | None = None, seed: int = 0,
                   backend: str = "cpsat", deterministic_time: float | None = None,
                   num_workers: int = 1, transitions: str = "pair", exact_max_gpus: int = 8,
                   subsolve_time_s: float | None = 60.0) -> SolveResult:
    """MoETuner's two ILPs (see the module docstring); ILP1's objective is the primary one.

    ``transitions``: ``"pair"`` (all top-k pairs, default) or ``"top1"``. ``exact_max_gpus``:
    largest G for which ILP2 is solved exactly (sequential bottleneck assignment above it).
    ``subsolve_time_s`` caps every sub-solve's wall time (None: no cap); at Mixtral size every
    sub-solve is proven optimal in seconds, the cap only matters at DeepSeek scale.
    """
    wall_start = time.perf_counter()
    backend = normalise_backend(backend)
    matrix = _check_supported(problem, transitions)
    topo = problem.topology
    num_layers, num_experts = problem.stats.load.shape
    num_gpus = topo.num_gpus
    exact = num_gpus <= exact_max_gpus and matrix is not None and num_gpus > 1
    budget = Budget(time_limit_s, deterministic_time, num_layers + (num_layers if exact else 0),
                    cap_s=subsolve_time_s)

    # ILP1, layer by layer.
    load, scale = _integer_load(problem.stats.load)
    clusters = np.empty((num_layers, num_gpus, num_experts // num_gpus), dtype=np.int64)
    ilp1_status, ilp1_bound = [], 0.0
    for layer in range(num_layers):
        clusters[layer], status, bound = cluster_layer(load[layer], num_gpus, backend=backend,
                                                       budget=budget, num_workers=num_workers, seed=seed)
        ilp1_status.append(status)
        # Back to token-slots: divide by G, undo the float scale and its rounding error (E per layer).
        slack = num_experts if scale != 1.0 else 0.0
        ilp1_bound += max(0.0, ((bound or 0.0) / num_gpus - slack) / scale)

    # ILP2.
    identity = np.tile(np.arange(num_gpus), (num_layers, 1))
    gpu_of_cluster, ilp2_status, ilp2 = identity, "optimal", {}
    if matrix is not None and num_gpus > 1:
        traffic = cluster_traffic(matrix, clusters)
        weight, denom = bandwidth_weights(topo)
        sequential = map_clusters_sequential(traffic, weight)
        start = min((identity, sequential), key=lambda g: ilp2_cost(traffic, weight, g).sum())
        if exact:
            gpu_of_cluster, ilp2_status, bound2 = map_clusters_exact(
                traffic, weight, topo.num_nodes == 1, start, backend=backend, budget=budget,
                weight_share=num_layers, num_workers=num_workers, seed=seed)
        else:
            gpu_of_cluster, ilp2_status, bound2 = start, "feasible", None
        obj2 = ilp2_cost(traffic, weight, gpu_of_cluster).sum() / denom
        ilp2 = {"ilp2_objective": float(obj2),
                "ilp2_contiguous": float(ilp2_cost(traffic, weight, identity).sum() / denom),
                "ilp2_exact": float(exact), "ilp2_optimal": float(ilp2_status == "optimal")}
        if bound2 is not None:
            ilp2["ilp2_bound"] = min(float(obj2), bound2 / denom)
            ilp2["ilp2_gap"] = float(relative_gap(float(obj2), ilp2["ilp2_bound"]))

    placement = clusters_to_placement(clusters, gpu_of_cluster, num_experts)
    gpu_load = metrics.gpu_load(placement, topo, problem.stats)
    objective = float(np.abs(gpu_load - gpu_load.mean(axis=1, keepdims=True)).sum())
    contiguous = Placement(contiguous_map(num_layers, num_experts, num_experts),
                           num_experts // num_gpus, num_experts)
    contiguous_load = metrics.gpu_load(contiguous, topo, problem.stats)
    balance = metrics.load_balance(gpu_load)
    bound = min(objective, ilp1_bound)
    terms = {"ilp1_objective": objective, "ilp1_bound": bound,
             "ilp1_contiguous": float(np.abs(contiguous_load - contiguous_load.mean(axis=1, keepdims=True)).sum()),
             "ilp1_layers_optimal": float(sum(s == "optimal" for s in ilp1_status)),
             "max_over_mean_median": balance["median"], "max_over_mean_worst": balance["worst"], **ilp2}
    return SolveResult(placement=placement, status=worst_status([*ilp1_status, ilp2_status]),
                       objective=objective, terms=terms, bound=bound, gap=relative_gap(objective, bound),
                       wall_time_s=time.perf_counter() - wall_start, method="moetuner", backend=backend)
