"""Movement-aware (anchored) re-placement of the ``placer`` method: the search's movement term,
:func:`placer.ilp.movement.anchor_cost` and :func:`placer.ilp.movement.solve_from` with it.

Small instances, deterministic budgets (``iterations``), no wall-clock limits.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from placer.errors import InvalidInputError
from placer.ilp import PlacementProblem, solve
from placer.ilp import _ls_anneal as A
from placer.ilp.local_search import LayerTask, SearchConfig, _layer, token_types
from placer.ilp.movement import anchor_cost, copies_per_gpu, doubled, move_seconds, solve_from
from placer.presets import make_topology
from placer.stats import compute_stats
from placer.types import ModelSpec, Placement, RoutingTrace, Topology
from placer.validate import check_placement

ITERS = 600  # annealing steps per layer: the deterministic budget of these tests


def _problem(seed: int, *, experts=8, gpus=4, nodes=2, redundant=4, layers=3, tokens=400,
             execution="standard") -> PlacementProblem:
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(experts, 0.7), size=layers)
    ids = np.stack([np.stack([rng.choice(experts, 2, replace=False, p=pop[layer]) for layer in range(layers)])
                    for _ in range(tokens)])
    model = ModelSpec("tiny", layers, tuple(range(layers)), experts, 2, hidden_size=1024, expert_ffn_size=2048)
    stats = compute_stats(RoutingTrace(ids, experts, model=model), sample_size=tokens, seed=seed)
    return PlacementProblem(stats, model, make_topology("h100", gpus=gpus, nodes=nodes), num_redundant=redundant,
                            execution=execution)


def _moved_pairs(old: Placement, new: Placement) -> int:
    held_old = copies_per_gpu(old.physical_to_logical, old.num_gpus, old.num_experts) > 0
    held_new = copies_per_gpu(new.physical_to_logical, new.num_gpus, new.num_experts) > 0
    return int((held_new & ~held_old).sum())


def test_the_movement_term_is_incremental_and_rebuilt_alike():
    """After many hot annealing moves the running energy's movement part equals a rebuild."""
    problem = _problem(0)
    rng = np.random.default_rng(1)
    topo = problem.topology
    cfg = SearchConfig(num_gpus=4, num_nodes=2, gpus_per_node=2, slots_per_gpu=3, num_experts=8, num_slots=12,
                       top_k=2, rule="nearest", w_bal=1.0, w_nv=1.0, w_rdma=10.0)
    stats = problem.stats
    ids, hm, wt = token_types(stats.sample_ids[:, 0].astype(np.int64),
                              stats.sample_token_index.astype(np.int64) % topo.num_gpus)
    p2l = rng.permutation(np.concatenate([np.arange(8), rng.integers(0, 8, 4)])).astype(np.int64)
    cost = rng.random((4, 8))
    task = LayerTask(0, stats.load[0] / stats.num_tokens, ids, hm, wt, p2l[None], move_cost=cost)
    lay, st_, wk = _layer(task, cfg)
    plain = LayerTask(0, task.load, ids, hm, wt, p2l[None])
    lay0, st0, wk0 = _layer(plain, cfg)

    def term(m):  # the movement part of a map, from scratch
        held = np.zeros((4, 8), bool)
        held[np.arange(12) // 3, m] = True
        return float(cost[held].sum())

    traffic, mx, sd = A.init_state(p2l, lay, st_, wk)
    assert traffic == pytest.approx(A.init_state(p2l, lay0, st0, wk0)[0] + term(p2l), rel=1e-12)
    n = 3000
    score = np.array([traffic, mx, sd, 1e30, 1e30, 1e30])
    A.anneal(0, n, n, rng.random((n, 6)), 1.0, 1.0, 0.4, 0.3, p2l, p2l.copy(), lay, st_, wk, score)
    rebuilt = A.init_state(p2l, lay, st_, wk)
    assert rebuilt[0] == pytest.approx(score[0], rel=1e-9)
    assert rebuilt[0] == pytest.approx(A.init_state(p2l, lay0, st0, wk0)[0] + term(p2l), rel=1e-12)


def test_anchor_cost_is_zero_where_held_and_cheaper_from_the_node():
    topo = Topology("t", 2, 2, nvlink_gbps=100.0, nic_gbps=10.0)
    model = ModelSpec("m", 1, (0,), 4, 2, hidden_size=1024, expert_ffn_size=2048)
    problem = replace(_problem(0, experts=4, gpus=4, nodes=2, redundant=4, layers=1), model=model, topology=topo)
    anchor = Placement([[0, 1, 0, 2, 1, 3, 2, 3]], 2, 4)  # node 0 (GPUs 0-1) holds 0, 1, 2; node 1: 1, 2, 3
    j = np.array([2.0])
    cost = anchor_cost(problem, anchor, j, horizon_s=100.0, move_floor=0.0)
    nv, nic = model.expert_weight_bytes / 100e9, model.expert_weight_bytes / 10e9
    assert cost[0, 0, 0] == cost[0, 0, 1] == 0.0  # held
    assert cost[0, 0, 2] == pytest.approx(2.0 * nv / 100.0)  # GPU 1 of its node holds 2: NVLink
    assert cost[0, 0, 3] == pytest.approx(2.0 * nic / 100.0)  # only node 1 holds 3: the NIC
    floored = anchor_cost(problem, anchor, j, horizon_s=100.0, move_floor=0.25)
    np.testing.assert_allclose(floored - cost, np.where(cost > 0, 0.5, 0.0))  # 0.25 of the layer's 2.0


def _rounds(seed: int, **kwargs):
    before, after = _problem(seed), _problem(seed + 100)
    current = solve(before, "placer", seed=0, iterations=ITERS).placement
    return after, current, solve_from(after, "placer", current, horizon_s=600.0, seed=0, iterations=ITERS,
                                      **kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anchored_solve_from_is_valid_deterministic_and_never_doubles(seed):
    after, current, r = _rounds(seed)
    p = r.placement
    check_placement(p, after.model, after.topology)
    assert not doubled(p)
    np.testing.assert_array_equal(p.logcnt().sum(1), current.logcnt().sum(1))
    again = solve_from(after, "placer", current, horizon_s=600.0, seed=0, iterations=ITERS)
    np.testing.assert_array_equal(again.placement.physical_to_logical, p.physical_to_logical)
    assert r.terms["objective_ratio"] <= 1.0 + 1e-12  # never worse than the running placement
    assert r.terms["bytes_moved"] == move_seconds(current, p, after.topology,
                                                  after.model.expert_weight_bytes)[1]
    assert "movement_term" in r.terms  # the anchored search ran


def test_a_prohibitive_floor_keeps_the_running_placement():
    after, current, r = _rounds(3, move_floor=1e6)
    assert r.terms["bytes_moved"] == 0.0
    np.testing.assert_array_equal(r.placement.physical_to_logical, current.physical_to_logical)


def test_the_anchor_moves_fewer_experts_than_the_unanchored_resolve():
    after, current, anchored = _rounds(4, min_gain=0.0)
    plain = solve_from(after, "placer", current, horizon_s=600.0, seed=0, iterations=ITERS, move_floor=None,
                       min_gain=0.0)
    assert "movement_term" not in plain.terms
    assert _moved_pairs(current, anchored.placement) <= _moved_pairs(current, plain.placement)
    assert anchored.terms["resolve_bytes_moved"] <= plain.terms["resolve_bytes_moved"]


def test_anchored_placer_rejects_bad_inputs():
    after, current, _ = _rounds(5, move_floor=None)
    with pytest.raises(InvalidInputError, match="move_floor: must be a non-negative"):
        solve_from(after, "placer", current, horizon_s=600.0, move_floor=-1.0)
    with pytest.raises(InvalidInputError, match="anchor and anchor_cost go together"):
        solve(after, "placer", anchor=current, iterations=0)
    coherent = replace(after, execution="context-coherent")
    with pytest.raises(InvalidInputError, match="needs standard execution"):
        solve(coherent, "placer", anchor=current, anchor_cost=np.zeros((3, 4, 8)))


def test_anchored_solve_from_with_more_replicas_than_gpus():
    """Doubles that cannot be avoided (5 slots per GPU, 4 experts) leave the search unconstrained."""
    before, after = (_problem(s, experts=4, gpus=2, nodes=1, redundant=6) for s in (6, 106))
    current = solve(before, "placer", seed=0, iterations=ITERS).placement
    r = solve_from(after, "placer", current, horizon_s=600.0, seed=0, iterations=ITERS)
    check_placement(r.placement, after.model, after.topology)
    np.testing.assert_array_equal(r.placement.logcnt().sum(1), current.logcnt().sum(1))
    assert "movement_term" in r.terms
