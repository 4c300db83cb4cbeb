"""Tests of the live re-placement planner (placer.runtime.plan).

Layouts are drawn one line per layer: ``|`` separates GPUs, ``||`` separates nodes, numbers are
logical experts in slot order.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from placer.errors import InvalidInputError
from placer.io.placements import read_placement_json, write_placement_json
from placer.runtime import apply_plan, plan_files, plan_migration
from placer.types import ModelSpec, Placement, Topology
from placer.validate import check_placement


def layout(text: str, num_experts: int | None = None) -> tuple[Placement, Topology]:
    """A placement and cluster from an ASCII drawing (one line per layer)."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    nodes = [[gpu.split() for gpu in node.split("|")] for node in lines[0].split("||")]
    gpn, spg = len(nodes[0]), len(nodes[0][0])
    rows = [[int(x) for x in ln.replace("|", " ").split()] for ln in lines]
    p2l = np.array(rows)
    e = int(p2l.max()) + 1 if num_experts is None else num_experts
    return Placement(p2l, spg, e), Topology("drawn", len(nodes), gpn)


def independent_replay(old: Placement, plan) -> np.ndarray:
    """The layout after all transfers, then all local copies, layer by layer. Shape [L, P]."""
    state = old.physical_to_logical.copy()
    t, c = plan.transfers, plan.local_copies
    state[t.layer, t.slot] = t.expert
    for k in range(len(c)):
        assert state[c.layer[k], c.src_slot[k]] == c.expert[k]
        state[c.layer[k], c.slot[k]] = c.expert[k]
    return state


