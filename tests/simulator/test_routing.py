"""Routing into token counts: exact token-level accounting on hand-built cases, and the
count level (rates measured once, scaled per step) against the mean of the token level."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from placer.errors import InvalidInputError
from placer.ilp import PlacementProblem, solve
from placer.ilp.simple import contiguous_map
from placer.metrics.dispatch import dispatch_table
from placer.presets import get_model, make_topology
from placer.simulator.config import SimConfig, kernel_preset
from placer.simulator.cost import BatchShape, CostModel
from placer.simulator.routing import routing_rates, sample_traffic, token_traffic
from placer.simulator.workload import routing_pool
from placer.stats import compute_stats
from placer.synthetic import synthesize_trace
from placer.types import Placement, Topology

pytestmark = pytest.mark.timeout(60)

TOPO = Topology(name="t", num_nodes=2, gpus_per_node=2)  # GPUs 0, 1 on node 0; 2, 3 on node 1
CONTIGUOUS = Placement(np.arange(8)[None, :], 2, 8)      # GPU g holds experts 2g, 2g + 1


def mat(entries, shape=(4, 4)):
    out = np.zeros(shape)
    for idx, v in entries.items():
        out[idx] = v
    return out


# --------------------------------------------------------------------------------------------
# Token level, by hand
# --------------------------------------------------------------------------------------------

def test_token_traffic_counts_tokens_per_rank_nodes_per_node_pairs_per_expert():
    ids = np.array([[[0, 1, 2]],   # home 0: GPU 0 twice (local), GPU 1
                    [[4, 5, 6]],   # home 0: GPU 2 twice, GPU 3 (node 1 once)
                    [[0, 2, 7]],   # home 3: GPU 0, GPU 1 (node 0 once), GPU 3 local
                    [[6, 7, 3]]])  # home 1: GPU 3 twice, GPU 1 local
    tr = token_traffic(CONTIGUOUS, TOPO, ids, np.array([0, 0, 3, 1]))
    np.testing.assert_array_equal(tr.src, [[2, 1, 0, 1]])
    # Distinct tokens g -> d, d != g: once per destination rank however many experts it holds.
    np.testing.assert_array_equal(tr.tokens[0], mat({(0, 1): 1, (0, 2): 1, (0, 3): 1, (3, 0): 1, (3, 1): 1,
                                                     (1, 3): 1}))
    # Distinct tokens g -> remote node: token 1 hits GPUs 2 and 3 but node 1 once.
    np.testing.assert_array_equal(tr.nodes[0], mat({(0, 1): 1, (1, 1): 1, (3, 0): 1}, (4, 2)))
    # Token-expert pairs g -> d, local ones on the diagonal.
    np.testing.assert_array_equal(tr.pairs[0], mat({(0, 0): 2, (0, 1): 1, (0, 2): 2, (0, 3): 1, (1, 1): 1,
                                                    (1, 3): 2, (3, 0): 1, (3, 1): 1, (3, 3): 1}))
    np.testing.assert_array_equal(tr.slots[0], [2, 1, 2, 1, 1, 1, 2, 2])
    assert tr.moves is None and tr.num_tokens == 4
    # Every pair is served somewhere; tokens never exceed pairs.
    assert tr.pairs.sum() == tr.slots.sum() == 12
    assert np.all(tr.tokens <= tr.pairs)


def test_token_traffic_uses_a_local_replica_when_there_is_one():
    # Expert 4 also on GPU 0 (slot 1), expert 0 also on GPU 2 (slot 5).
    placement = Placement(np.array([[0, 4, 1, 2, 3, 0, 4, 5, 6, 7]]), 5, 8)
    topo = Topology(name="t", num_nodes=1, gpus_per_node=2)
    tr = token_traffic(placement, topo, np.array([[[4, 0]], [[4, 0]]]), np.array([0, 1]))
    # Home 0 finds both locally; home 1 finds both in its own slots 5 (expert 0) and 6 (expert 4).
    np.testing.assert_array_equal(tr.tokens[0], 0.0)
    np.testing.assert_array_equal(tr.pairs[0], [[2, 0], [0, 2]])
    np.testing.assert_array_equal(tr.slots[0], [1, 1, 0, 0, 0, 1, 1, 0, 0, 0])


def test_context_coherent_token_traffic_follows_the_top1_expert():
    placement = Placement(np.tile(np.arange(8), (2, 1)), 2, 8)
    ids = np.array([[[4, 0], [1, 6]],    # home 0 -> GPU 2 (move), sends to GPU 0; -> GPU 0 (move), sends to 3
                    [[2, 3], [5, 4]]])   # home 1 stays on GPU 1 (both local); -> GPU 2 (move), both local
    tr = token_traffic(placement, TOPO, ids, np.array([0, 1]), execution="context-coherent")
    np.testing.assert_array_equal(tr.src, [[0, 1, 1, 0], [1, 0, 1, 0]])
    np.testing.assert_array_equal(tr.moves[0], mat({(0, 2): 1}))
    np.testing.assert_array_equal(tr.moves[1], mat({(2, 0): 1, (1, 2): 1}))
    np.testing.assert_array_equal(tr.tokens[0], mat({(2, 0): 1}))
    np.testing.assert_array_equal(tr.tokens[1], mat({(0, 3): 1}))
    np.testing.assert_array_equal(tr.nodes[0], mat({(2, 0): 1}, (4, 2)))
    np.testing.assert_array_equal(tr.nodes[1], mat({(0, 1): 1}, (4, 2)))
    # The top-1 pair is served where the state now is.
    np.testing.assert_array_equal(tr.pairs[0], mat({(2, 2): 1, (2, 0): 1, (1, 1): 2}))
    np.testing.assert_array_equal(tr.pairs[1], mat({(0, 0): 1, (0, 3): 1, (2, 2): 2}))
    np.testing.assert_array_equal(tr.slots, [[1, 0, 1, 1, 1, 0, 0, 0], [0, 1, 0, 0, 1, 1, 1, 0]])


def test_routing_rates_reject_an_empty_pool():
    with pytest.raises(InvalidInputError, match="empty"):
        routing_rates(CONTIGUOUS, TOPO, np.zeros((0, 1, 2), dtype=np.int64))


def test_sample_traffic_expectation_scales_with_tokens_and_draws_keep_totals():
    rng = np.random.default_rng(3)
    pool = np.stack([rng.choice(8, 2, replace=False) for _ in range(400)])[:, None, :]
    rates = routing_rates(CONTIGUOUS, TOPO, pool)
    n = np.array([3.0, 0.0, 5.0, 2.0])
    exp1 = sample_traffic(rates, CONTIGUOUS, TOPO, n, None)
    exp2 = sample_traffic(rates, CONTIGUOUS, TOPO, 2 * n, None)
    for field in ("src", "tokens", "nodes", "pairs", "slots"):
        np.testing.assert_allclose(getattr(exp2, field), 2 * getattr(exp1, field))
    np.testing.assert_array_equal(exp1.src, [n])
    assert exp1.slots.sum() == pytest.approx(n.sum() * 2)  # top-2: two pairs per token
    drawn = sample_traffic(rates, CONTIGUOUS, TOPO, n, np.random.default_rng(0), with_pairs=False)
    assert drawn.pairs is None
    np.testing.assert_array_equal(drawn.src, exp1.src)
    np.testing.assert_allclose(drawn.slots.sum(axis=1), exp1.slots.sum(axis=1))  # rescaled to the total
    assert not np.allclose(drawn.slots, exp1.slots)


# --------------------------------------------------------------------------------------------
# Count level against the token level, statistically (fixed seeds)
# --------------------------------------------------------------------------------------------

MIXTRAL = get_model("mixtral-8x7b")


@pytest.fixture(scope="module")
def mixtral_pool():
    return routing_pool(None, MIXTRAL, size=2048, seed=0).ids


def batch_means(placement, topology, pool, *, tokens_per_rank, batches, execution="standard", seed=0,
                kernels=("deepep-normal",)):
    """Mean token-level traffic over random batches drawn from ``pool``, the count level's
    expectation, and per kernel the mean (MoE time, step time) of both levels."""
    g = topology.num_gpus
    rates = routing_rates(placement, topology, pool, execution=execution)
    n = np.full(g, float(tokens_per_rank))
    home = np.repeat(np.arange(g), tokens_per_rank)
    expected = sample_traffic(rates, placement, topology, n, None)
    table = dispatch_table(placement, topology)
    shape = BatchShape(prefill_tokens=np.zeros(g), decode_tokens=n, decode_context=n * 1024,
                       prefill_positions=np.zeros(g))
    costs = {k: CostModel(MIXTRAL, topology, placement,
                          SimConfig(network=kernel_preset(k), execution=execution)) for k in kernels}
    rng = np.random.default_rng(seed)
    fields = ("src", "tokens", "nodes", "pairs", "slots", "moves")
    total = {f: 0.0 for f in fields}
    token_cost = {k: [] for k in kernels}
    count_cost = {k: [] for k in kernels}
    for _ in range(batches):
        pick = rng.integers(0, len(pool), size=len(home))
        tr = token_traffic(placement, topology, pool[pick], home, execution=execution, index=pick, table=table)
        for f in fields:
            if getattr(tr, f) is not None:
                total[f] = total[f] + getattr(tr, f)
        for k, cost in costs.items():
            token_cost[k].append(moe_and_total(cost.step_cost(tr, shape)))
            sampled = sample_traffic(rates, placement, topology, n, rng, with_pairs=k == "deepep-ll")
            count_cost[k].append(moe_and_total(cost.step_cost(sampled, shape)))
    mean = {f: v / batches for f, v in total.items() if not np.isscalar(v)}
    return mean, expected, {k: (np.mean(count_cost[k], axis=0), np.mean(token_cost[k], axis=0)) for k in kernels}


def moe_and_total(step):
    """The step's MoE time (dispatch + expert compute + combine over layers) and its total."""
    return np.array([step.dispatch_s.sum() + step.compute_s.sum() + step.combine_s.sum(), step.total_s])


