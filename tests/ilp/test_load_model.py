"""The search's load model: expected GPU loads, their variance over the ``nearest`` deal and of
the sample's estimate, and the expected busiest GPU (numpy and the kernels alike)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from placer.ilp import PlacementProblem
from placer.ilp import _ls_anneal as A
from placer.ilp import _ls_load as LK
from placer.ilp.load_model import expected_max, gpu_load_moments, moments_numpy, rank_loads
from placer.ilp.local_search import LayerTask, SearchConfig, _layer, token_types
from placer.ilp.objective import expected_ratio
from placer.metrics import gpu_load
from placer.presets import make_topology
from placer.stats import compute_stats
from placer.types import ModelSpec, Placement, RoutingTrace


def _trace(rng, tokens, layers, experts, top_k):
    """Skewed routing whose experts' tokens sit unevenly on the ranks (so the deal matters)."""
    pop = rng.dirichlet(np.ones(experts) * 0.6, size=layers)
    ids = np.empty((tokens, layers, top_k), dtype=np.int64)
    for layer in range(layers):
        g = np.log(pop[layer])[None, :] - np.log(-np.log(rng.random((tokens, experts))))
        ids[:, layer] = np.argsort(-g, axis=1)[:, :top_k]
    return RoutingTrace(ids, experts, model=ModelSpec.from_shape(layers, experts, top_k, name="tiny"))


def _map(rng, layers, experts, slots):
    return np.stack([rng.permutation(np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)]))
                     for _ in range(layers)])


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**31),
       st.sampled_from(["nearest", "sglang-dynamic", "vllm"]), st.booleans())
def test_numpy_moments_equal_the_kernel(nodes, gpn, spg, layers, seed, rule, by_rank):
    """The numpy load model (no compilation) == the search kernel's, mean and variance, with home
    ranks uniform or each expert's load split over the ranks unevenly, with sampling noise."""
    rng = np.random.default_rng(seed)
    gpus = nodes * gpn
    slots = gpus * spg
    experts = int(rng.integers(1, slots + 1))
    p2l = _map(rng, layers, experts, slots)
    load = rng.integers(0, 1000, size=(layers, experts)).astype(np.float64)
    rank = sq = noise = None
    if by_rank:
        rank = load[:, :, None] * rng.dirichlet(np.ones(gpus) * 0.5, size=(layers, experts))
        noise = rng.uniform(0.0, 3.0, size=(layers, experts))
        sq = rank * rank - rank * noise[:, :, None]
    want = LK.gpu_load_moments(p2l, load, gpus, nodes, gpn, spg, rule, rank, sq, noise)
    got = moments_numpy(p2l, load, gpus, nodes, gpn, spg, rule, rank, sq, noise)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(got[0].sum(axis=1), load.sum(axis=1), rtol=1e-12)  # every token-slot served once
    assert (got[1] >= 0).all()
    if rule != "nearest":
        assert (got[1] == 0).all()  # the position rules deal no ranks
    scale = rng.uniform(0.5, 2.0, gpus)
    em = expected_max(got[0], got[1], scale)
    np.testing.assert_allclose(em, [LK.expected_max(got[0][i], got[1][i], scale) for i in range(layers)],
                               rtol=1e-12)
    assert (em >= (got[0] * scale).max(axis=1) - 1e-9).all()


def test_expected_max_against_closed_forms_and_sampling():
    """No variance: the largest mean exactly; two equal normals: ``m + s / sqrt(pi)``; many
    unequal ones: within 2 % of the sampled mean of the max (Clark's approximation)."""
    mu = np.array([[1.0, 3.0, 2.0]])
    assert expected_max(mu, np.zeros_like(mu))[0] == 3.0
    assert LK.expected_max(mu[0], np.zeros(3), np.ones(3)) == 3.0
    two = expected_max(np.array([[5.0, 5.0]]), np.array([[4.0, 4.0]]))[0]
    assert two == pytest.approx(5.0 + 2.0 / math.sqrt(math.pi), rel=1e-12)
    rng = np.random.default_rng(0)
    mean, sd = rng.uniform(9.0, 10.0, 64), rng.uniform(0.1, 0.5, 64)
    sampled = (mean + sd * rng.standard_normal((200_000, 64))).max(axis=1).mean()
    got = expected_max(mean[None, :], (sd * sd)[None, :])[0]
    assert got == pytest.approx(sampled, rel=0.02)
    assert got > mean.max() + 0.1  # the deal lifts the maximum of level GPUs