def check_invariants(old: Placement, new: Placement, topo: Topology, plan) -> None:
    spg, gpn = old.slots_per_gpu, topo.gpus_per_node
    t = plan.transfers
    # The relabelled placement is valid, is what applying the plan yields, and means the same.
    check_placement(plan.new, topology=topo)
    np.testing.assert_array_equal(independent_replay(old, plan), plan.new.physical_to_logical)
    np.testing.assert_array_equal(apply_plan(old, plan).physical_to_logical, plan.new.physical_to_logical)
    assert sorted(plan.gpu_relabel.tolist()) == list(range(old.num_gpus))
    np.testing.assert_array_equal(plan.gpu_relabel // gpn, plan.node_relabel[np.arange(old.num_gpus) // gpn])
    req = new.physical_to_logical
    np.testing.assert_array_equal(np.take_along_axis(plan.new.physical_to_logical, plan.slot_map, 1), req)
    np.testing.assert_array_equal(plan.slot_map // spg, np.broadcast_to(
        plan.gpu_relabel[np.arange(old.num_slots) // spg], req.shape))
    np.testing.assert_array_equal(plan.kept, plan.new.physical_to_logical == old.physical_to_logical)
    # Sources hold the expert before their layer commits; transfers cross GPUs.
    assert np.all(old.physical_to_logical[t.layer, t.src_slot] == t.expert)
    assert np.all(t.src_slot // spg == t.src_gpu) and np.all(t.slot // spg == t.dst_gpu)
    assert np.all(t.src_gpu != t.dst_gpu) and np.all(t.round <= plan.commit_round[t.layer])
    # One peer per rank per round; staged bytes within the headroom at every round.
    for r in range(plan.num_rounds):
        now = t.round == r
        pairs = {(int(a), int(b)) for a, b in zip(t.src_gpu[now], t.dst_gpu[now], strict=True)}
        peers: dict[int, set[int]] = {}
        for a, b in pairs:
            peers.setdefault(a, set()).add(b)
            peers.setdefault(b, set()).add(a)
        assert all(len(v) == 1 for v in peers.values()), (r, peers)
        staged = (t.round <= r) & (plan.commit_round[t.layer] >= r)
        per_rank = np.bincount(t.dst_gpu[staged], weights=t.bytes[staged], minlength=old.num_gpus)
        assert per_rank.max(initial=0) <= plan.staging_bytes + 1e-9
    assert plan.bytes_moved <= plan.naive_bytes
    # Each (layer, GPU, expert) is received at most once; duplicates are local copies.
    keys = np.stack([t.layer, t.dst_gpu, t.expert], axis=1)
    assert len(np.unique(keys, axis=0)) == len(t)


CASES = [
    pytest.param("0 1 | 2 3 || 4 5 | 6 7", "0 1 | 2 3 || 4 5 | 6 7", 0, 0, 0, id="identity"),
    pytest.param("0 1 | 2 3 || 4 5 | 6 7", "4 5 | 6 7 || 0 1 | 2 3", 0, 0, 0, id="nodes-swapped"),
    pytest.param("0 1 | 2 3 || 4 5 | 6 7", "2 3 | 0 1 || 6 7 | 4 5", 0, 0, 0, id="gpus-swapped-in-nodes"),
    pytest.param("0 1 | 2 3 || 4 5 | 6 7", "1 0 | 3 2 || 5 4 | 7 6", 0, 0, 0, id="slots-reordered"),
    # GPUs 1 and 2 trade contents across nodes: no node-structure-preserving relabel undoes it.
    pytest.param("0 1 | 2 3 || 4 5 | 6 7", "0 1 | 4 5 || 2 3 | 6 7", 4, 0, 1, id="cross-node-swap"),
    # GPU 0 needs expert 0 twice: one slot kept, one local copy, nothing on the wire.
    pytest.param("0 1 | 2 3 || 4 5 | 0 6", "0 0 | 2 3 || 4 5 | 1 6", 1, 1, 1, id="duplicate-is-local-copy"),
    # GPU 3 drops its replica of expert 0 for a second copy of expert 6: a local copy.
    pytest.param("0 1 | 2 3 || 4 5 | 6 0", "0 1 | 2 3 || 4 5 | 6 6", 0, 1, 0, id="replica-becomes-local-copy"),
    # GPU 3 needs expert 4 twice and has none: received once, copied once; GPU 1 receives 9.
    pytest.param("0 1 2 | 3 4 10 || 5 6 7 | 8 9 10", "0 1 2 | 3 9 10 || 5 6 7 | 8 4 4", 2, 1, 1,
                 id="receive-once-copy-once"),
    # Layer 0 would prefer the node swap, layers 1 and 2 the identity: one relabel for all.
    pytest.param("""0 1 | 2 3 || 4 5 | 6 7
                    0 1 | 2 3 || 4 5 | 6 7
                    0 1 | 2 3 || 4 5 | 6 7""",
                 """4 5 | 6 7 || 0 1 | 2 3
                    0 1 | 2 3 || 4 5 | 6 7
                    0 1 | 2 3 || 4 5 | 6 7""", 8, 0, 1, id="one-relabel-for-all-layers"),
]


@pytest.mark.parametrize("old_text, new_text, moved, copies, rounds", CASES)
def test_drawn_layouts(old_text, new_text, moved, copies, rounds):
    old, topo = layout(old_text)
    new, _ = layout(new_text, old.num_experts)
    plan = plan_migration(old, new, topo, expert_bytes=10.0)
    check_invariants(old, new, topo, plan)
    assert plan.bytes_moved == moved * 10.0
    assert len(plan.local_copies) == copies
    assert plan.num_rounds == rounds
    assert plan.naive_bytes == np.count_nonzero(old.physical_to_logical != new.physical_to_logical) * 10.0


def test_same_node_source_preferred():
    # Expert 0 lives on GPU 1 (node 0) and GPU 2 (node 1); GPU 0 needs it instead of expert 1.
    old, topo = layout("1 2 | 0 3 || 0 4 | 5 6")
    new, _ = layout("0 2 | 0 3 || 1 4 | 5 6", old.num_experts)
    plan = plan_migration(old, new, topo, expert_bytes=1.0)
    check_invariants(old, new, topo, plan)
    t = plan.transfers
    to_gpu0 = t.dst_gpu == plan.gpu_relabel[0]
    assert t.src_gpu[to_gpu0].tolist() == [plan.gpu_relabel[1]]  # same node, not GPU 2
    assert plan.bytes_inter_node == 1.0  # expert 1 must cross to node 1 (only holder: GPU 0)


def test_one_peer_per_round_star():
    # GPU 0 is the only holder of experts 0, 1, 2; each other GPU needs one: three rounds.
    old, topo = layout("0 1 2 3 | 4 5 6 3 | 7 8 9 3 | 10 11 12 3")
    new, _ = layout("0 1 2 3 | 4 5 6 0 | 7 8 9 1 | 10 11 12 2")
    plan = plan_migration(old, new, topo, expert_bytes=1.0)
    check_invariants(old, new, topo, plan)
    assert len(plan.transfers) == 3 and plan.num_rounds == 3
    assert sorted(plan.transfers.round.tolist()) == [0, 1, 2]


def test_staging_headroom_splits_layers_and_orders_commits():
    old, topo = layout("""0 1 | 2 3
                          0 1 | 2 3""")
    new, _ = layout("""0 2 | 1 3
                       0 1 | 2 3""", 4)
    new2, _ = layout("""0 2 | 1 3
                        0 2 | 1 3""", 4)
    # Two layers, each needing one expert per GPU; headroom of one expert: one layer at a time.
    plan = plan_migration(old, new2, topo, expert_bytes=5.0, staging_bytes=5.0)
    check_invariants(old, new2, topo, plan)
    assert plan.commit_round.tolist() == [0, 1]
    assert plan.transfers.round[plan.transfers.layer == 1].min() > plan.commit_round[0]
    # Headroom of two experts: both layers staged together, both exchanged in one round.
    both = plan_migration(old, new2, topo, expert_bytes=5.0, staging_bytes=10.0)
    check_invariants(old, new2, topo, both)
    assert both.num_rounds == 1 and both.commit_round.tolist() == [0, 0]
    # A layer with nothing to receive commits before any round.
    one = plan_migration(old, new, topo, expert_bytes=5.0, staging_bytes=5.0)
    assert one.commit_round.tolist() == [0, -1]


def test_staging_too_small_names_layer_rank_and_experts():
    old, topo = layout("0 1 | 2 3")
    new, _ = layout("2 3 | 0 1 ", 4)
    cross, _ = layout("0 1 | 2 3 || 4 5 | 6 7")
    with pytest.raises(InvalidInputError, match=r"layer 0: rank \d must receive 2 experts \(4, 5 from ranks"):
        plan_migration(cross, layout("0 1 | 4 5 || 2 3 | 6 7")[0], Topology("t", 2, 2),
                       expert_bytes=1.0, staging_bytes=1.0)
    # Swapping GPUs needs no staging at all: the relabel undoes it.
    assert plan_migration(old, new, topo, expert_bytes=1.0, staging_bytes=0.0).bytes_moved == 0


def test_chunked_rounds():
    old, topo = layout("0 1 2 | 3 4 5 || 6 7 8 | 9 10 11")
    new, _ = layout("0 1 2 | 6 7 8 || 3 4 5 | 9 10 11")
    plan = plan_migration(old, new, topo, expert_bytes=1.0, max_experts_per_round=1)
    check_invariants(old, new, topo, plan)
    assert plan.num_rounds == 6  # 3 experts each way between two ranks, one per round
    assert plan_migration(old, new, topo, expert_bytes=1.0).num_rounds == 1


def test_bad_inputs_are_named():
    old, topo = layout("0 1 | 2 3")
    with pytest.raises(InvalidInputError, match="shape"):
        plan_migration(old, layout("0 1 | 2 3\n0 1 | 2 3")[0], topo, expert_bytes=1.0)
    with pytest.raises(InvalidInputError, match="4 experts, new has 2 and 3"):
        plan_migration(old, Placement([[0, 1, 2, 0]], 2, 3), topo, expert_bytes=1.0)
    with pytest.raises(InvalidInputError, match="2 slots per GPU"):
        plan_migration(old, Placement([[0, 1, 2, 3]], 1, 4), topo, expert_bytes=1.0)
    with pytest.raises(InvalidInputError, match="cluster has 4"):
        plan_migration(old, old, Topology("t", 2, 2), expert_bytes=1.0)
    with pytest.raises(InvalidInputError, match="expert_bytes"):
        plan_migration(old, old, topo, expert_bytes=0.0)
    with pytest.raises(InvalidInputError, match="max_experts_per_round"):
        plan_migration(old, old, topo, expert_bytes=1.0, max_experts_per_round=0)


def test_apply_plan_rejects_a_plan_for_another_layout():
    old, topo = layout("0 1 | 2 3 || 4 5 | 6 7")
    new, _ = layout("0 1 | 4 5 || 2 3 | 6 7")
    plan = plan_migration(old, new, topo, expert_bytes=1.0)
    other, _ = layout("0 1 | 6 7 || 4 5 | 2 3")
    with pytest.raises(InvalidInputError, match=r"layer 0: round \d: expert \d from rank \d to rank \d: "
                                                r"the source slot holds expert"):
        apply_plan(other, plan)


def test_deterministic():
    rng = np.random.default_rng(7)
    old, new = (random_placement(rng, 3, 12, 4, 3) for _ in range(2))
    topo = Topology("t", 2, 2)
    a, b = (plan_migration(old, new, topo, expert_bytes=1.0) for _ in range(2))
    for name in ("gpu_relabel", "slot_map", "commit_round"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for f in ("layer", "slot", "src_gpu", "src_slot", "round"):
        np.testing.assert_array_equal(getattr(a.transfers, f), getattr(b.transfers, f))


def test_files_round_trip(tmp_path):
    model = ModelSpec(name="tiny", num_hidden_layers=2, moe_layer_ids=(0, 1), num_experts=8, top_k=2,
                      hidden_size=16, expert_ffn_size=32, weight_bytes=1.0)
    old, topo = layout("0 1 | 2 3 || 4 5 | 6 7\n0 1 | 2 3 || 4 5 | 6 7")
    new, _ = layout("4 5 | 6 7 || 0 1 | 3 2\n4 5 | 6 7 || 0 1 | 2 3")
    meta = dict(model=model, topology=topo, dispatch="nearest", status="feasible", solve_seconds=0.5)
    write_placement_json(tmp_path / "old.json", old, method="eplb", **meta)
    write_placement_json(tmp_path / "new.json", new, method="eplb", metrics={"x": 1.0}, **meta)
    plan = plan_files(tmp_path / "old.json", tmp_path / "new.json", tmp_path / "run.json")
    assert plan.bytes_moved == 0 and plan.expert_bytes == model.expert_weight_bytes
    back = read_placement_json(tmp_path / "run.json")
    np.testing.assert_array_equal(back.placement.physical_to_logical, old.physical_to_logical)
    assert back.metrics == {"x": 1.0} and back.method == "eplb"
    other = ModelSpec.from_shape(2, 8, 2, name="other")
    write_placement_json(tmp_path / "other.json", new, **{**meta, "model": other}, method="eplb")
    with pytest.raises(InvalidInputError, match="different models"):
        plan_files(tmp_path / "old.json", tmp_path / "other.json")


def test_runtime_package_imports_neither_torch_nor_ray():
    code = "import sys, placer.runtime; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------------------------
# Invariants on random placements
# --------------------------------------------------------------------------------------------


def random_placement(rng: np.random.Generator, layers: int, slots: int, experts: int,
                     spg: int) -> Placement:
    rows = [rng.permutation(np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)]))
            for _ in range(layers)]
    return Placement(np.array(rows), spg, experts)


def shuffled(rng: np.random.Generator, p: Placement, nodes: int, gpn: int, changes: int) -> Placement:
    """``p`` with nodes, GPUs in nodes and slots in GPUs permuted, then a few slots swapped."""
    spg = p.slots_per_gpu
    node = rng.permutation(nodes)
    gpu = np.concatenate([node[a] * gpn + rng.permutation(gpn) for a in range(nodes)])
    slot = (gpu[:, None] * spg + rng.permutation(spg)).ravel()
    p2l = p.physical_to_logical[:, slot].copy()
    for _ in range(changes):
        layer, a, b = rng.integers(p.num_layers), rng.integers(p.num_slots), rng.integers(p.num_slots)
        p2l[layer, [a, b]] = p2l[layer, [b, a]]
    return Placement(p2l, spg, p.num_experts)


def brute_force_bytes(old: Placement, new: Placement, nodes: int, gpn: int) -> int:
    """Fewest transfers over every node-structure-preserving relabel (tiny clusters only)."""
    old_sets = [[set(g) for g in layer] for layer in old.gpu_experts().tolist()]
    new_sets = [[set(g) for g in layer] for layer in new.gpu_experts().tolist()]
    best = None
    for node in itertools.permutations(range(nodes)):
        for inner in itertools.product(itertools.permutations(range(gpn)), repeat=nodes):
            gpu = [node[j // gpn] * gpn + inner[j // gpn][j % gpn] for j in range(nodes * gpn)]
            cost = sum(len(ns[j] - os_[gpu[j]]) for os_, ns in zip(old_sets, new_sets, strict=True)
                       for j in range(nodes * gpn))
            best = cost if best is None else min(best, cost)
    return best


@st.composite
def cases(draw):
    nodes, gpn, spg = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    layers = draw(st.integers(1, 3))
    slots = nodes * gpn * spg
    experts = draw(st.integers(1, slots))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    old = random_placement(rng, layers, slots, experts, spg)
    if draw(st.booleans()):
        new = random_placement(rng, layers, slots, experts, spg)
    else:
        new = shuffled(rng, old, nodes, gpn, draw(st.integers(0, 2)))
    staging = draw(st.sampled_from([None, float(spg), float(layers * spg)]))
    chunk = draw(st.sampled_from([None, 1, 2]))
    return old, new, Topology("t", nodes, gpn), staging, chunk


@given(cases())
def test_invariants_on_random_placements(case):
    old, new, topo, staging, chunk = case
    plan = plan_migration(old, new, topo, expert_bytes=1.0, staging_bytes=staging,
                          max_experts_per_round=chunk)
    check_invariants(old, new, topo, plan)
    assert plan.bytes_moved == brute_force_bytes(old, new, topo.num_nodes, topo.gpus_per_node)
