"""The decision rule, the decayed window and the state file, without HTTP."""

from __future__ import annotations

import json

import numpy as np
import pytest
from serve_helpers import MODEL, TOPOLOGY, shifted_load

from placer.app.serve import (
    Observation,
    PolicyConfig,
    ServiceState,
    Window,
    evaluate,
    is_local_host,
    load_state,
    parse_observation,
    save_state,
    should_publish,
)
from placer.app.serve.policy import migration_seconds
from placer.errors import InvalidInputError
from placer.ilp.simple import contiguous_map
from placer.presets import make_topology
from placer.runtime.plan import plan_migration
from placer.types import Placement


def _contiguous() -> Placement:
    return Placement(contiguous_map(4, 8, 8), 2, 8)


@pytest.mark.timeout(60)
def test_rule_publishes_only_above_threshold_after_migration_cost():
    assert should_publish(0.10, 0.02, 0.05)[0]
    assert not should_publish(0.06, 0.02, 0.05)[0]
    assert not should_publish(0.05, 0.0, 0.05)[0]  # strictly greater


@pytest.mark.timeout(60)
def test_evaluate_shift_versus_noise_and_horizon():
    window = Window(4, 8, half_life=4)
    window.add(parse_observation({"load": shifted_load()}, MODEL))
    stats = window.stats(MODEL)
    decision, candidate = evaluate(_contiguous(), stats, MODEL, TOPOLOGY, PolicyConfig())
    assert decision.publish and candidate is not None
    assert decision.gain > 0.05 and decision.current_step_s > decision.candidate_step_s
    assert decision.migration_bytes > 0 and decision.migration_bytes % MODEL.expert_weight_bytes == 0
    # Same inputs, same numbers (seeded simulator and solver).
    again, _ = evaluate(_contiguous(), stats, MODEL, TOPOLOGY, PolicyConfig())
    assert again.gain == decision.gain
    # The candidate is already optimal for the window: no second move.
    steady, none = evaluate(candidate, stats, MODEL, TOPOLOGY, PolicyConfig())
    assert not steady.publish and none is None
    # The method's answer as it is, over a horizon it pays back only half of: not published.
    fixed = evaluate(_contiguous(), stats, MODEL, TOPOLOGY, PolicyConfig(movement_aware=False))[0]
    short, _ = evaluate(_contiguous(), stats, MODEL, TOPOLOGY,
                        PolicyConfig(horizon_s=fixed.migration_s / 0.5, movement_aware=False))
    assert short.migration_cost == pytest.approx(0.5) and not short.publish
    # Movement-aware over the same horizon: a smaller move (or none), never a dearer one.
    aware, _ = evaluate(_contiguous(), stats, MODEL, TOPOLOGY, PolicyConfig(horizon_s=fixed.migration_s / 0.5))
    assert (aware.migration_bytes or 0) <= short.migration_bytes