def test_the_variance_is_the_seeded_deals_on_average():
    """With replicas, the model's per-GPU mean and variance are those of the load counted token
    by token over many ``nearest`` tables (the sample is the whole trace: no sampling noise), and
    the expected max is the mean busiest GPU's load."""
    rng = np.random.default_rng(1)
    gpus, nodes, spg, experts = 8, 2, 2, 10
    trace = _trace(rng, 400, 1, experts, 2)
    stats = compute_stats(trace, sample_size=400, seed=0)
    topo = make_topology("h100", gpus=gpus, nodes=nodes)
    p2l = _map(rng, 1, experts, gpus * spg)
    placement = Placement(p2l, spg, experts)
    runs = np.array([gpu_load(placement, topo, trace, seed=seed)[0] for seed in range(600)])
    assert not np.allclose(runs.var(axis=0), 0.0)  # the deal varies the load
    loads = rank_loads(stats, gpus)
    mean, var = gpu_load_moments(p2l, stats.load, gpus, nodes, gpus // nodes, spg, "nearest", *loads)
    assert np.allclose(loads.noise, 0.0)
    np.testing.assert_allclose(runs.mean(axis=0), mean[0], rtol=0.02)
    np.testing.assert_allclose(runs.var(axis=0), var[0], rtol=0.2, atol=0.05 * var.max())
    busiest = runs.max(axis=1).mean()
    assert expected_max(mean, var)[0] == pytest.approx(busiest, rel=0.01)
    problem = PlacementProblem(stats, trace.model, topo, num_redundant=gpus * spg - experts)
    mx, mean_load = expected_ratio(problem, placement)
    assert mx[0] * stats.num_tokens == pytest.approx(expected_max(mean, var)[0], rel=1e-9)
    assert mean_load[0] * stats.num_tokens == pytest.approx(mean[0].mean(), rel=1e-12)


def test_a_sample_of_the_trace_adds_its_noise_and_removes_it_from_the_squares():
    """A quarter of the trace as the sample: the noise is about 3 (k = 4), the squares are
    unbiased for the whole trace's (mean over sample seeds), and the estimate's variance covers
    the spread of the sample's expected loads around the whole trace's."""
    rng = np.random.default_rng(2)
    gpus, nodes, spg, experts, tokens = 8, 2, 2, 10, 1600
    trace = _trace(rng, tokens, 1, experts, 2)
    full = compute_stats(trace, sample_size=tokens, seed=0)
    truth = rank_loads(full, gpus).shares
    truth_sq = truth ** 2
    p2l = _map(rng, 1, experts, gpus * spg)
    true_mean = LK.gpu_load_moments(p2l, full.load, gpus, nodes, gpus // nodes, spg, "nearest", truth)[0]
    squares, means, est_var = [], [], []
    for seed in range(60):
        part = compute_stats(trace, sample_size=tokens // 4, seed=seed)
        loads = rank_loads(part, gpus)
        assert np.median(loads.noise) == pytest.approx(3.0, rel=0.25)
        squares.append(loads.squares.sum(axis=2))
        with_noise = gpu_load_moments(p2l, part.load, gpus, nodes, gpus // nodes, spg, "nearest", *loads)
        deal_only = gpu_load_moments(p2l, part.load, gpus, nodes, gpus // nodes, spg, "nearest", loads.shares,
                                     loads.squares)
        means.append(with_noise[0][0])
        est_var.append(with_noise[1][0] - deal_only[1][0])
    np.testing.assert_allclose(np.mean(squares, axis=0), truth_sq.sum(axis=2), rtol=0.1, atol=0.02 * truth_sq.max())
    spread = np.mean((np.array(means) - true_mean[0]) ** 2, axis=0)
    np.testing.assert_allclose(np.mean(est_var, axis=0), spread, rtol=0.35, atol=1e-6 * spread.max())


def test_the_search_state_keeps_the_variance_through_moves():
    """After many annealing moves the incremental per-GPU variance equals a rebuild, and the
    state's busiest-GPU term is the expected max of :func:`expected_max`."""
    rng = np.random.default_rng(5)
    gpus, nodes, spg, experts = 8, 2, 2, 10
    trace = _trace(rng, 300, 1, experts, 2)
    stats = compute_stats(trace, sample_size=300, seed=0)
    cfg = SearchConfig(num_gpus=gpus, num_nodes=nodes, gpus_per_node=gpus // nodes, slots_per_gpu=spg,
                       num_experts=experts, num_slots=gpus * spg, top_k=2, rule="nearest", w_bal=1.0,
                       w_nv=1.0, w_rdma=10.0)
    home = stats.sample_token_index.astype(np.int64) % gpus
    ids, hm, wt = token_types(stats.sample_ids[:, 0].astype(np.int64), home)
    t = stats.num_tokens
    p2l = _map(rng, 1, experts, gpus * spg)[0]
    loads = rank_loads(stats, gpus)
    task = LayerTask(0, stats.load[0] / t, ids, hm, wt, p2l[None], rank_load=loads.shares[0] / t,
                     rank_sq=loads.squares[0] / t ** 2, noise=np.full(experts, 0.5) / t)
    lay, st_, wk = _layer(task, cfg)
    traffic, mx, sd = A.init_state(p2l, lay, st_, wk)
    assert mx == pytest.approx(LK.expected_max(st_.gload, st_.gvar, np.ones(gpus)), rel=1e-12)
    assert st_.gvar.max() > 0
    score = np.array([traffic, mx, sd, 1e30, 1e30, 1e30])
    A.anneal(0, 3000, 3000, rng.random((3000, 6)), 1.0, 1.0, 0.4, 0.3, p2l, p2l.copy(), lay, st_, wk, score)
    gvar = st_.gvar.copy()
    rebuilt = A.init_state(p2l, lay, st_, wk)
    np.testing.assert_allclose(gvar, st_.gvar, rtol=1e-9, atol=1e-15)
    assert rebuilt[1] == pytest.approx(score[1], rel=1e-9)
    mean, var = LK.gpu_load_moments(p2l[None], task.load[None], gpus, nodes, gpus // nodes, spg, "nearest",
                                   task.rank_load[None], task.rank_sq[None], task.noise[None])
    np.testing.assert_allclose(st_.gvar, var[0], rtol=1e-9, atol=1e-15)
