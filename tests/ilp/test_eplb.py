"""DeepSeek EPLB (``placer.ilp.eplb``): README golden, equality with a torch port, invariants."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from placer.errors import InvalidInputError
from placer.ilp import METHODS, PlacementProblem, solve
from placer.ilp.eplb import balanced_packing, gpu_load_ratio, rebalance_experts, replicate_experts
from placer.presets import get_model, make_topology
from placer.stats import load_only_stats
from placer.types import ModelSpec, Placement
from placer.validate import check_placement

PORT_PATH = Path(__file__).resolve().parent / "eplb_port.py"

# README of deepseek-ai/EPLB @ d52c72d5, "Interface and Example" (hierarchical policy).
README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
README_LOGCNT = [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                 [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]

# (layers, experts, replicas, groups, nodes, gpus); the policy follows groups % nodes.
SHAPES = [
    (58, 256, 320, 8, 8, 64),   # DeepSeek-V3, hierarchical, 1 group per node
    (58, 256, 288, 8, 4, 32),   # DeepSeek-V3, hierarchical, 2 groups per node
    (58, 256, 320, 8, 16, 64),  # DeepSeek-V3 on 16 nodes of 4: global policy
    (6, 64, 80, 4, 2, 16),      # hierarchical
    (5, 64, 96, 1, 2, 16),      # global (1 group, 2 nodes)
    (4, 60, 72, 6, 4, 12),      # global (6 % 4 != 0)
    (3, 16, 16, 4, 2, 4),       # no redundancy
]


@pytest.fixture(scope="module")
def port():
    torch = pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("eplb_torch_port", PORT_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return torch, module


def _weights(layers, experts, seed):
    """Continuous float32 loads: no two equal values in a row (tie-free)."""
    rng = np.random.default_rng(seed)
    return (rng.lognormal(0.0, 1.0, (layers, experts)) * 1000).astype(np.float32)


def _check_invariants(weight, phy2log, log2phy, logcnt, num_replicas, num_gpus):
    layers, experts = weight.shape
    assert phy2log.shape == (layers, num_replicas) and phy2log.dtype == np.int64
    assert log2phy.shape == (layers, experts, num_replicas - experts + 1)
    assert logcnt.shape == (layers, experts) and logcnt.dtype == np.int64
    assert (logcnt >= 1).all()
    assert (logcnt.sum(axis=1) == num_replicas).all()
    # logcnt is the replica count of phy2log
    counts = np.stack([np.bincount(row, minlength=experts) for row in phy2log])
    np.testing.assert_array_equal(counts, logcnt)
    # log2phy: ranks 0..cnt-1 filled with distinct slots holding that expert, -1 beyond
    rank = np.arange(log2phy.shape[2])
    filled = rank[None, None, :] < logcnt[:, :, None]
    assert (log2phy[~filled] == -1).all()
    layer_idx = np.broadcast_to(np.arange(layers)[:, None, None], log2phy.shape)
    expert_idx = np.broadcast_to(np.arange(experts)[None, :, None], log2phy.shape)
    np.testing.assert_array_equal(phy2log[layer_idx[filled], log2phy[filled]], expert_idx[filled])
    for row in log2phy.reshape(layers, -1):
        slots = row[row >= 0]
        assert np.array_equal(np.sort(slots), np.arange(num_replicas))
    # every GPU holds exactly P / G slots under the Placement convention
    placement = Placement(phy2log, num_replicas // num_gpus, experts)
    assert placement.num_gpus == num_gpus
    np.testing.assert_array_equal(placement.logcnt(), logcnt)


def test_readme_golden():
    phy2log, log2phy, logcnt = rebalance_experts(np.array(README_WEIGHT), 16, 4, 2, 8)
    np.testing.assert_array_equal(phy2log, README_PHY2LOG)
    np.testing.assert_array_equal(logcnt, README_LOGCNT)
    _check_invariants(np.array(README_WEIGHT, np.float32), phy2log, log2phy, logcnt, 16, 8)
    # anchor sheet: GPU max/mean load 1.208 (layer 0) and 1.242 (layer 1)
    np.testing.assert_allclose(gpu_load_ratio(np.array(README_WEIGHT), phy2log, 8),
                               [1.208, 1.242], atol=5e-4)


def test_readme_golden_matches_port(port):
    torch, mod = port
    ref = mod.rebalance_experts(torch.tensor(README_WEIGHT), 16, 4, 2, 8)
    ours = rebalance_experts(np.array(README_WEIGHT), 16, 4, 2, 8)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_torch_port(port, shape, monkeypatch):
    torch, mod = port
    layers, experts, replicas, groups, nodes, gpus = shape
    weight = _weights(layers, experts, seed=sum(shape))
    ours = rebalance_experts(weight, replicas, groups, nodes, gpus)
    _check_invariants(weight, *ours, replicas, gpus)

    # The reference as published: its torch.sort is unstable for the equal per-replica loads of
    # one expert's replicas, which only permutes that expert's slots in log2phy.
    ref = [t.numpy() for t in mod.rebalance_experts(torch.from_numpy(weight), replicas, groups,
                                                    nodes, gpus)]
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[2], ref[2])
    np.testing.assert_array_equal(np.sort(ours[1], axis=-1), np.sort(ref[1], axis=-1))

    # With ties sorted lowest index first (our documented rule) everything is identical.
    monkeypatch.setattr(mod, "STABLE_SORT", True)
    ref = mod.rebalance_experts(torch.from_numpy(weight), replicas, groups, nodes, gpus)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(a, b.numpy())


def test_descending_sort_matches_torch_on_tie_free_rows(port):
    torch, _ = port
    w = _weights(64, 300, seed=7)
    ours = np.argsort(-w, axis=1, kind="stable")
    np.testing.assert_array_equal(ours, torch.from_numpy(w).sort(-1, descending=True).indices.numpy())


def test_helpers_match_port(port):
    torch, mod = port
    w = _weights(20, 48, seed=3)
    for ours, ref in zip(replicate_experts(w, 70), mod.replicate_experts(torch.from_numpy(w), 70),
                         strict=True):
        np.testing.assert_array_equal(ours, ref.numpy())
    for packs in (1, 4, 6, 48):
        for ours, ref in zip(balanced_packing(w, packs),
                             mod.balanced_packing(torch.from_numpy(w), packs), strict=True):
            np.testing.assert_array_equal(ours, ref.numpy())


def test_ties_lowest_index_first():
    # all loads equal: items in index order, each into the lowest-index lightest pack
    phy2log, _, logcnt = rebalance_experts(np.ones((2, 8)), 8, 1, 1, 4)
    np.testing.assert_array_equal(phy2log, [[0, 4, 1, 5, 2, 6, 3, 7]] * 2)
    # replication ties go to the lowest expert id
    phy2log, _, logcnt = replicate_experts(np.full((1, 4), 3.0), 6)
    np.testing.assert_array_equal(phy2log, [[0, 1, 2, 3, 0, 1]])
    np.testing.assert_array_equal(logcnt, [[2, 2, 1, 1]])
    # zero loads are fine and deterministic
    a = rebalance_experts(np.zeros((3, 16)), 24, 4, 2, 8)
    b = rebalance_experts(np.zeros((3, 16)), 24, 4, 2, 8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    _check_invariants(np.zeros((3, 16)), *a, 24, 8)


@given(layers=st.integers(1, 3), groups=st.sampled_from([1, 2, 4]), group_size=st.integers(1, 4),
       nodes=st.sampled_from([1, 2, 4]), gpus_per_node=st.integers(1, 3), extra=st.integers(0, 3),
       seed=st.integers(0, 2**16), integer=st.booleans())
def test_invariants_property(layers, groups, group_size, nodes, gpus_per_node, extra, seed, integer):
    experts = groups * group_size
    gpus = nodes * gpus_per_node
    per_gpu = -(-experts // gpus) + extra
    replicas = per_gpu * gpus
    rng = np.random.default_rng(seed)
    weight = rng.integers(0, 5, (layers, experts)) if integer else rng.random((layers, experts))
    out = rebalance_experts(weight, replicas, groups, nodes, gpus)
    _check_invariants(np.asarray(weight, np.float32), *out, replicas, gpus)


@pytest.mark.parametrize("args, match", [
    ((16, 4, 2, 6), "multiple of num_gpus"),
    ((8, 4, 2, 8), "below the 12 experts"),
    ((16, 5, 5, 8), "must divide 12 experts"),
    ((16, 4, 0, 8), "must be positive"),
])
def test_bad_sizes(args, match):
    with pytest.raises(InvalidInputError, match=match):
        rebalance_experts(np.array(README_WEIGHT), *args)


def test_rejects_nan():
    w = np.array(README_WEIGHT, dtype=float)
    w[0, 3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        rebalance_experts(w, 16, 4, 2, 8)


def test_registered_and_valid_readme_problem():
    assert "eplb" in METHODS
    model = ModelSpec(name="readme", num_hidden_layers=2, moe_layer_ids=(0, 1), num_experts=12,
                      top_k=2, num_groups=4)
    topo = make_topology("h100", gpus=8, nodes=2)
    problem = PlacementProblem(load_only_stats(np.array(README_WEIGHT), top_k=2), model, topo,
                               num_redundant=4)
    result = solve(problem, "eplb")
    check_placement(result.placement, model, topo)
    np.testing.assert_array_equal(result.placement.physical_to_logical, README_PHY2LOG)
    assert result.status == "feasible" and result.method == "eplb" and result.backend == "numpy"
    assert result.objective == pytest.approx(np.median([1.2081, 1.2422]), abs=5e-4)


@pytest.mark.parametrize("gpus, nodes, redundant", [(64, 8, 64), (32, 4, 32), (64, 16, 64),
                                                    (16, 2, 0)])
def test_solve_deepseek_v3(gpus, nodes, redundant):
    model = get_model("deepseek-v3")
    load = np.random.default_rng(gpus + nodes).integers(0, 10_000, (model.num_moe_layers, 256))
    topo = make_topology("h100", gpus=gpus, nodes=nodes)
    problem = PlacementProblem(load_only_stats(load, top_k=8), model, topo, num_redundant=redundant)
    result = solve(problem, "eplb")
    check_placement(result.placement, model, topo)
    p2l = result.placement.physical_to_logical
    np.testing.assert_array_equal(p2l, rebalance_experts(load, 256 + redundant, 8, nodes, gpus)[0])
    assert result.objective >= 1.0
    assert result.terms["hierarchical"] == float(8 % nodes == 0)
    if 8 % nodes == 0:  # hierarchical: every node holds whole groups
        slots_per_node = (256 + redundant) // nodes
        group_of_slot = p2l.reshape(model.num_moe_layers, nodes, slots_per_node) // 32
        assert all(len(set(np.unique(g).tolist())) == 8 // nodes
                   for layer in group_of_slot for g in layer)
    # balancing helps: better than the contiguous layout on this skewed-enough load
    contiguous = solve(problem, "contiguous").placement.physical_to_logical
    base = np.median(gpu_load_ratio(load, contiguous, gpus))
    assert result.objective <= base + 1e-12


# (layers, experts, replicas, groups, nodes, gpus) for the export comparison: both policies.
EXPORT_SHAPES = [(6, 64, 80, 4, 2, 16), (5, 64, 96, 1, 2, 16), (4, 32, 48, 8, 2, 8)]


@pytest.mark.parametrize("shape", EXPORT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_export_arrays_equal_eplb_py(port, shape, monkeypatch, tmp_path):
    """solve --method eplb, through the native file, exported as EPLB arrays: all three arrays equal
    eplb.py's (the loop-structure port) on tie-free loads, log2phy in replica-rank order."""
    from placer.io.placements import (
        export_placement,
        import_placement,
        read_placement_json,
        write_placement_json,
    )

    torch, mod = port
    monkeypatch.setattr(mod, "STABLE_SORT", True)  # replicas of one expert tie; see test_equals_torch_port
    layers, experts, replicas, groups, nodes, gpus = shape
    weight = _weights(layers, experts, seed=sum(shape))
    model = ModelSpec(name="m", num_hidden_layers=layers, moe_layer_ids=tuple(range(layers)), num_experts=experts,
                      top_k=4, num_groups=groups)
    topo = make_topology("h100", gpus=gpus, nodes=nodes)
    problem = PlacementProblem(load_only_stats(weight, top_k=4), model, topo, num_redundant=replicas - experts)
    result = solve(problem, "eplb")
    write_placement_json(tmp_path / "p.json", result.placement, model=model, topology=topo, dispatch="nearest",
                         method="eplb", status="feasible", solve_seconds=0.0)
    placement = read_placement_json(tmp_path / "p.json").placement
    export_placement(placement, "eplb", tmp_path / "e.npz", model=model, topology=topo)
    ref = [t.numpy() for t in mod.rebalance_experts(torch.from_numpy(weight), replicas, groups, nodes, gpus)]
    with np.load(tmp_path / "e.npz", allow_pickle=False) as z:
        for name, want in zip(("phy2log", "log2phy", "logcnt"), ref, strict=True):
            np.testing.assert_array_equal(z[name], want, err_msg=name)
    # ascending slot order differs from replica order somewhere (else this test shows nothing)
    assert not np.array_equal(placement.log2phy("slot", replicas - experts + 1), ref[1])
    back = import_placement(tmp_path / "e.npz", "eplb", model=model, topology=topo)
    np.testing.assert_array_equal(back.log2phy("replica", replicas - experts + 1), ref[1])


