"""placer.metrics against brute-force per-token loops, trace vs stats, and hand-computed cases."""

from __future__ import annotations

import json
import math
from math import lcm

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placer import metrics
from placer.display import MISSING
from placer.errors import InvalidInputError
from placer.metrics.dispatch import dispatch_table
from placer.stats import compute_stats, load_only_stats
from placer.types import DISPATCH_RULES, ModelSpec, Placement, RoutingTrace, Topology

# --------------------------------------------------------------------------------------------
# Random small cases
# --------------------------------------------------------------------------------------------


@st.composite
def cases(draw, replicas: bool = True):
    """(placement, topology, model, trace, rule, seed) with small shapes."""
    nodes = draw(st.integers(1, 2))
    gpn = draw(st.integers(1, 4))
    g = nodes * gpn
    if replicas:
        e = draw(st.integers(2, 8))
        spg = -(-e // g) + draw(st.integers(0, 2))
    else:
        spg = draw(st.integers(1, max(1, 8 // g)))
        e = g * spg
    k = draw(st.integers(1, min(3, e)))
    num_layers = draw(st.integers(1, 4))
    t = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = g * spg
    p2l = np.stack([rng.permutation(np.concatenate([np.arange(e), rng.integers(0, e, p - e)]))
                    for _ in range(num_layers)])
    placement = Placement(p2l, spg, e)
    topology = Topology("test", nodes, gpn)
    ids = np.argsort(rng.random((t, num_layers, e)), axis=-1)[..., :k]
    home = rng.integers(0, g, t) if draw(st.booleans()) else None
    if draw(st.booleans()):  # order given by gate weights instead of column order
        gates = rng.random((t, num_layers, k)).astype(np.float32)
        trace = RoutingTrace(ids, e, order="unknown", gate_weights=gates, home_rank=home)
    else:
        trace = RoutingTrace(ids, e, home_rank=home)
    hidden = draw(st.sampled_from([0, 16]))
    model = ModelSpec("m", num_layers, tuple(range(num_layers)), e, k, hidden_size=hidden,
                      expert_ffn_size=hidden)
    rule = draw(st.sampled_from(DISPATCH_RULES))
    seed = draw(st.integers(0, 3))
    return placement, topology, model, trace, rule, seed


# --------------------------------------------------------------------------------------------
# Brute force (plain Python, one token at a time)
# --------------------------------------------------------------------------------------------


class Brute:
    """Per-token reference: the replica is looked up in the dispatch table (rank rules) or taken
    as the (row % count)-th slot of the expert (sglang-dynamic) or the (Knuth hash of the row %
    count)-th (vllm), nothing else reused."""

    def __init__(self, placement, topology, model, trace, rule, seed):
        self.p2l = placement.physical_to_logical.tolist()
        self.spg, self.gpn = placement.slots_per_gpu, topology.gpus_per_node
        self.g = placement.num_gpus
        self.rule = rule
        self.table = (None if rule in ("sglang-dynamic", "vllm")
                      else dispatch_table(placement, topology, rule, seed, model=trace.model))
        self.tb = model.token_bytes
        self.ids = trace.expert_ids.tolist()
        self.sorted = trace.sorted_ids().tolist() if trace.has_top1 else None
        t = trace.num_tokens
        self.home = [i % self.g for i in range(t)] if trace.home_rank is None else trace.home_rank.tolist()
        self.t, self.l, self.k = t, trace.num_layers, trace.top_k

    def gpu(self, layer, home, index, e):
        if self.table is None:
            slots = [p for p, x in enumerate(self.p2l[layer]) if x == e]
            row = (index * 2654435769) & 0xFFFFFFFF if self.rule == "vllm" else index
            return slots[row % len(slots)] // self.spg
        return int(self.table[layer, home, e]) // self.spg

    def load(self):
        out = np.zeros((self.l, self.g))
        for t in range(self.t):
            for layer in range(self.l):
                for e in self.ids[t][layer]:
                    out[layer, self.gpu(layer, self.home[t], t, e)] += 1
        return out

    def standard(self):
        tot = dict(intra=0, nodes=0, remote=0, rdma=0.0, nvlink=0.0, off_gpu=0, off_node=0)
        per_nodes = [0] * self.l
        for t in range(self.t):
            h = self.home[t]
            for layer in range(self.l):
                gpus = [self.gpu(layer, h, t, e) for e in self.ids[t][layer]]
                dests = set(gpus) - {h}
                intra = {x for x in dests if x // self.gpn == h // self.gpn}
                remote = dests - intra
                nodes = {x // self.gpn for x in remote}
                landing = {x for x in remote if x % self.gpn == h % self.gpn}
                tot["intra"] += len(intra)
                tot["nodes"] += len(nodes)
                per_nodes[layer] += len(nodes)
                tot["remote"] += len(remote)
                tot["rdma"] += len(nodes) * self.tb
                tot["nvlink"] += (len(intra) + len(remote) - len(landing)) * self.tb
                tot["off_gpu"] += sum(x != h for x in gpus)
                tot["off_node"] += sum(x // self.gpn != h // self.gpn for x in gpus)
        return tot, per_nodes

    def cc(self):
        tot = dict(moves=0, others=0, bytes=0.0, cross_gpu=0, cross_node=0)
        for t in range(self.t):
            loc = self.home[t]
            prev = None
            for layer in range(self.l):
                row = self.sorted[t][layer]
                g1 = self.gpu(layer, loc, t, row[0])
                others = {self.gpu(layer, g1, t, e) for e in row[1:]} - {g1}
                tot["moves"] += g1 != loc
                tot["others"] += len(others)
                tot["bytes"] += self.tb * (g1 != loc) + 2 * self.tb * len(others)
                if prev is not None:
                    tot["cross_gpu"] += g1 != prev
                    tot["cross_node"] += g1 // self.gpn != prev // self.gpn
                prev = loc = g1
        return tot


def close(a, b):
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


# --------------------------------------------------------------------------------------------
# Trace metrics = brute force
# --------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(cases())
def test_gpu_load_and_balance_match_bruteforce(case):
    placement, topology, model, trace, rule, seed = case
    load = metrics.gpu_load(placement, topology, trace, dispatch=rule, seed=seed)
    ref = Brute(*case).load()
    np.testing.assert_array_equal(load, ref)
    lb = metrics.load_balance(load)
    ratios = [max(r) / (sum(r) / len(r)) if sum(r) > 0 else 1.0 for r in ref.tolist()]
    np.testing.assert_allclose(lb["per_layer"], ratios)
    assert close(lb["median"], float(np.median(ratios)))
    assert close(lb["worst"], max(ratios)) and ratios[lb["worst_layer"]] == max(ratios)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_dispatch_traffic_matches_bruteforce(case):
    placement, topology, model, trace, rule, seed = case
    out = metrics.dispatch_traffic(placement, topology, model, trace, dispatch=rule, seed=seed)
    ref, per_nodes = Brute(*case).standard()
    n = trace.num_tokens * trace.num_layers
    assert out["source"] == "trace" and out["tokens"] == trace.num_tokens
    assert close(out["intra_node_ranks_per_token_layer"], ref["intra"] / n)
    assert close(out["inter_node_nodes_per_token_layer"], ref["nodes"] / n)
    assert close(out["remote_node_ranks_per_token_layer"], ref["remote"] / n)
    assert close(out["other_ranks_per_token_layer"], (ref["intra"] + ref["remote"]) / n)
    assert close(out["rdma_bytes_per_token_layer"], ref["rdma"] / n)
    assert close(out["nvlink_bytes_per_token_layer"], ref["nvlink"] / n)
    assert close(out["frac_token_slots_off_gpu"], ref["off_gpu"] / (n * trace.top_k))
    assert close(out["frac_token_slots_off_node"], ref["off_node"] / (n * trace.top_k))
    np.testing.assert_allclose(out["per_layer"]["inter_node_nodes"],
                               np.array(per_nodes) / trace.num_tokens)
    if topology.num_nodes == 1:
        assert out["inter_node_nodes_per_token_layer"] == 0 and out["rdma_bytes_per_token_layer"] == 0


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(1, 1), (2, 1), (8, 2), (16, 8), (64, 8), (64, 16), (72, 8), (256, 16)]),
       st.integers(1, 6), st.integers(1, 4), st.integers(1, 9), st.integers(0, 2**31))
def test_standard_counts_masks_equal_sorted(shape, t, num_layers, k, seed):
    """The uint64 bit-mask path (<= 64 GPUs) and the sorting path count the same, popcount
    fallback included; beyond 64 GPUs the sorting path is used."""
    from placer.metrics import core

    num_gpus, gpn = shape
    rng = np.random.default_rng(seed)
    gpu = rng.integers(0, num_gpus, size=(t, num_layers, k))
    home = rng.integers(0, num_gpus, size=t)
    sorted_ = core.standard_counts(gpu, home, gpn)
    masked = core.standard_counts(gpu, home, gpn, num_gpus)
    assert set(sorted_) == set(masked) == set(core.STANDARD_COUNTS)
    for name in sorted_:
        np.testing.assert_array_equal(sorted_[name], masked[name], err_msg=name)
    if num_gpus <= core.MASK_GPUS:
        masks = core.gpu_masks(gpu)
        bits = core._BYTE_BITS[np.ascontiguousarray(masks).view(np.uint8).reshape(*masks.shape, 8)].sum(-1)
        np.testing.assert_array_equal(core._popcount(masks), bits)
        np.testing.assert_array_equal(bits, [[len(set(row)) for row in tok] for tok in gpu.tolist()])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(1, 1), (2, 1), (8, 2), (16, 8), (64, 8), (72, 8), (256, 16)]),
       st.integers(1, 6), st.integers(1, 4), st.integers(1, 9), st.integers(1, 3), st.integers(0, 2**31))
def test_compiled_table_counts_equal_standard_counts(shape, t, num_layers, k, spg, seed):
    """The compiled rank-table kernel counts what standard_counts counts on the table's GPUs."""
    from placer.metrics import core
    from placer.metrics._count import COUNT_NAMES, table_standard_counts

    num_gpus, gpn = shape
    num_experts = 12
    rng = np.random.default_rng(seed)
    table = rng.integers(0, num_gpus * spg, size=(num_layers, num_gpus, num_experts))
    ids = rng.integers(0, num_experts, size=(t, num_layers, k))
    home = rng.integers(0, num_gpus, size=t)
    gpu = table[np.arange(num_layers)[None, :, None], home[:, None, None], ids] // spg
    want = core.standard_counts(gpu, home, gpn, num_gpus)
    got = table_standard_counts(ids, home, table, spg, gpn, num_gpus)
    assert set(got) == set(want) == set(COUNT_NAMES) == set(core.STANDARD_COUNTS)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_context_coherent_matches_bruteforce(case):
    placement, topology, model, trace, rule, seed = case
    out = metrics.context_coherent_traffic(placement, topology, model, trace, dispatch=rule, seed=seed)
    ref = Brute(*case).cc()
    t, num_layers = trace.num_tokens, trace.num_layers
    assert out["transitions_source"] == "trace"
    assert close(out["state_moves_per_token_layer"], ref["moves"] / (t * num_layers))
    assert close(out["other_gpus_per_token_layer"], ref["others"] / (t * num_layers))
    assert close(out["bytes_per_token_layer"], ref["bytes"] / (t * num_layers))
    if num_layers == 1:
        assert out["frac_top1_transitions_cross_gpu"] is None
    else:
        assert close(out["frac_top1_transitions_cross_gpu"], ref["cross_gpu"] / (t * (num_layers - 1)))
        assert close(out["frac_top1_transitions_cross_node"], ref["cross_node"] / (t * (num_layers - 1)))


# --------------------------------------------------------------------------------------------
# Trace vs stats
# --------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(cases())
def test_full_sample_stats_equal_trace(case):
    placement, topology, model, trace, rule, seed = case
    stats = compute_stats(trace, sample_size=trace.num_tokens)
    kw = dict(dispatch=rule, seed=seed)
    a = metrics.dispatch_traffic(placement, topology, model, trace, **kw)
    b = metrics.dispatch_traffic(placement, topology, model, stats, **kw)
    assert b["source"] == "sample" and b["tokens"] == trace.num_tokens
    for key, v in a.items():
        if key.endswith("_per_token_layer") or key.startswith("frac"):
            assert close(v, b[key]), key
    a = metrics.context_coherent_traffic(placement, topology, model, trace, **kw)
    b = metrics.context_coherent_traffic(placement, topology, model, stats, **kw)
    for key, v in a.items():
        if key.endswith("_per_token_layer") or key.startswith("frac"):
            assert close(v, b[key]), key


@settings(max_examples=40, deadline=None)
@given(cases(replicas=False))
def test_stats_exact_without_replicas(case):
    placement, topology, model, trace, rule, seed = case
    stats = compute_stats(trace, sample_size=0)
    kw = dict(dispatch=rule, seed=seed)
    np.testing.assert_allclose(metrics.gpu_load(placement, topology, stats, **kw),
                               metrics.gpu_load(placement, topology, trace, **kw))
    a = metrics.context_coherent_traffic(placement, topology, model, trace, **kw)
    b = metrics.context_coherent_traffic(placement, topology, model, stats, **kw)
    assert b["transitions_source"] == "stats" and b["source"] is None and b["bytes_per_token_layer"] is None
    for key in ("frac_top1_transitions_cross_gpu", "frac_top1_transitions_cross_node"):
        assert close(a[key], b[key]), key
        np.testing.assert_allclose(a["per_layer"][key], b["per_layer"][key])


@settings(max_examples=40, deadline=None)
@given(cases())
def test_stats_load_is_expectation_over_homes_and_positions(case):
    """Repeating every token M times (M a multiple of G and of every replica count) with
    round-robin homes makes the trace's exact load M x the stats' expected load. (vLLM's hashed
    row is even over replicas only on average, so it is checked by the next test.)"""
    placement, topology, model, trace, rule, seed = case
    if rule == "vllm":
        rule = "sglang-dynamic"
    m = lcm(placement.num_gpus, *placement.logcnt().ravel().tolist())
    rep = RoutingTrace(np.repeat(trace.expert_ids, m, axis=0), trace.num_experts)
    kw = dict(dispatch=rule, seed=seed)
    expected = metrics.gpu_load(placement, topology, compute_stats(trace, sample_size=0), **kw)
    np.testing.assert_allclose(metrics.gpu_load(placement, topology, rep, **kw) / m, expected)


def test_vllm_hash_load_is_near_even_over_replicas():
    """vLLM's Knuth-hashed rows spread a replicated expert's tokens nearly evenly."""
    placement = Placement([[0, 1, 0, 2, 0, 3]], 2, 4)  # expert 0 on all three GPUs
    topology = Topology("t", 1, 3)
    trace = RoutingTrace(np.zeros((3000, 1, 1), dtype=np.int64), 4)
    load = metrics.gpu_load(placement, topology, trace, dispatch="vllm")[0]
    assert load.sum() == 3000 and np.all(np.abs(load - 1000) < 30)
    assert metrics.gpu_load(placement, topology, trace, dispatch="sglang-dynamic")[0].tolist() == [1000] * 3


# --------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------


def _model(num_layers: int, e: int, k: int, hidden: int = 64) -> ModelSpec:
    return ModelSpec("hand", num_layers, tuple(range(num_layers)), e, k, hidden_size=hidden,
                     expert_ffn_size=hidden)


def test_hand_two_gpus_two_nodes():
    # GPU 0 (node 0) holds experts 0, 1; GPU 1 (node 1) holds 2, 3. One token on GPU 0 picks
    # [2, 0]: one RDMA send to node 1, landing on GPU 1 (local index 0 like home), no NVLink.
    placement = Placement([[0, 1, 2, 3]], 2, 4)
    topology = Topology("t", 2, 1)
    model = _model(1, 4, 2)
    tb = model.token_bytes
    trace = RoutingTrace([[[2, 0]]], 4, home_rank=[0])
    out = metrics.dispatch_traffic(placement, topology, model, trace)
    assert out["intra_node_ranks_per_token_layer"] == 0
    assert out["inter_node_nodes_per_token_layer"] == 1
    assert out["remote_node_ranks_per_token_layer"] == 1
    assert out["rdma_bytes_per_token_layer"] == tb and out["nvlink_bytes_per_token_layer"] == 0
    assert out["frac_token_slots_off_gpu"] == 0.5
    cc = metrics.context_coherent_traffic(placement, topology, model, trace)
    # state moves to GPU 1 (top-1 expert 2), expert 0 dispatched back to GPU 0 and combined.
    assert cc["state_moves_per_token_layer"] == 1 and cc["other_gpus_per_token_layer"] == 1
    assert cc["bytes_per_token_layer"] == 3 * tb
    assert cc["frac_top1_transitions_cross_gpu"] is None  # one layer: no transitions
    np.testing.assert_array_equal(metrics.gpu_load(placement, topology, trace), [[1, 1]])


def test_hand_two_nodes_of_two_gpus():
    # GPUs 0..3 hold {0,1}, {2,3}, {4,5}, {6,7}; nodes {0,1}, {2,3}. One token, home GPU 0.
    placement = Placement([list(range(8))] * 2, 2, 8)
    topology = Topology("t", 2, 2)
    model = _model(2, 8, 3)
    tb = model.token_bytes
    trace = RoutingTrace([[[6, 2, 5], [0, 1, 7]]], 8, home_rank=[0])
    out = metrics.dispatch_traffic(placement, topology, model, trace)
    # layer 0: GPUs 3, 1, 2 -> intra {1}; node 1 via GPU 2 (landing), forwarded to GPU 3.
    # layer 1: GPUs 0, 0, 3 -> node 1 via GPU 2, forwarded to GPU 3.
    assert out["intra_node_ranks_per_token_layer"] == 0.5
    assert out["inter_node_nodes_per_token_layer"] == 1.0
    assert out["remote_node_ranks_per_token_layer"] == 1.5
    assert out["rdma_bytes_per_token_layer"] == tb
    assert out["nvlink_bytes_per_token_layer"] == 1.5 * tb
    assert out["frac_token_slots_off_gpu"] == pytest.approx(4 / 6)
    assert out["frac_token_slots_off_node"] == 0.5
    np.testing.assert_allclose(out["per_layer"]["nvlink_bytes"], [2 * tb, tb])
    cc = metrics.context_coherent_traffic(placement, topology, model, trace)
    # layer 0: state 0 -> 3; others on GPUs 1, 2 -> tb + 4 tb. layer 1: state 3 -> 0; expert 1
    # is on GPU 0 with the state, expert 7 on GPU 3 -> tb + 2 tb.
    assert cc["state_moves_per_token_layer"] == 1.0
    assert cc["other_gpus_per_token_layer"] == 1.5
    assert cc["bytes_per_token_layer"] == 4 * tb
    assert cc["frac_top1_transitions_cross_gpu"] == 1.0
    assert cc["frac_top1_transitions_cross_node"] == 1.0
    lb = metrics.load_balance(metrics.gpu_load(placement, topology, trace))
    np.testing.assert_allclose(lb["per_layer"], [4 / 3, 8 / 3])
    assert lb["median"] == pytest.approx(2.0) and lb["worst_layer"] == 1


def test_replica_on_home_gpu_avoids_traffic():
    # Expert 0 replicated on both GPUs: a token on either GPU uses its own copy.
    placement = Placement([[0, 1, 0, 2]], 2, 3)
    topology = Topology("t", 2, 1)
    model = _model(1, 3, 1)
    trace = RoutingTrace([[[0]], [[0]]], 3)  # homes 0 and 1 (round-robin)
    for rule in ("nearest", "sglang-static"):
        out = metrics.dispatch_traffic(placement, topology, model, trace, dispatch=rule)
        assert out["other_ranks_per_token_layer"] == 0
        np.testing.assert_array_equal(metrics.gpu_load(placement, topology, trace, dispatch=rule), [[1, 1]])
    # vllm: token 0 -> first replica (GPU 0), token 1 -> second (GPU 1): also local here.
    out = metrics.dispatch_traffic(placement, topology, model, trace, dispatch="vllm")
    assert out["other_ranks_per_token_layer"] == 0


# --------------------------------------------------------------------------------------------
# load_balance, memory, evaluate, format_table
# --------------------------------------------------------------------------------------------


def test_load_balance_zero_layer_counts_as_one():
    lb = metrics.load_balance(np.array([[0.0, 0.0], [3.0, 1.0], [2.0, 2.0]]))
    np.testing.assert_allclose(lb["per_layer"], [1.0, 1.5, 1.0])
    assert lb["median"] == 1.0 and lb["worst"] == 1.5 and lb["worst_layer"] == 1
    with pytest.raises(InvalidInputError):
        metrics.load_balance(np.zeros(3))


def test_expert_memory():
    placement = Placement([[0, 1, 2, 3]] * 2, 2, 4)
    model = _model(2, 4, 1, hidden=10)
    mem = metrics.expert_memory(placement, model)
    assert mem["bytes_per_gpu"] == 2 * 2 * 3 * 10 * 10 * 2.0
    assert mem["expert_copies_per_gpu"] == 4
    unknown = metrics.expert_memory(placement, ModelSpec.from_shape(2, 4, 1))
    assert unknown["bytes_per_gpu"] is None and unknown["expert_weight_bytes"] is None


def _plain(v) -> bool:
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    return v is None or type(v) in (bool, int, float, str)


@settings(max_examples=20, deadline=None)
@given(cases())
def test_evaluate_is_flat_plain_and_consistent(case):
    placement, topology, model, trace, rule, seed = case
    out = metrics.evaluate(placement, topology, model, trace, dispatch=rule, seed=seed)
    assert _plain(out)
    json.dumps(out, allow_nan=False)
    for key in metrics.METRIC_DESCRIPTIONS:
        assert key in out, key
    std = metrics.dispatch_traffic(placement, topology, model, trace, dispatch=rule, seed=seed)
    cc = metrics.context_coherent_traffic(placement, topology, model, trace, dispatch=rule, seed=seed)
    lb = metrics.load_balance(metrics.gpu_load(placement, topology, trace, dispatch=rule, seed=seed))
    assert close(out["load_max_over_mean_median"], lb["median"])
    assert close(out["other_ranks_per_token_layer"], std["other_ranks_per_token_layer"])
    assert close(out["frac_top1_transitions_cross_gpu"], cc["frac_top1_transitions_cross_gpu"])
    if model.token_bytes:
        assert close(out["cc_bytes_per_token_layer"], cc["bytes_per_token_layer"])
        assert close(out["rdma_bytes_per_token_layer"], std["rdma_bytes_per_token_layer"])
    else:
        assert out["cc_bytes_per_token_layer"] is None and out["rdma_bytes_per_token_layer"] is None
        assert out["expert_memory_bytes_per_gpu"] is None
    assert out["data"] == {"source": "trace", "tokens": trace.num_tokens, "total_tokens": trace.num_tokens,
                           "phase": None, "synthetic": None}
    assert len(out["per_layer"]["load_max_over_mean"]) == trace.num_layers
    table = metrics.format_table(out)
    assert "max/mean GPU load" in table and "cross-GPU transitions" in table


def test_evaluate_top1_unknown_and_load_only():
    placement = Placement([[0, 1, 2, 3]] * 2, 2, 4)
    topology = Topology("t", 1, 2)
    model = _model(2, 4, 2)
    trace = RoutingTrace([[[0, 3], [1, 2]], [[2, 1], [3, 0]]], 4, order="unknown")
    out = metrics.evaluate(placement, topology, model, trace)
    assert out["top1_known"] is False and out["frac_top1_transitions_cross_gpu"] is None
    assert out["other_ranks_per_token_layer"] is not None
    with pytest.raises(InvalidInputError, match="top-1"):
        metrics.evaluate(placement, topology, model, trace, execution="context-coherent")
    with pytest.raises(InvalidInputError, match="top-1"):
        metrics.context_coherent_traffic(placement, topology, model, trace)
    stats = compute_stats(trace)
    with pytest.raises(InvalidInputError, match="top-1"):
        metrics.context_coherent_traffic(placement, topology, model, stats)
    load_only = load_only_stats(np.array([[4, 1, 2, 1], [1, 1, 1, 1]]), 2)
    out = metrics.evaluate(placement, topology, model, load_only)
    assert out["load_max_over_mean_median"] == pytest.approx((5 / 4 + 1) / 2)
    assert out["other_ranks_per_token_layer"] is None and out["data"]["source"] == "stats"
    json.dumps(out, allow_nan=False)
    row = next(line for line in metrics.format_table(out).splitlines() if "ranks other than home" in line)
    assert row.split()[-1] == MISSING  # a metric the counts cannot give shows the one placeholder


def test_evaluate_on_stats_sample():
    rng = np.random.default_rng(1)
    ids = np.argsort(rng.random((200, 3, 6)), axis=-1)[..., :2]
    trace = RoutingTrace(ids, 6)
    placement = Placement([[0, 1, 2, 3, 4, 5, 0, 1]] * 3, 2, 6)
    topology = Topology("t", 2, 2)
    model = _model(3, 6, 2)
    stats = compute_stats(trace, sample_size=50)
    out = metrics.evaluate(placement, topology, model, stats, execution="context-coherent")
    assert out["data"]["source"] == "sample" and out["data"]["tokens"] == 50
    assert out["data"]["total_tokens"] == 200 and out["transitions_source"] == "sample"
    assert out["load_source"] == "stats-expected"
    json.dumps(out, allow_nan=False)
    # no sample: load only, plus the exact top-1 fractions when there are no replicas
    no_sample = compute_stats(trace, sample_size=0)
    out = metrics.evaluate(placement, topology, model, no_sample)
    assert out["other_ranks_per_token_layer"] is None and out["frac_top1_transitions_cross_gpu"] is None
    assert out["load_max_over_mean_median"] is not None
    exact_topo = Topology("t", 3, 1)
    out = metrics.evaluate(Placement([[0, 1, 2, 3, 4, 5]] * 3, 2, 6), exact_topo, model, no_sample)
    assert out["transitions_source"] == "stats" and out["frac_top1_transitions_cross_gpu"] is not None
    assert out["cc_bytes_per_token_layer"] is None
    json.dumps(out, allow_nan=False)


def test_bad_inputs():
    placement = Placement([[0, 1, 2, 3]], 2, 4)
    model = _model(1, 4, 1)
    trace = RoutingTrace([[[0]]], 4, home_rank=[5])
    with pytest.raises(InvalidInputError, match="home rank"):
        metrics.dispatch_traffic(placement, Topology("t", 1, 2), model, trace)
    with pytest.raises(InvalidInputError, match="GPUs"):
        metrics.gpu_load(placement, Topology("t", 1, 4), RoutingTrace([[[0]]], 4))
    with pytest.raises(InvalidInputError, match="dispatch rule"):
        metrics.gpu_load(placement, Topology("t", 1, 2), RoutingTrace([[[0]]], 4), dispatch="random")
    with pytest.raises(InvalidInputError, match="execution"):
        metrics.evaluate(placement, Topology("t", 1, 2), model, RoutingTrace([[[0]]], 4), execution="x")
    with pytest.raises(InvalidInputError, match="layers"):
        metrics.gpu_load(placement, Topology("t", 1, 2), RoutingTrace([[[0], [1]]], 4))


def test_empty_trace():
    placement = Placement([[0, 1, 2, 3]] * 2, 2, 4)
    topology = Topology("t", 1, 2)
    trace = RoutingTrace(np.zeros((0, 2, 1), dtype=np.int16), 4)
    out = metrics.evaluate(placement, topology, _model(2, 4, 1), trace)
    assert out["load_max_over_mean_median"] == 1.0
    assert out["other_ranks_per_token_layer"] is None and out["frac_top1_transitions_cross_gpu"] is None
    json.dumps(out, allow_nan=False)


def test_mixtral_shape_runs():
    """A Mixtral-sized trace (50k tokens x 32 layers) evaluates; its speed is measured in
    benchmarks/, never by a timed unit test."""
    rng = np.random.default_rng(0)
    ids = np.argsort(rng.random((50_000, 32, 8), dtype=np.float32), axis=-1)[..., :2]
    trace = RoutingTrace(ids, 8)
    placement = Placement(np.tile(np.arange(8), (32, 1)), 2, 8)
    topology = Topology("t", 1, 4)
    model = _model(32, 8, 2)
    m = metrics.evaluate(placement, topology, model, trace)
    assert m["load_max_over_mean_median"] >= 1.0


# --------------------------------------------------------------------------------------------
# A streamed trace: the same metrics as the trace held whole
# --------------------------------------------------------------------------------------------


def _stream(trace: RoutingTrace, chunk_tokens: int) -> metrics.TraceStream:
    def chunks():
        for start in range(0, max(trace.num_tokens, 1), chunk_tokens):
            yield trace.select_tokens(np.arange(start, min(start + chunk_tokens, trace.num_tokens)))
    return metrics.TraceStream(chunks, trace.num_tokens, trace.num_layers, trace.num_experts, trace.top_k,
                               trace.has_top1, trace.model)


@settings(max_examples=60, deadline=None)
@given(case=cases(), chunk_tokens=st.sampled_from([1, 3, 7, 64]))
def test_streamed_trace_scores_as_the_whole_trace(case, chunk_tokens):
    """Every rule (rank-table and position), seeded spreads, recorded or round-robin homes: evaluate
    on chunks equals evaluate on the whole trace, and both equal the separate per-metric passes."""
    placement, topology, model, trace, rule, seed = case
    whole = metrics.evaluate(placement, topology, model, trace, dispatch=rule, seed=seed)
    streamed = metrics.evaluate(placement, topology, model, _stream(trace, chunk_tokens), dispatch=rule, seed=seed)
    assert json.dumps(streamed, sort_keys=True) == json.dumps(whole, sort_keys=True)
    load = metrics.gpu_load(placement, topology, trace, dispatch=rule, seed=seed)
    assert whole["load_max_over_mean_median"] == metrics.load_balance(load)["median"]
    std = metrics.dispatch_traffic(placement, topology, model, trace, dispatch=rule, seed=seed)
    for key in ("other_ranks_per_token_layer", "inter_node_nodes_per_token_layer", "frac_token_slots_off_node"):
        assert whole[key] == std[key]
    cc = metrics.context_coherent_traffic(placement, topology, model, trace, dispatch=rule, seed=seed)
    assert whole["frac_top1_transitions_cross_gpu"] == cc["frac_top1_transitions_cross_gpu"]
    assert whole["cc_other_gpus_per_token_layer"] == cc["other_gpus_per_token_layer"]
    np.testing.assert_array_equal(metrics.gpu_load(placement, topology, _stream(trace, chunk_tokens),
                                                   dispatch=rule, seed=seed), load)


@pytest.mark.parametrize("rule", DISPATCH_RULES)
def test_streamed_trace_with_replicas_across_nodes(rule):
    """A seeded 4-node case with replicas (seeded random spreads of the rank-table rules)."""
    rng = np.random.default_rng(7)
    e, k, num_layers, t, spg = 16, 4, 3, 3000, 5
    topology = Topology("test", 4, 2)
    p = topology.num_gpus * spg
    p2l = np.stack([rng.permutation(np.concatenate([np.arange(e), rng.integers(0, e, p - e)]))
                    for _ in range(num_layers)])
    placement = Placement(p2l, spg, e)
    model = ModelSpec("m", num_layers, tuple(range(num_layers)), e, k, hidden_size=32, expert_ffn_size=32)
    ids = np.argsort(rng.random((t, num_layers, e)), axis=-1)[..., :k]
    trace = RoutingTrace(ids, e, model=model)
    for seed in (0, 5):
        whole = metrics.evaluate(placement, topology, model, trace, dispatch=rule, seed=seed,
                                 execution="context-coherent")
        streamed = metrics.evaluate(placement, topology, model, _stream(trace, 1000), dispatch=rule, seed=seed,
                                    execution="context-coherent")
        assert json.dumps(streamed, sort_keys=True) == json.dumps(whole, sort_keys=True)
        assert whole["data"]["tokens"] == t and whole["cc_state_moves_per_token_layer"] is not None
    with pytest.raises(InvalidInputError, match="streamed 2,000 tokens, 3,000 expected"):
        short = _stream(trace.select_tokens(np.arange(2000)), 1000)
        metrics.evaluate(placement, topology, model, metrics.TraceStream(short.chunks, t, num_layers, e, k, True),
                         dispatch=rule)
