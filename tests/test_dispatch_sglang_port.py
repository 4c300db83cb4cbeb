"""``sglang-static`` against a line-by-line port of SGLang 0.5.23's table construction.

The port below keeps the loop structure of ``python/sglang/srt/eplb/expert_location.py``
(``_compute_logical_to_all_physical_map`` with the per-rank collapse an a2a backend turns on,
``compute_logical_to_rank_dispatch_physical_map``, ``_find_nearest_expert``, ``_fair_choices``)
in plain Python, one EP rank at a time, so it runs without the released package. The released
code itself is run in ``tests/stacks/`` (its own environment); this test pins placer's
vectorised, stream-sharing version to the literal loop on many random shapes.
"""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from placer.metrics.dispatch import dispatch_table, sglang_static_table
from placer.types import ModelSpec, Placement, Topology


def _find_nearest_expert(cands, spg, rank, gpn, node_slots):
    if len(cands) == 1:
        return cands[0]
    same_gpu = [p for p in cands if p // spg == rank]
    if same_gpu:
        return same_gpu[0]
    if gpn is not None:
        same_node = [p for p in cands if p // node_slots == rank // gpn]
        if 0 < len(same_node) < len(cands):
            return same_node[0]
    return -1


def _fair_choices(arr, k, r):
    quotient, remainder = divmod(k, len(arr))
    ans = arr * quotient + r.sample(arr, k=remainder)
    r.shuffle(ans)
    return ans


def port_rank_table(p2l, num_experts, ep_size, nnodes, ep_rank, seed=42):
    num_layers, num_physical = len(p2l), len(p2l[0])
    spg = num_physical // ep_size
    gpn = ep_size // nnodes
    node_slots = spg * gpn
    # _compute_logical_to_all_physical_map, collapsed for this rank (a2a backend != "none")
    l2a = [[[] for _ in range(num_experts)] for _ in range(num_layers)]
    for layer in range(num_layers):
        for p in range(num_physical):
            l2a[layer][p2l[layer][p]].append(p)
    for layer in range(num_layers):
        for e in range(num_experts):
            nearest = _find_nearest_expert(l2a[layer][e], spg, ep_rank, gpn, node_slots)
            if nearest != -1:
                l2a[layer][e] = [nearest]
    # compute_logical_to_rank_dispatch_physical_map
    r = random.Random(seed)
    result = [[[-1] * num_experts for _ in range(num_layers)] for _ in range(ep_size)]
    for layer in range(num_layers):
        for e in range(num_experts):
            cands = l2a[layer][e]
            remaining = []
            for m in range(ep_size):
                val = _find_nearest_expert(cands, spg, m, gpn, node_slots)
                result[m][layer][e] = val
                if val == -1:
                    remaining.append(m)
            if remaining:
                for m, choice in zip(remaining, _fair_choices(cands, len(remaining), r), strict=True):
                    result[m][layer][e] = choice
    return result[ep_rank]


@st.composite
def shapes(draw):
    nodes = draw(st.integers(1, 3))
    gpn = draw(st.integers(1, 4))
    g = nodes * gpn
    e = draw(st.integers(2, 10))
    spg = -(-e // g) + draw(st.integers(0, 3))
    layers = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = g * spg
    p2l = np.stack([rng.permutation(np.concatenate([np.arange(e), rng.integers(0, e, p - e)]))
                    for _ in range(layers)])
    return p2l, e, g, nodes


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_sglang_static_equals_the_literal_port(case):
    p2l, e, g, nodes = case
    table = sglang_static_table(p2l, g, nodes, 42, e)
    for rank in range(g):
        assert table[:, rank, :].tolist() == port_rank_table(p2l.tolist(), e, g, nodes, rank)


def test_dense_rows_feed_the_stream():
    """The random stream runs through the dense layers' trivial rows, so they change the MoE rows."""
    rng = np.random.default_rng(3)
    e, g, spg = 8, 4, 4  # 16 slots: 8 redundant; dense rows hold experts 0-7 twice
    moe = np.stack([rng.permutation(np.concatenate([np.arange(e), rng.integers(0, e, 8)])) for _ in range(3)])
    model = ModelSpec(name="m", num_hidden_layers=5, moe_layer_ids=(2, 3, 4), num_experts=e, top_k=2,
                      hidden_size=16, expert_ffn_size=16)
    placement, topology = Placement(moe, spg, e), Topology("t", 1, g)
    full = np.tile(np.arange(16) % e, (5, 1))
    full[2:] = moe
    with_dense = dispatch_table(placement, topology, "sglang-static", model=model)
    for rank in range(g):
        assert with_dense[:, rank, :].tolist() == port_rank_table(full.tolist(), e, g, 1, rank)[2:]
    without = dispatch_table(placement, topology, "sglang-static")
    assert not np.array_equal(with_dense, without)
