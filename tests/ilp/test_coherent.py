"""Context-coherent placement: weights, CP-SAT, PuLP, local search, replicas, result contract."""

from __future__ import annotations

import numpy as np
import pytest

from placer.errors import InvalidInputError
from placer.ilp import PlacementProblem, solve
from placer.ilp import coherent as cc
from placer.ilp._pulp import highs_available
from placer.ilp.exact import coherent_cost, partition_dp
from placer.presets import get_model, make_topology
from placer.stats import compute_stats
from placer.types import ModelSpec, RoutingStats, RoutingTrace
from placer.validate import check_placement


def structured(num_layers, num_experts, num_gpus, seed):
    """Transitions with a hidden good placement plus noise; skewed loads (int64)."""
    rng = np.random.default_rng(seed)
    per = num_experts // num_gpus
    hidden = np.stack([rng.permutation(num_experts) // per for _ in range(num_layers)])
    same = hidden[:-1, :, None] == hidden[1:, None, :]
    t = rng.poisson(np.where(same, 40.0, 6.0) * rng.gamma(1.0, 1.0, size=same.shape)).astype(np.int64)
    load = (rng.gamma(2.0, 30.0, size=(num_layers, num_experts)) + 1).astype(np.int64)
    return t, load


def problem_of(num_layers, num_experts, num_gpus, seed=0, weights=None, redundant=0):
    t, load = structured(num_layers, num_experts, num_gpus if num_experts % num_gpus == 0 else 1, seed)
    stats = RoutingStats(load=load, num_tokens=int(load.sum(axis=1).max()), top_k=2, top1_transitions=t)
    model = ModelSpec.from_shape(num_layers, num_experts, 2)
    return PlacementProblem(stats, model, make_topology("h100", gpus=num_gpus), num_redundant=redundant,
                            execution="context-coherent", weights=weights or {})


def check_contract(res, problem):
    check_placement(res.placement, problem.model, problem.topology)
    assert res.status in ("optimal", "feasible", "timeout")
    if res.bound is not None:
        assert res.bound <= res.objective + 1e-9 * max(1.0, abs(res.objective))
        assert res.gap == pytest.approx(max(0.0, (res.objective - res.bound) / max(abs(res.objective), 1e-9)))
    else:
        assert res.gap is None
    if res.status == "optimal":
        assert res.gap == 0.0 and res.bound == res.objective


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def test_weights_in_seconds_and_counts():
    model, topo = get_model("mixtral-8x7b"), make_topology("h100", gpus=4)
    w = cc.coherent_weights(model, topo)
    assert w["units"] == "s"
    assert w["affinity"] == pytest.approx(4096 * 2 / 370e9)
    assert w["balance"] == pytest.approx(6 * 4096 * 14336 / (0.5 * 989e12))
    # Two nodes: part of the cross-GPU moves leave the node (NIC), so a transition costs more.
    w2 = cc.coherent_weights(model, make_topology("h100", gpus=16))
    assert w2["affinity"] > w["affinity"]
    assert cc.coherent_weights(ModelSpec.from_shape(4, 8, 2), topo) == {"affinity": 1.0, "balance": 1.0,
                                                                         "units": "count"}


def test_objective_weights_default_and_override():
    t, load = structured(3, 8, 4, 0)
    stats = RoutingStats(load=load, num_tokens=1000, top_k=2, top1_transitions=t)
    model = ModelSpec(name="m", num_hidden_layers=3, moe_layer_ids=(0, 1, 2), num_experts=8, top_k=2,
                      hidden_size=4096, expert_ffn_size=14336)
    problem = PlacementProblem(stats, model, make_topology("h100", gpus=4))
    obj = cc.make_objective(problem)
    w = cc.coherent_weights(model, problem.topology)
    assert obj.balance / obj.affinity == pytest.approx(w["balance"] * cc.DEFAULT_BALANCE_SCALE / w["affinity"],
                                                       rel=0.005)
    assert obj.affinity == pytest.approx(w["affinity"])
    # weights multiply the cost-model weights (the same semantics as the joint objective)
    custom = cc.make_objective(PlacementProblem(stats, model, problem.topology,
                                                weights={"affinity": 2.0, "balance": 3.0}))
    assert custom.balance / custom.affinity == pytest.approx(1.5 * obj.balance / obj.affinity, rel=0.01)
    only_affinity = cc.make_objective(PlacementProblem(stats, model, problem.topology,
                                                       weights={"objective": "affinity"}))
    assert only_affinity.balance == 0 and only_affinity.affinity > 0
    with pytest.raises(InvalidInputError):
        cc.make_objective(PlacementProblem(stats, model, problem.topology, weights={"balance": -1.0}))


# --------------------------------------------------------------------------------------------
# MIPs reach the DP optimum on small instances
# --------------------------------------------------------------------------------------------

SMALL = [(3, 4, 2, 0), (3, 4, 2, 1), (3, 6, 3, 2)]


def dp_optimum(problem):
    obj = cc.make_objective(problem)
    return obj.unit * partition_dp(obj.transitions, obj.load, obj.num_gpus, affinity_weight=obj.aff_int,
                                   load_weight=obj.bal_int).objective


@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("warm", [None, "greedy"])
def test_cpsat_reaches_dp_optimum(shape, warm):
    problem = problem_of(*shape)
    res = cc.solve_coherent(problem, backend="cpsat", deterministic_time=20.0, num_workers=1,
                            warm_start=warm, max_rounds=0)
    check_contract(res, problem)
    assert res.objective == pytest.approx(dp_optimum(problem))
    assert res.status == "optimal"


@pytest.mark.parametrize("backend", ["cbc", "highs"])
@pytest.mark.parametrize("shape", SMALL[:2])
def test_pulp_reaches_dp_optimum(shape, backend):
    if backend == "highs" and not highs_available():
        pytest.skip("highspy is not installed")
    problem = problem_of(*shape)
    res = cc.solve_coherent(problem, backend="pulp", pulp_backend=backend, warm_start="greedy", max_rounds=0)
    check_contract(res, problem)
    assert res.objective == pytest.approx(dp_optimum(problem))
    assert res.status == "optimal"


def test_cpsat_with_load_cap_matches_dp():
    problem = problem_of(3, 6, 3, seed=3, weights={"load_cap": 1.05})
    obj = cc.make_objective(problem)
    best = obj.unit * partition_dp(obj.transitions, obj.load, 3, affinity_weight=obj.aff_int,
                                   load_weight=obj.bal_int, cap_load=obj.cap_load).objective
    for res in (cc.solve_coherent(problem, backend="exact"),
                cc.solve_coherent(problem, backend="cpsat", deterministic_time=20.0, warm_start=None,
                                  max_rounds=0)):
        check_contract(res, problem)
        assert res.objective == pytest.approx(best)
        gpu = np.argsort(res.placement.physical_to_logical, axis=1) // 2
        assert np.all(coherent_cost(gpu, None, obj.load, 3)[1] <= obj.cap_load + 1e-9)


def test_mip_refuses_huge_models():
    problem = problem_of(4, 96, 4)
    with pytest.raises(InvalidInputError, match="local"):
        cc.solve_coherent(problem, backend="cpsat", max_rounds=0)


# --------------------------------------------------------------------------------------------
# Local search
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 8, 4, 0), (5, 16, 4, 1), (6, 24, 8, 2), (3, 6, 3, 3)])
@pytest.mark.parametrize("weights", [{}, {"balance": 0.0}, {"balance": 4.0}, {"load_cap": 1.05}])
def test_local_search_never_worse_than_start(shape, weights):
    obj = cc.make_objective(problem_of(*shape, weights=weights))
    rng = np.random.default_rng(shape[3])
    start = np.stack([rng.permutation(obj.num_experts) % obj.num_gpus for _ in range(obj.num_layers)])
    for given in (start, None):
        gpu, info = cc.local_search(obj, given, seed=shape[3], max_rounds=20)
        assert info.key <= info.start_key
        assert obj.key(gpu) == info.key
        assert np.all(np.stack([np.bincount(r, minlength=obj.num_gpus) for r in gpu]) == obj.capacities[0])


