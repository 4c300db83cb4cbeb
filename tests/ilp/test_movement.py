"""Movement-aware re-placement (placer.ilp.movement): keep_in_place, the cost, solve_from."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placer.errors import InvalidInputError
from placer.ilp import PlacementProblem, solve
from placer.ilp.movement import (
    doubled,
    gpu_balance,
    keep_in_place,
    move_seconds,
    relabelled,
    solve_from,
    step_load,
)
from placer.presets import make_topology
from placer.runtime import plan_migration
from placer.stats import load_only_stats
from placer.types import ModelSpec, Placement, Topology


def _holds_twice(p: Placement) -> bool:
    """Some GPU holds two copies of an expert that has no more replicas than there are GPUs."""
    rows = p.physical_to_logical.reshape(p.num_layers, p.num_gpus, p.slots_per_gpu)
    cnt = p.logcnt()
    found = any(len(set(r)) < len(r) and any(cnt[i, x] <= p.num_gpus and list(r).count(x) > 1 for x in r)
                for i, layer in enumerate(rows) for r in layer)
    assert found == doubled(p)
    return found


def test_keep_in_place_keeps_counts_and_experts_and_never_holds_an_expert_twice():
    #         GPU 0      GPU 1      GPU 2      GPU 3
    old = Placement([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]], 3, 8)
    # The re-solve replicates 7 and 6 instead of 0 and 1 and shuffles every GPU.
    target = Placement([[7, 2, 4, 6, 0, 7, 3, 1, 6, 5, 2, 3]], 3, 8)
    load = np.array([[10.0, 10, 20, 20, 10, 10, 40, 40]])
    out = keep_in_place(old, target, load, tolerance=0.1)
    np.testing.assert_array_equal(out.logcnt(), target.logcnt())
    topo = Topology("t", 1, 4)
    sticky = plan_migration(old, out, topo, expert_bytes=1.0)
    eplb = plan_migration(old, target, topo, expert_bytes=1.0)
    assert (sticky.bytes_moved, eplb.bytes_moved) == (2.0, 4.0)
    # GPUs 0-2 keep their experts (GPU 2 drops its third slot: expert 0 has one replica now) and
    # the new replicas fill the free slots; the only free slot left for the second 7 is on a GPU
    # that holds 7, so a GPU without 7 hands it one of its replicas and takes the 7.
    assert not _holds_twice(out)
    assert sorted(out.physical_to_logical[0].tolist()) == sorted(target.physical_to_logical[0].tolist())
    assert gpu_balance(target, load)[0] <= gpu_balance(out, load)[0] < gpu_balance(old, load)[0]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(0, 10**6), st.sampled_from([(4, 2), (4, 3), (8, 2)]), st.floats(0, 1))
def test_keep_in_place_is_valid_for_random_loads(seed, shape, tolerance):
    gpus, slots = shape
    experts = gpus * slots - gpus  # one redundant slot per GPU
    rng = np.random.default_rng(seed)
    model = ModelSpec("m", 2, (0, 1), experts, 2, hidden_size=64, expert_ffn_size=64)
    topo = make_topology("h100", gpus=gpus, nodes=2)
    loads = [rng.pareto(1.2, (2, experts)) + 0.1 for _ in range(2)]
    old = solve(PlacementProblem(load_only_stats(loads[0], 2, model=model), model, topo, gpus), "eplb").placement
    new = solve(PlacementProblem(load_only_stats(loads[1], 2, model=model), model, topo, gpus), "eplb").placement
    out = keep_in_place(old, new, loads[1], tolerance=tolerance)
    np.testing.assert_array_equal(out.logcnt(), new.logcnt())
    assert not _holds_twice(out)


def test_gpu_balance_splits_load_over_replicas():
    p = Placement([[0, 1, 0, 2]], 2, 3)  # GPU 0: {0, 1}, GPU 1: {0, 2}
    np.testing.assert_allclose(gpu_balance(p, np.array([[4.0, 2.0, 2.0]])), [1.0])  # 2 + 2, 2 + 2
    assert step_load(p, np.array([[4.0, 2.0, 2.0]])) == 4.0


def test_move_seconds_counts_what_each_gpu_lacks_over_its_link():
    topo = Topology("t", 2, 2, nvlink_gbps=100.0, nic_gbps=10.0)
    old = Placement([[0, 1, 0, 2, 1, 3, 2, 3]], 2, 4)  # node 0 (GPUs 0-1) holds 0, 1, 2
    new = Placement([[0, 2, 0, 3, 1, 3, 2, 3]], 2, 4)  # GPU 0 gets 2 (from GPU 1), GPU 1 gets 3
    seconds, nbytes = move_seconds(old, new, topo, expert_bytes=1e9)
    assert nbytes == 2e9
    assert seconds == pytest.approx(1e9 / 10e9)  # the slowest: GPU 1, over the NIC (3 is on node 1)
    assert move_seconds(old, old, topo, 1e9) == (0.0, 0.0)
    # a relabel moves nothing it need not: old with GPUs 0 and 1 swapped maps back onto old
    swapped = Placement([[0, 2, 0, 1, 1, 3, 2, 3]], 2, 4)
    assert move_seconds(old, swapped, topo, 1e9)[1] == 2e9
    assert move_seconds(old, relabelled(old, swapped, topo), topo, 1e9)[1] == 0.0


MODEL = ModelSpec("m", 4, (0, 1, 2, 3), 16, 2, hidden_size=1024, expert_ffn_size=2048)
TOPO = make_topology("h100", gpus=8, nodes=2)


def _problem(seed: float, sigma: float) -> PlacementProblem:
    rng = np.random.default_rng(seed)
    load = np.exp(rng.normal(0, sigma, (4, 16))) * 100
    return PlacementProblem(load_only_stats(load, 2, model=MODEL), MODEL, TOPO, num_redundant=8)


def test_solve_from_trades_the_objective_for_bytes_along_the_horizon():
    before, after = _problem(1, 1.0), _problem(2, 1.0)
    current = solve(before, "eplb").placement
    fresh = solve(after, "eplb").placement
    assert doubled(current)  # EPLB's packing put two replicas of an expert on one GPU: never kept so
    short = solve_from(after, "eplb", current, horizon_s=1e-4)  # any move costs more than it gains
    assert short.terms["layers_kept"] == 4 and short.terms["layers_resolved"] == short.terms["layers_repacked"] == 0
    undoubled = keep_in_place(current, current, after.stats.load, tolerance=float("inf"))
    np.testing.assert_array_equal(short.placement.physical_to_logical, undoubled.physical_to_logical)  # doubles only
    long = solve_from(after, "eplb", current, horizon_s=1e9, min_gain=0.0)  # the objective is all that counts
    assert long.terms["objective_ratio"] <= min(1.0, long.terms["resolve_objective_ratio"]) + 1e-12
    assert long.terms["layers_kept"] < 4
    mid = solve_from(after, "eplb", current, horizon_s=600)
    full = move_seconds(current, relabelled(current, fresh, TOPO), TOPO, MODEL.expert_weight_bytes)[1]
    assert mid.terms["resolve_bytes_moved"] == full
    for r in (short, long, mid):
        assert not _holds_twice(r.placement)
        np.testing.assert_array_equal(r.placement.logcnt().sum(1), current.logcnt().sum(1))
        assert r.objective == pytest.approx(r.terms["objective_ratio"] + r.terms["movement_cost"])
        assert r.terms["objective_ratio"] <= 1.0 + 1e-12  # never worse than the running placement
        assert r.bound is None and r.gap is None
    # a larger min_gain moves no more layers
    strict = solve_from(after, "eplb", current, horizon_s=1e9, min_gain=0.5)
    assert strict.terms["layers_kept"] >= long.terms["layers_kept"]


def test_solve_from_scores_the_repacked_candidates_while_its_time_limit_allows():
    """Every candidate without a limit (or with one that never binds, the same answer); with a
    limit that has passed, only the running placement and the method's answer."""
    before, after = _problem(1, 1.0), _problem(2, 1.0)
    current = solve(before, "eplb").placement
    free = solve_from(after, "eplb", current, horizon_s=1e9, min_gain=0.0)
    assert free.terms["candidates"] == 7
    loose = solve_from(after, "eplb", current, horizon_s=1e9, min_gain=0.0, time_limit_s=1e6)
    np.testing.assert_array_equal(loose.placement.physical_to_logical, free.placement.physical_to_logical)
    spent = solve_from(after, "eplb", current, horizon_s=1e9, min_gain=0.0, time_limit_s=1e-9)
    assert spent.terms["candidates"] == 2 and spent.terms["layers_repacked"] == 0


