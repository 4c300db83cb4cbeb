"""Lower bounds on the joint objective of :mod:`placer.ilp.objective` (standard execution).

The objective adds per layer ``balance + traffic + balance_cap``. Each term is bounded below
separately, layer by layer, and the bounds add up; every inequality holds for any placement and
any dispatch rule (a token's expert is served by *some* copy of it), so the sum bounds the
optimum.

**Balance** (:func:`balance_lower_bound`): the busiest GPU serves at least the mean, and at least
the heaviest expert's load spread over the most GPUs its copies can occupy.

**Traffic.** For one token of the sample let ``D`` be the GPUs and ``d`` the nodes that serve its
experts. DeepEP-style dispatch sends to ``other = D - [home GPU serves]`` ranks, of which one
per remote node (the landing GPU) goes over RDMA only, so with ``nodes`` remote nodes its cost is
``w_nv * (other - landing) + w_rdma * nodes >= a * other + b * nodes`` with ``a = min(w_nv,
w_rdma)``, ``b = max(0, w_rdma - w_nv)`` (``landing <= nodes <= other``). Two relaxations bound
``sum other`` and ``sum nodes`` over the sample's tokens:

- *Co-location pairs.* If ``P`` pairs of a token's ``k`` experts share a GPU (node) with each
  other, Cauchy-Schwarz gives ``D >= k^2 / (k + 2 P)``. At most ``G * C(spg, 2)`` expert pairs
  share a GPU (``N * C(K, 2)`` a node of ``K`` slots), so
  ``sum_t D_t >= min over pair sets of size B of sum_t g(P_t)``; ``g`` is convex, so any tangent
  ``g(P) >= g(P0) + g'(P0) (P - P0)`` turns the inner problem into "take the B pairs of largest
  tangent weight", a valid bound for every choice of tangent points (a grid over a common
  ``P0``, then two rounds with each token's own ``P_t`` at the best pair set).
- *Home capacity.* A token sends to another rank unless all its experts sit on its home GPU,
  and to a remote node unless all sit in its home node. The tokens of a home GPU (node) that
  one set of ``spg`` (``K``) experts contains are at most the ``spg`` (``K``) largest counts of
  the experts when every token is charged to one of its experts (its rarest, or ``1/k`` to
  each), exactly by enumeration when ``E <= 16``.

**Balance cap** penalty: bounded by 0.

Per layer ``O(T k^2 + E^2)`` work on the token sample (DeepSeek-V3: 58 layers of 16,384 tokens x
28 pairs in a few seconds). Context-coherent execution is bounded by its balance term only.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np

from placer.ilp.objective import link_scale
from placer.metrics.dispatch import sample_home_ranks

__all__ = ["BOUND_COVERS", "Groups", "JointBound", "balance_lower_bound", "balance_only_bound", "bound_seconds",
           "colocation_bound", "contained_bound", "joint_lower_bound"]

BOUND_COVERS = ("balance (mean, heaviest expert) + traffic (GPU and node co-location pairs, home capacity) per "
                "layer, cap penalty >= 0")
_GRID = 41
_EXACT_CONTAIN_EXPERTS = 16


@dataclass(frozen=True)
class JointBound:
    """A lower bound on the joint objective, per layer.

    ``balance``, ``traffic`` float64 [L]: bounds on those terms (objective units);
    ``other_ranks``, ``remote_nodes`` float64 [L]: bounds on the sends per token of the sample
    (ranks other than home, remote nodes); ``total`` = ``balance.sum() + traffic.sum()``;
    ``covers``: what it bounds, in one line.
    """

    balance: np.ndarray
    traffic: np.ndarray
    other_ranks: np.ndarray
    remote_nodes: np.ndarray
    covers: str

    @property
    def total(self) -> float:
        return float(self.balance.sum() + self.traffic.sum())


def balance_lower_bound(problem) -> np.ndarray:
    """Per-layer lower bound on the busiest GPU's token-slots per batch token, any placement. [L]

    The busiest GPU serves at least the mean, ``sum_e load_e / G``, and at least the share of
    the heaviest expert spread over the most GPUs it can occupy, ``max_e load_e / min(G, R + 1)``.
    On GPUs of different speeds (load as time, ``load x time_scale``) the mean still bounds
    (``sum_g 1 / time_scale_g = G``) and the heaviest expert spreads over the fastest GPUs:
    ``max_e load_e / (sum of the min(G, R + 1) largest 1 / time_scale)``.
    """
    load = problem.stats.load.astype(np.float64) / max(problem.stats.num_tokens, 1)
    topo = problem.topology
    g = topo.num_gpus
    spread = min(g, problem.num_redundant + 1)
    capacity = float(spread) if topo.gpu_speed is None else float(np.sort(1.0 / topo.time_scale())[-spread:].sum())
    return np.maximum(load.sum(axis=1) / g, load.max(axis=1) / capacity)


def _pairs(ids: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct experts per token and their pairs.

    ``ids`` int [T, K]. Returns ``k`` int64 [T] (distinct experts), ``code`` int64 [T, C(K,2)]
    (``e1 * E + e2`` with ``e1 < e2``) and ``valid`` bool [T, C(K,2)] (False for repeated ids).
    """
    s = np.sort(np.asarray(ids, dtype=np.int64), axis=1)
    first = np.ones(s.shape, dtype=bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    i, j = np.triu_indices(s.shape[1], k=1)
    code = s[:, i] * num_experts + s[:, j]
    valid = first[:, i] & first[:, j]
    return first.sum(axis=1), code, valid


def _top_sum(weights: np.ndarray, count: int) -> float:
    """Sum of the ``count`` largest entries of a non-negative 1-D array."""
    if count <= 0:
        return 0.0
    if count >= weights.size:
        return float(weights.sum())
    return float(np.partition(weights, weights.size - count)[weights.size - count:].sum())


@dataclass(frozen=True)
class Groups:
    """What limits co-location in one kind of group (GPUs or nodes).

    ``count``: groups; ``slots``: distinct experts a group can hold; ``extra_copies``: copies
    beyond one per expert (R). Any placement co-locates at most ``count * C(slots, 2)`` expert
    pairs, and an expert in ``c`` groups has at most ``c * (slots - 1)`` partners.
    """

    count: int
    slots: int
    extra_copies: int

    @property
    def pair_budget(self) -> int:
        return self.count * comb(self.slots, 2)


def _pair_cap(weight: np.ndarray, num_experts: int, groups: Groups) -> float:
    """Upper bound on ``sum_p weight_p`` over the pairs any placement co-locates.

    ``weight`` float64 [E * E] (pair ``e1 * E + e2``, ``e1 < e2``). The smaller of the best
    ``pair_budget`` pairs and half the sum over experts of their best ``c_e * (slots - 1)``
    partner weights, copies ``c_e >= 1`` given greedily (concave gains) within ``extra_copies``.
    """
    by_budget = _top_sum(weight, groups.pair_budget)
    w = weight.reshape(num_experts, num_experts)
    w = w + w.T
    rows = -np.sort(-w, axis=1)                                                      # [E, E] descending
    cum = np.concatenate([np.zeros((num_experts, 1)), np.cumsum(rows, axis=1)], axis=1)
    steps = np.minimum(np.arange(groups.count + 1) * max(groups.slots - 1, 0), num_experts - 1)
    gain = cum[:, steps]                                                              # [E, count + 1]
    extra = np.diff(gain[:, 1:], axis=1).ravel()
    by_degree = 0.5 * (float(gain[:, 1].sum()) + _top_sum(extra, groups.extra_copies))
    return min(by_budget, by_degree)


def colocation_bound(ids: np.ndarray, num_experts: int, groups: Groups) -> float:
    """Lower bound on ``sum_t D_t``: the groups (GPUs or nodes) serving each token's experts.

    ``ids`` int [T, K] one layer's sample. See the module docstring (Cauchy-Schwarz, tangent of
    the convex ``g(P) = k^2 / (k + 2 P)``, the pairs of largest weight any placement can
    co-locate: :func:`_pair_cap`).
    """
    if ids.shape[0] == 0:
        return 0.0
    k, code, valid = _pairs(ids, num_experts)
    kf = k.astype(np.float64)
    if code.shape[1] == 0 or groups.slots >= num_experts:
        return float(ids.shape[0])  # every token may be served by one group
    flat = np.where(valid, code, num_experts * num_experts).ravel()
    size = num_experts * num_experts + 1
    budget = groups.pair_budget

    def value(p0: np.ndarray) -> tuple[float, np.ndarray]:
        """The tangent bound at per-token points ``p0`` [T], and the pair weights."""
        g0 = kf * kf / (kf + 2 * p0)
        slope = 2 * kf * kf / (kf + 2 * p0) ** 2   # -g'(p0) >= 0
        weight = np.bincount(flat, weights=np.repeat(slope, code.shape[1]), minlength=size)[:-1]
        return float((g0 + slope * p0).sum()) - _pair_cap(weight, num_experts, groups), weight

    counts = np.bincount(flat, minlength=size)[:-1].astype(np.float64)
    top = _pair_cap(counts, num_experts, groups)
    best, best_p0 = -np.inf, 0.0
    if np.all(k == k[0]):  # one k: the grid costs O(1) per point (weights = slope * counts)
        kk = float(k[0])
        for p0 in np.linspace(0.0, kk * (kk - 1) / 2, _GRID):
            slope = 2 * kk * kk / (kk + 2 * p0) ** 2
            v = len(k) * (kk * kk / (kk + 2 * p0) + slope * p0) - slope * top
            if v > best:
                best, best_p0 = v, p0
    else:
        for p0 in np.linspace(0.0, float(code.shape[1]), 9):
            v, _ = value(np.full(len(k), p0))
            if v > best:
                best, best_p0 = v, p0
    p0 = np.full(len(k), best_p0)
    for _ in range(2):  # each token's tangent at its pairs in the best pair set so far
        v, weight = value(p0)
        best = max(best, v)
        chosen = np.zeros(size, dtype=np.float64)
        if budget >= weight.size:
            chosen[:-1] = 1.0
        elif budget > 0:
            chosen[np.argpartition(weight, weight.size - budget)[weight.size - budget:]] = 1.0
        p0 = (chosen[flat].reshape(code.shape) * valid).sum(axis=1)
    return max(best, float(len(k)))


def contained_bound(ids: np.ndarray, num_experts: int, capacity: int) -> float:
    """Upper bound on the tokens of ``ids`` [T, K] whose experts all fit in one set of ``capacity``.

    Exact (enumeration of subsets) when ``E <= 16``; else the smaller of ``top_capacity(counts)
    / k`` and ``top_capacity(rarest-expert counts)`` (each token charged to its experts).
    """
    t = ids.shape[0]
    if t == 0:
        return 0.0
    k, _, _ = _pairs(ids, num_experts)
    fits = k <= capacity
    if not np.any(fits):
        return 0.0
    ids = np.asarray(ids, dtype=np.int64)[fits]
    if num_experts <= _EXACT_CONTAIN_EXPERTS:
        masks = np.bitwise_or.reduce(np.left_shift(1, ids), axis=1)
        sums = np.bincount(masks, minlength=2 ** num_experts).astype(np.int64)
        for bit in range(num_experts):
            step = 1 << bit
            view = sums.reshape(-1, 2, step)
            view[:, 1, :] += view[:, 0, :]
        everything = np.arange(2 ** num_experts, dtype=np.int64)
        size = sum((everything >> bit) & 1 for bit in range(num_experts))
        return float(sums[size <= capacity].max())
    counts = np.bincount(ids.ravel(), minlength=num_experts).astype(np.float64)
    by_count = _top_sum(counts, capacity) / int(k[fits].min())
    rarest = ids[np.arange(len(ids)), np.argmin(counts[ids], axis=1)]
    by_rarest = _top_sum(np.bincount(rarest, minlength=num_experts).astype(np.float64), capacity)
    return float(min(by_count, by_rarest, len(ids)))


def _layer_traffic(ids: np.ndarray, home: np.ndarray, problem) -> tuple[float, float]:
    """Bounds on ``sum_t other_t`` and ``sum_t nodes_t`` for one layer's sample ([T, K], [T])."""
    topo, e = problem.topology, problem.model.num_experts
    spg, gpn = problem.slots_per_gpu, topo.gpus_per_node
    t = ids.shape[0]
    if t == 0 or topo.num_gpus == 1:
        return 0.0, 0.0
    node_slots = min(gpn * spg, e)
    extra = problem.num_redundant
    other = colocation_bound(ids, e, Groups(topo.num_gpus, min(spg, e), extra)) - t
    other = max(other, t - sum(contained_bound(ids[home == h], e, min(spg, e)) for h in np.unique(home)))
    nodes = 0.0
    if topo.num_nodes > 1:
        node = home // gpn
        nodes = colocation_bound(ids, e, Groups(topo.num_nodes, node_slots, extra)) - t
        nodes = max(nodes, t - sum(contained_bound(ids[node == n], e, node_slots) for n in np.unique(node)))
    return max(other, nodes, 0.0), max(nodes, 0.0)


def bound_seconds(problem) -> float:
    """A rough estimate of :func:`joint_lower_bound`'s wall time (pairs of the sample, home loops)."""
    stats, topo = problem.stats, problem.topology
    pairs = stats.top_k * (stats.top_k - 1) // 2
    return 1e-7 * stats.num_layers * stats.sample_size * max(pairs, 1) + \
        2e-4 * stats.num_layers * (topo.num_gpus + topo.num_nodes)


def balance_only_bound(problem, weights: dict, why: str) -> JointBound:
    """The balance term's bound alone (traffic bounded by 0), ``covers`` ending with ``why``."""
    zero = np.zeros(problem.stats.num_layers)
    return JointBound(weights["balance"] * balance_lower_bound(problem), zero, zero, zero,
                      f"balance (mean, heaviest expert) only, traffic >= 0: {why}")


def joint_lower_bound(problem, weights: dict) -> JointBound:
    """A lower bound on :func:`placer.ilp.objective.evaluate_objective`'s ``total`` for any placement.

    ``weights``: :func:`placer.ilp.objective.objective_weights` of ``problem``. Standard
    execution bounds balance and traffic; context-coherent execution the balance term only
    (its ``covers`` says so). See the module docstring.
    """
    stats, topo = problem.stats, problem.topology
    num_layers = stats.num_layers
    balance = weights["balance"] * balance_lower_bound(problem)
    other = np.zeros(num_layers)
    nodes = np.zeros(num_layers)
    traffic = np.zeros(num_layers)
    w_nv, w_rdma = weights["traffic_nvlink"], weights["traffic_rdma"]
    if problem.execution != "standard":
        return balance_only_bound(problem, weights, "context-coherent execution (affinity >= 0 too)")
    if stats.sample_size > 0 and stats.sample_ids is not None and (w_nv > 0 or w_rdma > 0):
        ids = np.asarray(stats.sample_ids, dtype=np.int64)                          # [T, L, K]
        home = sample_home_ranks(stats, topo.num_gpus)
        t = ids.shape[0]
        scale = link_scale(topo)
        if scale is not None:  # a pair's send costs at least its tier's weight times the cheapest pair's scale
            node = np.arange(topo.num_gpus) // topo.gpus_per_node
            same, off = node[:, None] == node[None, :], ~np.eye(topo.num_gpus, dtype=bool)
            w_nv *= float(scale[same & off].min()) if np.any(same & off) else 1.0
            w_rdma *= float(scale[~same].min()) if np.any(~same) else 1.0
        a, b = min(w_nv, w_rdma), max(0.0, w_rdma - w_nv)
        for layer in range(num_layers):
            o, n = _layer_traffic(ids[:, layer], home, problem)
            other[layer], nodes[layer] = o / t, n / t
            traffic[layer] = max(a * other[layer] + b * nodes[layer], w_rdma * nodes[layer])
    return JointBound(balance, traffic, other, nodes, BOUND_COVERS)
