"""ExFlow baseline (``placer.ilp.exflow``): aggregated ILP against per-token brute force, schemes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from placer import metrics
from placer.errors import InvalidInputError
from placer.ilp import METHODS, PlacementProblem, solve
from placer.ilp._pulp import highs_available
from placer.ilp.exflow import (
    balanced_splits,
    cut,
    num_balanced_splits,
    split_part,
    split_part_dp,
    split_plan,
    top1_counts,
)
from placer.presets import make_topology
from placer.stats import compute_stats
from placer.types import SOLVE_STATUSES, ModelSpec, RoutingTrace
from placer.validate import check_placement

pytestmark = pytest.mark.timeout(120)


def _trace(experts, layers, tokens=200, top_k=2, seed=0):
    """Tokens with inter-layer affinity: the next top-1 often follows a fixed successor."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(experts)
    ids = np.empty((tokens, layers, top_k), dtype=np.int64)
    for t in range(tokens):
        first = rng.integers(experts)
        for layer in range(layers):
            if layer and rng.random() < 0.6:
                first = successor[ids[t, layer - 1, 0]]
            elif layer:
                first = rng.integers(experts)
            rest = rng.choice([e for e in range(experts) if e != first], size=top_k - 1, replace=False)
            ids[t, layer] = [first, *rest]
    model = ModelSpec.from_shape(layers, experts, top_k, name="tiny")
    return RoutingTrace(ids, experts, model=model), model


def _problem(experts=8, gpus=4, nodes=1, layers=3, redundant=0, seed=0, tokens=200, trace=None):
    trace_, model = _trace(experts, layers, tokens=tokens, seed=seed)
    trace = trace or trace_
    stats = compute_stats(trace, sample_size=tokens)
    return PlacementProblem(stats, model, make_topology("h100", gpus=gpus, nodes=nodes),
                            num_redundant=redundant, execution="context-coherent"), trace


def _brute_per_token(trace, num_gpus):
    """min over all balanced placements of the per-token cross-GPU transitions (the repository's
    formulation: one cost per token and transition)."""
    top1 = trace.sorted_ids()[:, :, 0].astype(np.int64)
    layers, experts = trace.num_layers, trace.num_experts
    labels = balanced_splits(experts, num_gpus)  # GPU of each expert, every balanced split
    best = math.inf
    for combo in itertools.product(range(len(labels)), repeat=layers):
        gpu = labels[list(combo)]  # [L, E]
        on = gpu[np.arange(layers)[None, :], top1]  # [T, L] GPU of each token's top-1
        best = min(best, int((on[:, 1:] != on[:, :-1]).sum()))
    return best


# --------------------------------------------------------------------------------------------
# The aggregated formulation is the per-token one
# --------------------------------------------------------------------------------------------