def test_local_search_is_deterministic_and_bounded():
    problem = problem_of(6, 16, 4, seed=5)
    a = cc.solve_coherent(problem, backend="local", seed=3, max_rounds=30)
    b = cc.solve_coherent(problem, backend="local", seed=3, max_rounds=30)
    np.testing.assert_array_equal(a.placement.physical_to_logical, b.placement.physical_to_logical)
    check_contract(a, problem)
    assert a.status == "feasible" and a.bound is not None
    assert a.objective <= a.terms["start_objective"] + 1e-9


@pytest.mark.parametrize("shape", [(4, 8, 4, 1), (3, 6, 3, 4), (4, 8, 8, 2)])
def test_local_bound_is_below_the_optimum(shape):
    problem = problem_of(*shape)
    exact = cc.solve_coherent(problem, backend="exact")
    local = cc.solve_coherent(problem, backend="local", max_rounds=50)
    check_contract(local, problem)
    assert local.bound <= exact.objective + 1e-9
    assert local.objective >= exact.objective - 1e-9
    if shape[1] == shape[2]:  # one expert per GPU: the assignment bound is tight
        assert local.bound == pytest.approx(exact.objective)


def test_auto_uses_exact_where_possible_else_local():
    small = cc.solve_coherent(problem_of(3, 4, 2))
    assert small.method == "exact" and small.status == "optimal"
    big = cc.solve_coherent(problem_of(4, 32, 4), max_rounds=5)
    assert big.backend == "numpy-local" and big.status == "feasible"
    check_contract(big, problem_of(4, 32, 4))