@pytest.mark.timeout(60)
def test_migration_seconds_uses_nvlink_inside_and_the_nic_across_nodes():
    topo = make_topology("h100", gpus=4, nodes=2)
    old = _contiguous()
    new_map = contiguous_map(4, 8, 8).copy()
    new_map[:, [1, 7]] = new_map[:, [7, 1]]  # swap expert 1 (GPU 0, node 0) with 7 (GPU 3, node 1)
    plan = plan_migration(old, Placement(new_map, 2, 8), topo, expert_bytes=MODEL.expert_weight_bytes)
    t = plan.transfers
    cross = (t.src_gpu // 2) != (t.dst_gpu // 2)
    assert cross.any() and len(t) == 8  # 2 experts x 4 layers, each way across the nodes
    # Whatever the relabel chose, the slowest GPU port (send or receive: bandwidths are per
    # direction) takes its bytes over the link they use.
    per_port = {}
    for src, dst, b, c in zip(t.src_gpu, t.dst_gpu, t.bytes, cross, strict=True):
        for port in (("out", src), ("in", dst)):
            per_port[port] = per_port.get(port, 0.0) + b / ((topo.nic_gbps if c else topo.nvlink_gbps) * 1e9)
    assert migration_seconds(plan, topo) == pytest.approx(max(per_port.values()))
    assert migration_seconds(plan, topo) == pytest.approx(4 * MODEL.expert_weight_bytes / (topo.nic_gbps * 1e9))
    assert migration_seconds(plan_migration(old, old, topo, expert_bytes=1.0), topo) == 0.0


@pytest.mark.timeout(60)
def test_window_decays_by_half_life_in_observations():
    w = Window(1, 2, half_life=1.0)
    w.add(Observation(np.array([[3.0, 1.0]]), "a"))     # fractions [0.75, 0.25]
    w.add(Observation(np.array([[0.0, 50.0]]), "b"))    # fractions [0, 1]; token count does not matter
    # (0.5 * [0.75, 0.25] + [0, 1]) / 1.5
    assert w.fractions() == pytest.approx(np.array([[0.25, 0.75]]))
    w2 = Window(2, 2, half_life=2.0)
    w2.add(Observation(np.array([[1.0, 1.0], [0.0, 0.0]]), "c"))  # layer 1 carries no load
    assert w2.fractions()[1] == pytest.approx([0.5, 0.5]) and w2.fractions()[0] == pytest.approx([0.5, 0.5])
    assert w2.decay == pytest.approx(0.5 ** 0.5)
    with pytest.raises(InvalidInputError, match="--half-life"):
        Window(1, 2, half_life=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_state_round_trip_and_mismatch(tmp_path, suffix):
    path = tmp_path / f"state{suffix}"
    assert load_state(path, MODEL, TOPOLOGY, 4.0) is None
    window = Window(4, 8, 4.0)
    top1 = np.ones((3, 8, 8))
    window.add(parse_observation({"load": shifted_load(), "top1_transitions": top1.tolist(), "num_tokens": 9},
                                 MODEL))
    state = ServiceState(window, _contiguous(), "contiguous", seen={"a.pt": [1, 2]},
                         last_decision={"observations": 1, "publish": False})
    state.counters["observations_total"] = 1
    save_state(path, state, MODEL, TOPOLOGY)
    back = load_state(path, MODEL, TOPOLOGY, 4.0)
    assert back.counters == state.counters and back.seen == {"a.pt": [1, 2]}
    assert back.last_decision == state.last_decision and back.placement_method == "contiguous"
    assert np.array_equal(back.placement.physical_to_logical, state.placement.physical_to_logical)
    assert np.allclose(back.window.fractions(), window.fractions()) and back.window.count == 1
    assert np.array_equal(back.window.stats(MODEL).top1_transitions, window.stats(MODEL).top1_transitions)
    with pytest.raises(InvalidInputError, match="was written for tiny-moe .* on 4 GPUs"):
        load_state(path, MODEL, make_topology("h100", gpus=8), 4.0)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InvalidInputError, match="state"):
        load_state(path, MODEL, TOPOLOGY, 4.0)


@pytest.mark.timeout(60)
def test_state_file_of_another_kind_is_refused(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[0]]}))
    with pytest.raises(InvalidInputError, match="not a placer serve state file"):
        load_state(path, MODEL, TOPOLOGY, 4.0)


def test_local_hosts():
    assert is_local_host("127.0.0.1") and is_local_host("localhost") and is_local_host("::1")
    assert not is_local_host("0.0.0.0") and not is_local_host("10.0.0.5") and not is_local_host("example.org")


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_re_solve_on_ray_equals_the_local_one(ray_session):
    """A method without layer subproblems (eplb) runs as one Ray task; the answer is the same."""
    from placer.app.serve.policy import resolve
    from placer.ilp import PlacementProblem
    from placer.stats import load_only_stats

    stats = load_only_stats(np.asarray(shifted_load()), MODEL.top_k, model=MODEL)
    problem = PlacementProblem(stats, MODEL, TOPOLOGY, num_redundant=4)
    local = resolve(problem, PolicyConfig(method="eplb", redundant=4))
    remote = resolve(problem, PolicyConfig(method="eplb", redundant=4, ray_address="auto"))
    np.testing.assert_array_equal(local.placement.physical_to_logical, remote.placement.physical_to_logical)
    assert remote.objective == local.objective