def per_layer(a):
    return a.reshape(a.shape[0], -1).sum(axis=1)


def assert_close_per_layer(mean, expected, field, rel):
    m, e = per_layer(mean[field]), per_layer(getattr(expected, field))
    np.testing.assert_allclose(m, e, rtol=rel, err_msg=field)


@pytest.mark.timeout(120)
def test_count_level_matches_token_level_on_one_node(mixtral_pool):
    topo = make_topology("h100", gpus=4)
    placement = Placement(contiguous_map(MIXTRAL.num_moe_layers, 8, 8), 2, 8)
    mean, expected, cost = batch_means(placement, topo, mixtral_pool, tokens_per_rank=2, batches=400,
                                       kernels=("deepep-normal", "deepep-ll"))
    for field in ("src", "pairs", "slots"):
        assert_close_per_layer(mean, expected, field, 1e-9)  # exact: K pairs per token
    assert_close_per_layer(mean, expected, "tokens", 0.035)
    assert not mean["nodes"].any() and not expected.nodes.any()
    for kernel, (count, token) in cost.items():  # (MoE time, step time), mean over steps
        np.testing.assert_allclose(count, token, rtol=0.015, err_msg=kernel)


@pytest.fixture(scope="module")
def eplb_two_nodes():
    topo = make_topology("h100", gpus=8, nodes=2)
    stats = compute_stats(synthesize_trace(MIXTRAL, 2048, seed=3))
    placement = solve(PlacementProblem(stats, MIXTRAL, topo, num_redundant=8), "eplb").placement
    assert placement.num_redundant == 8 and (placement.logcnt() > 1).any()
    return placement, topo