# --------------------------------------------------------------------------------------------
# Replicas
# --------------------------------------------------------------------------------------------


def trace_problem(redundant, gpus=4, seed=0):
    rng = np.random.default_rng(seed)
    num_layers, num_experts, tokens = 4, 8, 3000
    ids = np.empty((tokens, num_layers, 2), dtype=np.int16)
    state = rng.integers(0, num_experts, tokens)
    for layer in range(num_layers):
        # Top-1 follows a sticky walk (strong affinity), top-2 another expert.
        jump = rng.random(tokens) < 0.4
        state = np.where(jump, rng.integers(0, num_experts, tokens), (state * 3 + layer) % num_experts)
        other = (state + 1 + rng.integers(0, num_experts - 1, tokens)) % num_experts
        ids[:, layer, 0], ids[:, layer, 1] = state, other
    stats = compute_stats(RoutingTrace(ids, num_experts), sample_size=2000)
    model = ModelSpec.from_shape(num_layers, num_experts, 2)
    return PlacementProblem(stats, model, make_topology("h100", gpus=gpus), num_redundant=redundant,
                            execution="context-coherent")


@pytest.mark.parametrize("redundant, gpus", [(4, 4), (2, 5), (8, 8)])
def test_replicas_fill_is_valid_and_not_worse(redundant, gpus):
    problem = trace_problem(redundant, gpus)
    res = cc.solve_coherent(problem, max_rounds=10)
    check_contract(res, problem)
    assert res.status == "feasible" and res.bound is None
    assert res.placement.num_slots == 8 + redundant
    assert res.objective <= res.terms["objective_neutral_fill"] + 1e-9


def test_solve_result_contract_for_every_backend():
    problem = problem_of(3, 4, 2, seed=9)
    for kwargs in ({"backend": "exact"}, {"backend": "local"}, {"backend": "auto"},
                   {"backend": "cpsat", "deterministic_time": 5.0},
                   {"backend": "pulp", "pulp_backend": "cbc", "time_limit_s": 20.0}):
        check_contract(cc.solve_coherent(problem, max_rounds=5, **kwargs), problem)
    with pytest.raises(InvalidInputError, match="backend"):
        cc.solve_coherent(problem, backend="magic")


def test_compare_backends_small():
    problem = problem_of(3, 4, 2, seed=1)
    out = cc.compare_backends(problem, time_limit_s=20.0, backends=("exact", "local", "cpsat", "cbc"))
    assert out["exact"]["status"] == "optimal"
    for name in ("local", "cpsat", "cbc"):
        assert out[name]["rel_to_exact"] >= -1e-9


def test_registered_exact_through_solve():
    problem = problem_of(3, 6, 3, seed=6)
    res = solve(problem, "exact")
    assert res.method == "exact" and res.status == "optimal"


def test_fractional_loads_keep_bounds_valid():
    rng = np.random.default_rng(11)
    t, _ = structured(3, 6, 3, 11)
    stats = RoutingStats(load=rng.random((3, 6)) * 50, num_tokens=100, top_k=2, top1_transitions=t)
    problem = PlacementProblem(stats, ModelSpec.from_shape(3, 6, 2), make_topology("h100", gpus=3))
    exact = cc.solve_coherent(problem, backend="exact")
    assert exact.status == "optimal"
    for kwargs in ({"backend": "local"}, {"backend": "cpsat", "deterministic_time": 5.0},
                   {"backend": "pulp", "time_limit_s": 20.0}):
        res = cc.solve_coherent(problem, max_rounds=5, **kwargs)
        check_contract(res, problem)
        assert res.bound is None or res.bound <= exact.objective * (1 + 1e-9)
        assert res.objective >= exact.objective * (1 - 1e-9)