def test_replica_rank_is_checked():
    with pytest.raises(InvalidInputError, match="ranks 0..replicas-1 once each"):
        Placement([[0, 1, 0, 1]], 2, 2, replica_rank=[[0, 0, 0, 1]])
    p = Placement([[0, 1, 0, 1]], 2, 2, replica_rank=[[1, 0, 0, 1]])
    assert p.log2phy("replica").tolist() == [[[2, 0], [1, 3]]]
    assert p.log2phy().tolist() == [[[0, 2], [1, 3]]]
    assert Placement([[0, 1, 0, 1]], 2, 2, replica_rank=[[0, 0, 1, 1]]).replica_rank is None  # ascending


@pytest.mark.parametrize("gpus, nodes, redundant", [(16, 2, 16), (16, 2, 48), (8, 1, 56)])
def test_distinct_per_gpu(gpus, nodes, redundant):
    """vllm-ascend's constraint: no GPU holds two copies of an expert; with it EPLB still balances."""
    from placer.validate import duplicate_copies

    model = get_model("deepseek-v2-lite")
    load = np.random.default_rng(gpus).lognormal(0, 1.5, (model.num_moe_layers, 64)) * 1000
    topo = make_topology("h100", gpus=gpus, nodes=nodes)
    plain = solve(PlacementProblem(load_only_stats(load, top_k=6), model, topo, num_redundant=redundant), "eplb")
    problem = PlacementProblem(load_only_stats(load, top_k=6), model, topo, num_redundant=redundant,
                               distinct_per_gpu=True)
    result = solve(problem, "eplb")
    assert duplicate_copies(plain.placement), "the plain greedy stacks copies on this load"
    assert duplicate_copies(result.placement) == []
    group = gpus // nodes if result.terms["hierarchical"] else gpus  # copies stay inside a node's GPUs
    assert result.placement.logcnt().max() <= group
    assert result.objective <= plain.objective * 1.10 + 1e-9
