"""The replica dispatch rule (placer.metrics.dispatch): properties on random placements."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placer.errors import InvalidInputError
from placer.metrics.dispatch import default_home_ranks, dispatch_table, select_slots, slot_load
from placer.types import Placement, Topology


@st.composite
def placements(draw):
    """(placement, topology, seed): 1-2 nodes x 1-4 GPUs, 2-8 experts, random redundant slots."""
    nodes = draw(st.integers(1, 2))
    gpn = draw(st.integers(1, 4))
    g = nodes * gpn
    e = draw(st.integers(2, 8))
    spg = -(-e // g) + draw(st.integers(0, 3))
    num_layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = g * spg
    p2l = np.stack([rng.permutation(np.concatenate([np.arange(e), rng.integers(0, e, p - e)]))
                    for _ in range(num_layers)])
    return Placement(p2l, spg, e), Topology("t", nodes, gpn), draw(st.integers(0, 100))


def _slots_of(placement: Placement, layer: int, expert: int) -> np.ndarray:
    return np.flatnonzero(placement.physical_to_logical[layer] == expert)


@settings(max_examples=40, deadline=None)
@given(placements(), st.sampled_from(["nearest", "sglang-static"]))
def test_table_maps_to_holder_and_prefers_own_gpu_then_node(case, rule):
    placement, topology, seed = case
    table = dispatch_table(placement, topology, rule, seed)
    num_layers, num_gpus, num_experts = table.shape
    assert (num_layers, num_gpus, num_experts) == (placement.num_layers, placement.num_gpus,
                                                    placement.num_experts)
    spg, gpn = placement.slots_per_gpu, topology.gpus_per_node
    p2l = placement.physical_to_logical
    for layer in range(num_layers):
        for g in range(num_gpus):
            for e in range(num_experts):
                slot = table[layer, g, e]
                assert p2l[layer, slot] == e  # every (rank, expert) maps to a holder
                slots = _slots_of(placement, layer, e)
                own = slots[slots // spg == g]
                if len(own):  # same-GPU replica always chosen, the lowest local slot
                    assert slot == own.min()
                elif rule == "nearest" and np.any(slots // spg // gpn == g // gpn):
                    assert slot // spg // gpn == g // gpn
                elif rule == "sglang-static":
                    local = slots[slots // spg // gpn == g // gpn]
                    if 0 < len(local) < len(slots):  # SGLang narrows to the first same-node slot
                        assert slot == local.min()


def _within_one(counts: list[int]) -> bool:
    return max(counts) - min(counts) <= 1


def test_fair_spread_inside_one_72_gpu_nvlink_domain():
    """One node of 72 GPUs (NVL72; the table groups a node's GPUs without one bit each): every
    rank without a local copy uses a replica in its node, spread within one of even."""
    rng = np.random.default_rng(0)
    rows = np.concatenate([np.arange(100), rng.integers(0, 100, 44)])
    rng.shuffle(rows)
    placement = Placement(rows[None, :], 2, 100)
    table = dispatch_table(placement, Topology(name="nvl72", num_nodes=1, gpus_per_node=72), "nearest", 42)
    for e in range(100):
        slots = _slots_of(placement, 0, e)
        holders = set((slots // 2).tolist())
        chosen = [int(table[0, g, e]) for g in range(72) if g not in holders]
        assert set(chosen) <= set(slots.tolist())
        if len(slots) > 1:
            assert _within_one([chosen.count(int(c)) for c in slots])


@settings(max_examples=40, deadline=None)
@given(placements())
def test_fair_spread_over_remote_replicas(case):
    """``nearest`` (coordinated): among ranks with no replica on their own GPU, each candidate
    replica gets a number of ranks within 1 of the others, per node group."""
    placement, topology, seed = case
    rule = "nearest"
    table = dispatch_table(placement, topology, rule, seed)
    spg, gpn = placement.slots_per_gpu, topology.gpus_per_node
    num_gpus = placement.num_gpus
    for layer in range(placement.num_layers):
        for e in range(placement.num_experts):
            slots = _slots_of(placement, layer, e)
            if len(slots) == 1:
                continue
            needers = [g for g in range(num_gpus) if not np.any(slots // spg == g)]
            groups: list[tuple[list[int], np.ndarray]] = []
            far = []
            for node in range(topology.num_nodes):
                local = slots[slots // spg // gpn == node]
                members = [g for g in needers if g // gpn == node]
                if len(local):
                    groups.append((members, local))
                else:
                    far += members
            groups.append((far, slots))
            for members, candidates in groups:
                if not members:
                    continue
                chosen = [int(table[layer, g, e]) for g in members]
                assert set(chosen) <= set(candidates.tolist())
                assert _within_one([chosen.count(int(c)) for c in candidates])


@settings(max_examples=40, deadline=None)
@given(placements(), st.data())
def test_select_slots_follows_the_rule(case, data):
    placement, topology, seed = case
    t = data.draw(st.integers(1, 30))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    e, num_layers, g = placement.num_experts, placement.num_layers, placement.num_gpus
    k = data.draw(st.integers(1, min(3, e)))
    ids = np.argsort(rng.random((t, num_layers, e)), axis=-1)[..., :k]
    index = rng.integers(0, 1000, t)
    home = rng.integers(0, g, t)
    # sglang-dynamic: the (row % count)-th replica in ascending slot order; vllm: the
    # (Knuth hash of the row % count)-th.
    for rule, rep in (("sglang-dynamic", lambda i, c: i % c),
                      ("vllm", lambda i, c: ((i * 2654435769) & 0xFFFFFFFF) % c)):
        got = select_slots(placement, topology, ids, token_index=index, rule=rule)
        default = select_slots(placement, topology, ids, rule=rule)
        for i in range(t):
            for layer in range(num_layers):
                for j in range(k):
                    slots = _slots_of(placement, layer, ids[i, layer, j])
                    assert got[i, layer, j] == slots[rep(int(index[i]), len(slots))]
                    assert default[i, layer, j] == slots[rep(i, len(slots))]
    for rule in ("nearest", "sglang-static"):
        table = dispatch_table(placement, topology, rule, seed)
        with_home = select_slots(placement, topology, ids, home_rank=home, rule=rule, seed=seed)
        round_robin = select_slots(placement, topology, ids, token_index=index, rule=rule, seed=seed,
                                   table=table)
        for i in range(t):
            for layer in range(num_layers):
                for j in range(k):
                    assert with_home[i, layer, j] == table[layer, home[i], ids[i, layer, j]]
                    assert round_robin[i, layer, j] == table[layer, index[i] % g, ids[i, layer, j]]


@settings(max_examples=40, deadline=None)
@given(placements(), st.sampled_from(["nearest", "sglang-static", "sglang-dynamic", "vllm"]))
def test_slot_load_is_the_mean_over_ranks(case, rule):
    placement, topology, seed = case
    rng = np.random.default_rng(seed)
    load = rng.integers(0, 50, (placement.num_layers, placement.num_experts))
    out = slot_load(load, placement, topology, rule, seed)
    assert out.shape == (placement.num_layers, placement.num_slots)
    np.testing.assert_allclose(out.sum(axis=1), load.sum(axis=1))
    ref = np.zeros_like(out)
    p2l = placement.physical_to_logical
    if rule in ("sglang-dynamic", "vllm"):
        cnt = placement.logcnt()
        for layer in range(placement.num_layers):
            for p in range(placement.num_slots):
                ref[layer, p] = load[layer, p2l[layer, p]] / cnt[layer, p2l[layer, p]]
    else:
        table = dispatch_table(placement, topology, rule, seed)
        for layer in range(placement.num_layers):
            for g in range(placement.num_gpus):
                for e in range(placement.num_experts):
                    ref[layer, table[layer, g, e]] += load[layer, e] / placement.num_gpus
    np.testing.assert_allclose(out, ref)


@settings(max_examples=20, deadline=None)
@given(placements(), st.sampled_from(["nearest", "sglang-static"]))
def test_seeded_determinism(case, rule):
    placement, topology, seed = case
    a = dispatch_table(placement, topology, rule, seed)
    b = dispatch_table(placement, topology, rule, seed)
    np.testing.assert_array_equal(a, b)


def test_seed_changes_the_spread():
    # Expert 0 on GPUs 0 and 1 of a 4-GPU node; GPUs 2 and 3 each get one of the two, in a
    # seed-dependent order.
    placement = Placement([[0, 1, 0, 2, 3, 4, 5, 6]], 2, 7)
    topology = Topology("t", 1, 4)
    columns = {tuple(dispatch_table(placement, topology, "nearest", s)[0, 2:, 0]) for s in range(20)}
    assert columns == {(0, 2), (2, 0)}


def test_nearest_vs_sglang_static_hand_case():
    # 2 nodes x 2 GPUs, 2 slots each. Expert 0 on GPU 0 and GPU 2: GPU 1 (node 0) uses GPU 0's
    # copy and GPU 3 (node 1) uses GPU 2's under both rules (one copy per node: SGLang narrows).
    placement = Placement([[0, 1, 2, 3, 0, 4, 5, 6]], 2, 7)
    topology = Topology("t", 2, 2)
    assert dispatch_table(placement, topology, "nearest")[0, :, 0].tolist() == [0, 0, 4, 4]
    assert dispatch_table(placement, topology, "sglang-static")[0, :, 0].tolist() == [0, 0, 4, 4]
    # Both copies on node 0 (GPUs 0 and 1): node 1 draws over both; GPU 1 keeps its own.
    placement = Placement([[0, 1, 0, 2, 3, 4, 5, 6]], 2, 7)
    static = dispatch_table(placement, topology, "sglang-static")
    assert static[0, :2, 0].tolist() == [0, 2] and set(static[0, 2:, 0].tolist()) <= {0, 2}


def test_default_home_ranks_and_errors():
    np.testing.assert_array_equal(default_home_ranks(np.arange(7), 3), [0, 1, 2, 0, 1, 2, 0])
    placement = Placement([[0, 1, 2, 3]], 2, 4)
    with pytest.raises(InvalidInputError, match="position"):
        dispatch_table(placement, Topology("t", 1, 2), "vllm")
    with pytest.raises(InvalidInputError, match="GPUs"):
        dispatch_table(placement, Topology("t", 1, 4))
    with pytest.raises(InvalidInputError, match="unknown dispatch rule"):
        select_slots(placement, Topology("t", 1, 2), np.zeros((1, 1, 1), int), rule="random")
    with pytest.raises(InvalidInputError, match="layers"):
        select_slots(placement, Topology("t", 1, 2), np.zeros((1, 2, 1), int))