@pytest.mark.timeout(120)
def test_count_level_matches_token_level_on_two_nodes_with_replicas(mixtral_pool, eplb_two_nodes):
    placement, topo = eplb_two_nodes
    mean, expected, cost = batch_means(placement, topo, mixtral_pool, tokens_per_rank=2, batches=600,
                                       kernels=("deepep-normal", "deepep-ll"))
    for field in ("src", "pairs", "slots"):
        assert_close_per_layer(mean, expected, field, 1e-9)
    assert_close_per_layer(mean, expected, "tokens", 0.03)
    assert_close_per_layer(mean, expected, "nodes", 0.04)
    # Over all layers, the totals agree much more closely; so do the tokens each GPU sends.
    for field in ("tokens", "nodes"):
        assert mean[field].sum() == pytest.approx(getattr(expected, field).sum(), rel=0.01)
    np.testing.assert_allclose(mean["tokens"].sum(axis=(0, 2)), expected.tokens.sum(axis=(0, 2)), rtol=0.02)
    assert expected.nodes.sum() > 0
    for kernel, (count, token) in cost.items():
        np.testing.assert_allclose(count, token, rtol=0.015, err_msg=kernel)


@pytest.mark.timeout(120)
def test_count_level_matches_token_level_context_coherent(mixtral_pool, eplb_two_nodes):
    placement, topo = eplb_two_nodes
    mean, expected, cost = batch_means(placement, topo, mixtral_pool, tokens_per_rank=2, batches=600,
                                       execution="context-coherent", seed=1)
    for field in ("pairs", "slots"):
        assert_close_per_layer(mean, expected, field, 1e-9)
    for field in ("tokens", "moves"):
        assert mean[field].sum() == pytest.approx(getattr(expected, field).sum(), rel=0.02), field
    # Where the state sits: per GPU over all layers.
    np.testing.assert_allclose(mean["src"].sum(axis=0), expected.src.sum(axis=0), rtol=0.03)
    (count, token), = cost.values()
    np.testing.assert_allclose(count, token, rtol=0.015)


def test_count_level_cost_without_pairs_rejects_the_low_latency_kernel(eplb_two_nodes):
    placement, topo = eplb_two_nodes
    pool = routing_pool(None, MIXTRAL, size=64, seed=0).ids
    rates = routing_rates(placement, topo, pool)
    traffic = sample_traffic(rates, placement, topo, np.ones(8), None, with_pairs=False)
    cost = CostModel(MIXTRAL, topo, placement, SimConfig(network=kernel_preset("deepep-ll")))
    shape = BatchShape(np.zeros(8), np.ones(8), np.ones(8), np.zeros(8))
    with pytest.raises(ValueError):
        cost.step_cost(traffic, shape)
    assert cost.step_cost(replace(traffic, pairs=sample_traffic(rates, placement, topo, np.ones(8), None).pairs),
                          shape).total_s > 0