def test_solve_from_rejects_another_shape_and_a_bad_horizon():
    after = _problem(2, 1.0)
    with pytest.raises(InvalidInputError, match="--from: the running placement is"):
        solve_from(after, "eplb", Placement(np.arange(16)[None].repeat(4, 0), 2, 16), horizon_s=600)
    current = solve(after, "eplb").placement
    with pytest.raises(InvalidInputError, match="--horizon-s: must be positive"):
        solve_from(after, "eplb", current, horizon_s=0)
    with pytest.raises(InvalidInputError, match="min_gain: must be a fraction"):
        solve_from(after, "eplb", current, horizon_s=600, min_gain=1.0)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.integers(0, 10**6), st.integers(1, 400), st.integers(1, 8), st.sampled_from([2, 8, 256, 384, 1000]),
       st.sampled_from([1, 4, 64, 128]))
def test_token_types_equal_numpys_unique_rows(seed, s, k, e, g):
    """The packed-word distinct rows of the layer search (placer.ilp.local_search) against
    ``np.unique(axis=0)``, which it replaced."""
    from placer.ilp.local_search import token_types

    rng = np.random.default_rng(seed)
    ids, home = rng.integers(0, e, (s, k)), rng.integers(0, g, s)
    ids[: s // 3], home[: s // 3] = ids[0], home[0]  # repeated rows
    rows = np.concatenate([home[:, None], np.sort(ids, axis=1)], axis=1)
    uniq, counts = np.unique(rows, axis=0, return_counts=True)
    got_ids, got_home, got_wt = token_types(ids, home)
    np.testing.assert_array_equal(got_ids, uniq[:, 1:])
    np.testing.assert_array_equal(got_home, uniq[:, 0])
    np.testing.assert_array_equal(got_wt, counts / s)
