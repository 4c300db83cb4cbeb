"""Exact context-coherent placement: assignment chain, partition DP, registered method ``exact``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from placer.errors import InvalidInputError
from placer.ilp import PlacementProblem, solve
from placer.ilp.exact import (
    coherent_cost,
    count_partitions,
    enumerate_partitions,
    exact_one_per_gpu,
    exact_partition_dp,
    gpu_of_expert,
    pair_matching_bound,
    partition_dp,
    phys2log_from_gpu,
)
from placer.metrics import context_coherent_traffic
from placer.presets import make_topology
from placer.types import ModelSpec, Placement, RoutingStats
from placer.validate import check_placement


def structured(num_layers: int, num_experts: int, num_gpus: int, seed: int):
    """Transitions with a hidden good placement (experts of one hidden group hand tokens to each
    other) plus noise, and skewed loads. Returns (T [L-1, E, E] int64, load [L, E] int64)."""
    rng = np.random.default_rng(seed)
    per = num_experts // num_gpus
    hidden = np.stack([rng.permutation(num_experts) // per for _ in range(num_layers)])
    same = hidden[:-1, :, None] == hidden[1:, None, :]
    t = rng.poisson(np.where(same, 40.0, 6.0) * rng.gamma(1.0, 1.0, size=same.shape)).astype(np.int64)
    load = (rng.gamma(2.0, 30.0, size=(num_layers, num_experts)) + 1).astype(np.int64)
    return t, load


def cross_of_p2l(p2l: np.ndarray, per_gpu: int, t: np.ndarray) -> float:
    return float(coherent_cost(gpu_of_expert(p2l, per_gpu), t, np.zeros(p2l.shape), p2l.shape[1] // per_gpu)[0].sum())


@pytest.mark.parametrize("num_experts", [3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_per_gpu_matches_brute_force(num_experts, seed):
    t, _ = structured(3, num_experts, num_experts, seed)
    p2l = exact_one_per_gpu(t)
    assert p2l.shape == (3, num_experts)
    assert all(sorted(row) == list(range(num_experts)) for row in p2l)
    best = min(
        cross_of_p2l(np.array([np.arange(num_experts), p1, p2]), 1, t)
        for p1 in itertools.permutations(range(num_experts))
        for p2 in itertools.permutations(range(num_experts)))
    assert cross_of_p2l(p2l, 1, t) == best


def brute_force_partitions(t, load, num_gpus, load_weight, load_cap=None):
    parts = enumerate_partitions(load.shape[1], num_gpus).astype(np.int64)
    mean = load.sum(axis=1) / num_gpus
    best = np.inf
    for chain in itertools.product(range(len(parts)), repeat=load.shape[0]):
        gpu = parts[list(chain)]
        cross, ml = coherent_cost(gpu, t, load, num_gpus)
        if load_cap is not None:
            floor = np.array([min(coherent_cost(parts[[p]], None, load[[layer]], num_gpus)[1][0]
                                  for p in range(len(parts))) for layer in range(load.shape[0])])
            if np.any(ml > np.maximum(load_cap * mean, floor) + 1e-9):
                continue
        best = min(best, cross.sum() + load_weight * ml.sum())
    return best


@pytest.mark.parametrize("load_weight, load_cap", [(0.0, None), (1.5, None), (0.25, None), (0.0, 1.05)])
@pytest.mark.parametrize("seed", [0, 1])
def test_partition_dp_matches_brute_force(load_weight, load_cap, seed):
    t, load = structured(3, 4, 2, seed)
    res = partition_dp(t, load, 2, load_weight=load_weight, load_cap=load_cap)
    assert res.objective == pytest.approx(brute_force_partitions(t, load, 2, load_weight, load_cap))
    cross, ml = coherent_cost(res.gpu, t, load, 2)
    assert res.objective == pytest.approx(cross.sum() + load_weight * ml.sum())
    p2l = exact_partition_dp(t, load, 2, load_weight=load_weight, load_cap=load_cap)
    np.testing.assert_array_equal(gpu_of_expert(p2l, 2), res.gpu)


def test_partition_dp_cap_is_respected_or_relaxed_to_the_floor():
    t, load = structured(4, 6, 3, 5)
    res = partition_dp(t, load, 3, load_cap=1.0)  # unreachable cap: every layer at its best balance
    free = partition_dp(t, load, 3)
    mean = load.sum(axis=1) / 3
    assert np.all(res.max_load <= res.caps * mean + 1e-9)
    assert np.all(res.max_load <= free.max_load + 1e-9)
    assert res.objective >= free.objective


def test_partitions_enumeration():
    assert count_partitions(8, 4) == 2520
    assert count_partitions(8, 8) == 40320
    parts = enumerate_partitions(8, 4)
    assert parts.shape == (2520, 8)
    assert len({tuple(r) for r in parts}) == 2520
    assert np.all(np.stack([np.bincount(r, minlength=4) for r in parts]) == 2)
    with pytest.raises(InvalidInputError):
        count_partitions(8, 3)


def test_dp_refuses_too_many_partitions():
    t, load = structured(2, 12, 3, 0)  # 34,650 partitions
    with pytest.raises(InvalidInputError, match="partitions"):
        partition_dp(t, load, 3)


def test_phys2log_round_trip():
    gpu = np.array([[1, 0, 0, 1], [0, 1, 1, 0]])
    p2l = phys2log_from_gpu(gpu, 2)
    np.testing.assert_array_equal(p2l, [[1, 2, 0, 3], [0, 3, 1, 2]])
    np.testing.assert_array_equal(gpu_of_expert(p2l, 2), gpu)


def test_pair_matching_bound_bounds_every_placement():
    t, load = structured(3, 4, 2, 3)
    ub = pair_matching_bound(t, 2)
    for chain in itertools.product(range(6), repeat=3):
        gpu = enumerate_partitions(4, 2).astype(np.int64)[list(chain)]
        cross = coherent_cost(gpu, t, load, 2)[0]
        assert np.all(t.sum(axis=(1, 2)) - cross <= ub + 1e-9)
    # One expert per GPU: the bound is the assignment optimum, which the chain attains.
    t1, _ = structured(3, 4, 4, 3)
    same = t1.sum() - cross_of_p2l(exact_one_per_gpu(t1), 1, t1)
    assert pair_matching_bound(t1, 1).sum() == pytest.approx(same)


# --------------------------------------------------------------------------------------------
# Registered method
# --------------------------------------------------------------------------------------------


def problem_of(num_layers, num_experts, num_gpus, seed=0, redundant=0, weights=None, top1=True):
    t, load = structured(num_layers, num_experts, num_gpus, seed)
    stats = RoutingStats(load=load, num_tokens=int(load.sum(axis=1).max()), top_k=2,
                         top1_transitions=t if top1 else None)
    model = ModelSpec.from_shape(num_layers, num_experts, 2)
    return PlacementProblem(stats, model, make_topology("h100", gpus=num_gpus), num_redundant=redundant,
                            execution="context-coherent", weights=weights or {})


@pytest.mark.parametrize("shape", [(4, 4, 4), (3, 4, 2), (4, 6, 3), (3, 8, 4)])
def test_exact_method_is_optimal_and_consistent(shape):
    problem = problem_of(*shape)
    res = solve(problem, "exact")
    check_placement(res.placement, problem.model, problem.topology)
    assert res.method == "exact" and res.status == "optimal"
    assert res.bound == res.objective and res.gap == 0.0
    # Counts model (sizes unknown): affinity and balance weights 1.
    t, load = problem.stats.top1_transitions, problem.stats.load
    gpu = gpu_of_expert(res.placement.physical_to_logical, res.placement.slots_per_gpu)
    cross, ml = coherent_cost(gpu, t, load, shape[2])
    assert res.objective == pytest.approx(cross.sum() + ml.sum())
    cc = context_coherent_traffic(res.placement, problem.topology, problem.model, problem.stats)
    assert res.terms["frac_top1_transitions_cross_gpu"] == pytest.approx(cc["frac_top1_transitions_cross_gpu"])
    if shape[1] != shape[2]:
        best = partition_dp(t, load, shape[2], load_weight=1.0)
        assert res.objective == pytest.approx(best.objective)


def test_exact_affinity_only_matches_assignment_chain():
    problem = problem_of(5, 4, 4, seed=7, weights={"balance": 0.0})
    res = solve(problem, "exact")
    t = problem.stats.top1_transitions
    assert res.terms["cross_gpu_transitions"] == pytest.approx(cross_of_p2l(exact_one_per_gpu(t), 1, t))


def test_exact_load_only_stats_balances_each_layer():
    problem = problem_of(3, 6, 3, seed=2, top1=False)
    res = solve(problem, "exact")
    assert res.status == "optimal" and res.gap == 0.0
    load = problem.stats.load
    parts = enumerate_partitions(6, 3).astype(np.int64)
    best = sum(min(coherent_cost(parts[[p]], None, load[[layer]], 3)[1][0] for p in range(len(parts)))
               for layer in range(3))
    assert res.terms["sum_max_gpu_load"] == pytest.approx(best)


def test_exact_refuses_replicas_and_large_shapes():
    with pytest.raises(InvalidInputError, match="redundant"):
        solve(problem_of(3, 4, 2, redundant=2), "exact")
    with pytest.raises(InvalidInputError, match="partitions"):
        solve(problem_of(2, 12, 3), "exact")


def test_exact_result_is_a_valid_placement_object():
    res = solve(problem_of(3, 8, 4, seed=4), "exact")
    assert isinstance(res.placement, Placement)
    assert res.placement.slots_per_gpu == 2 and res.placement.num_redundant == 0