BACKENDS = ["cpsat", "pulp-cbc", "dp"] + (["pulp-highs"] if highs_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_aggregated_optimum_equals_per_token_brute_force(backend, seed):
    problem, trace = _problem(experts=4, gpus=2, layers=3, seed=seed, tokens=60)
    result = solve(problem, "exflow", backend=backend)
    best = _brute_per_token(trace, 2)
    total = trace.num_tokens * (trace.num_layers - 1)
    assert result.status == "optimal"
    assert result.objective * total == pytest.approx(best)
    assert result.terms["cross_gpu_transitions"] == best
    assert result.gap == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("seed", range(2))
def test_direct_four_way_equals_brute_force(seed):
    problem, trace = _problem(experts=4, gpus=4, layers=3, seed=seed, tokens=60)
    best = _brute_per_token(trace, 4)
    total = trace.num_tokens * 2
    for backend in ("cpsat", "dp"):
        result = solve(problem, "exflow", backend=backend, scheme="direct")
        assert result.status == "optimal" and result.objective * total == pytest.approx(best)
    staged = solve(problem, "exflow")  # recursive bipartition: a heuristic with a valid bound
    assert staged.bound * total <= best + 1e-9 <= staged.objective * total + 1e-9


def test_dp_equals_cpsat_on_a_three_way_split():
    trace, _ = _trace(6, 4, tokens=150, seed=3)
    counts = compute_stats(trace).top1_transitions
    members = np.tile(np.arange(6), (4, 1))
    by_dp, value = split_part_dp(counts, members, 3)
    by_cp, status, bound = split_part([counts], members, 3)
    assert status == "optimal" and cut(counts, by_cp) == value == bound
    assert cut(counts, by_dp) == value


def test_balanced_splits():
    splits = balanced_splits(6, 3)
    assert len(splits) == num_balanced_splits(6, 3) == 90
    assert all((np.bincount(s, minlength=3) == 2).all() for s in splits)
    assert len({tuple(s) for s in splits}) == 90


def test_top1_counts_match_stats():
    trace, _ = _trace(5, 4, seed=1)
    stats = compute_stats(trace)
    np.testing.assert_array_equal(top1_counts(trace.sorted_ids()[:, :, 0], 5), stats.top1_transitions)


# --------------------------------------------------------------------------------------------
# Schemes, validity, anytime, statuses
# --------------------------------------------------------------------------------------------


def test_registered():
    assert "exflow" in METHODS


def test_split_plans():
    assert split_plan("bipartition", make_topology("h100", gpus=8)) == [2, 2, 2]
    assert split_plan("bipartition", make_topology("h100", gpus=6, nodes=2)) == [2, 3]  # not 2^k: staged
    assert split_plan("staged", make_topology("h100", gpus=16, nodes=2)) == [2, 8]
    assert split_plan("staged", make_topology("h100", gpus=8)) == [8]
    assert split_plan("direct", make_topology("h100", gpus=8, nodes=2)) == [8]
    assert split_plan("direct", make_topology("h100", gpus=1)) == []
    with pytest.raises(InvalidInputError, match="unknown scheme"):
        split_plan("spectral", make_topology("h100", gpus=8))


@pytest.mark.parametrize("experts, gpus, nodes, scheme", [
    (8, 4, 1, "bipartition"), (8, 4, 2, "bipartition"), (8, 8, 1, "bipartition"),
    (12, 6, 2, "bipartition"), (8, 4, 2, "staged"), (6, 3, 1, "direct"), (4, 1, 1, "bipartition"),
])
def test_valid_placement_and_consistent_result(experts, gpus, nodes, scheme):
    problem, trace = _problem(experts=experts, gpus=gpus, nodes=nodes, layers=3, seed=gpus)
    result = solve(problem, "exflow", scheme=scheme, deterministic_time=5.0)
    check_placement(result.placement, problem.model, problem.topology)
    assert result.status in SOLVE_STATUSES and result.method == "exflow"
    assert result.bound is None or result.bound <= result.objective + 1e-12
    if result.status == "optimal":
        assert result.gap == pytest.approx(0.0, abs=1e-9)
    assert result.objective <= result.terms["contiguous_frac_cross_gpu"] + 1e-12
    # The objective is the metrics' in-sample fraction (exact from the trace as well).
    measured = metrics.evaluate(result.placement, problem.topology, problem.model, trace,
                                execution="context-coherent")
    assert measured["frac_top1_transitions_cross_gpu"] == pytest.approx(result.objective)


@pytest.mark.parametrize("budget", [0.0, 1e-3, 0.02])
def test_anytime_never_worse_than_contiguous(budget):
    problem, _ = _problem(experts=8, gpus=4, layers=5, seed=5, tokens=400)
    result = solve(problem, "exflow", backend="cpsat", deterministic_time=budget)
    check_placement(result.placement, problem.model, problem.topology)
    assert result.objective <= result.terms["contiguous_frac_cross_gpu"] + 1e-12
    assert result.bound is None or result.bound <= result.objective + 1e-12
    if budget == 0.0:
        assert result.status == "timeout"


def test_token_batches_warm_start_each_solve():
    problem, _ = _problem(experts=8, gpus=4, layers=3, seed=6, tokens=300)
    batched = solve(problem, "exflow", backend="cpsat", token_batch=100)
    whole = solve(problem, "exflow", backend="cpsat")
    check_placement(batched.placement, problem.model, problem.topology)
    assert batched.terms["subsolves"] == 3 * 3  # 3 splits x (2 batches + the full counts)
    assert batched.objective <= batched.terms["contiguous_frac_cross_gpu"]
    assert batched.bound == pytest.approx(whole.bound)  # the last solve is on the full counts
    with pytest.raises(InvalidInputError, match="token_batch"):
        solve(problem, "exflow", token_batch=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpsat"])
def test_backends_agree(backend):
    problem, _ = _problem(experts=8, gpus=4, nodes=2, layers=3, seed=7)
    cp = solve(problem, "exflow")
    other = solve(problem, "exflow", backend=backend)
    assert other.backend == backend
    check_placement(other.placement, problem.model, problem.topology)
    assert other.objective == pytest.approx(cp.objective)
    assert other.bound == pytest.approx(cp.bound)


def test_refuses_replicas_missing_top1_and_unknown_options():
    problem, _ = _problem(experts=8, gpus=4, redundant=4)
    with pytest.raises(InvalidInputError, match="exflow places no replicas"):
        solve(problem, "exflow")
    trace, model = _trace(8, 3)
    unordered = RoutingTrace(trace.expert_ids, 8, order="unknown", model=model)
    no_top1 = PlacementProblem(compute_stats(unordered), model, make_topology("h100", gpus=4))
    with pytest.raises(InvalidInputError, match="top-1"):
        solve(no_top1, "exflow")
    with pytest.raises(InvalidInputError, match="unknown backend"):
        solve(_problem()[0], "exflow", backend="gurobi")
    big, _ = _problem(experts=16, gpus=2, layers=2)
    with pytest.raises(InvalidInputError, match="dp backend"):
        solve(big, "exflow", backend="dp")
