import numpy as np
import pytest

from placer.errors import InvalidInputError, PlacementError
from placer.types import ModelSpec, Placement, RoutingStats, RoutingTrace, SolveResult

README_P2L = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
              [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_placement_derived_maps_match_eplb_readme():
    p = Placement(README_P2L, slots_per_gpu=2, num_experts=12)
    assert p.num_gpus == 8 and p.num_redundant == 4
    np.testing.assert_array_equal(p.logcnt()[0], [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1])
    np.testing.assert_array_equal(p.logcnt()[1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1])
    log2phy = p.log2phy()
    assert log2phy.shape == (2, 12, 2)
    # every listed slot holds that expert, padding is -1, slots ascending
    for layer in range(2):
        for e in range(12):
            slots = [s for s in log2phy[layer, e] if s >= 0]
            assert slots == sorted(slots)
            assert all(p.physical_to_logical[layer, s] == e for s in slots)
            assert len(slots) == p.logcnt()[layer, e]
    np.testing.assert_array_equal(p.gpu_experts()[0, 1], [5, 7])
    np.testing.assert_array_equal(p.gpu_of_slot()[:4], [0, 0, 1, 1])


@pytest.mark.parametrize("p2l, spg, e, match", [
    ([[0, 1, 2]], 2, 3, "multiple of slots_per_gpu"),
    ([[0, 1, 1, 0]], 2, 3, "expert 2 has no slot"),
    ([[0, 1, 2, 5]], 2, 4, "outside"),
    ([[0, -1, 2, 3]], 2, 4, "outside"),
    ([[0, 1]], 1, 3, "cannot hold"),
])
def test_placement_rejects_violations(p2l, spg, e, match):
    with pytest.raises(PlacementError, match=match):
        Placement(p2l, spg, e)


def test_placement_is_frozen():
    p = Placement([[0, 1]], 1, 2)
    with pytest.raises(ValueError):
        p.physical_to_logical[0, 0] = 1


def test_trace_validation():
    ids = np.array([[[0, 1], [2, 3]], [[1, 0], [3, 2]]])
    t = RoutingTrace(ids, num_experts=4)
    assert (t.num_tokens, t.num_layers, t.top_k) == (2, 2, 2) and t.expert_ids.dtype == np.int16
    with pytest.raises(InvalidInputError, match=r"in \[0, 4\)"):
        RoutingTrace(ids + 1, num_experts=4)
    with pytest.raises(InvalidInputError, match="same expert twice"):
        RoutingTrace(np.array([[[1, 1]]]), num_experts=4)
    with pytest.raises(InvalidInputError, match="3 dimensions"):
        RoutingTrace(ids[0], num_experts=4)
    with pytest.raises(InvalidInputError, match="phase"):
        RoutingTrace(ids, num_experts=4, phase=[0, 5])
    with pytest.raises(InvalidInputError, match="NaN"):
        RoutingTrace(ids, num_experts=4, gate_weights=np.full(ids.shape, np.nan))


def test_trace_top1_from_gate_weights():
    ids = np.array([[[0, 1]], [[2, 3]]])
    w = np.array([[[0.2, 0.8]], [[0.9, 0.1]]])
    t = RoutingTrace(ids, num_experts=4, order="unknown", gate_weights=w)
    np.testing.assert_array_equal(t.sorted_ids()[:, 0, 0], [1, 2])
    t2 = RoutingTrace(ids, num_experts=4, order="unknown")
    assert not t2.has_top1
    with pytest.raises(InvalidInputError, match="top-1"):
        t2.sorted_ids()


def test_trace_must_match_model():
    model = ModelSpec.from_shape(3, 8, 2)
    with pytest.raises(InvalidInputError, match="does not match model"):
        RoutingTrace(np.zeros((1, 2, 2), int) + [0, 1], num_experts=8, model=model)


@pytest.mark.parametrize("load, match", [
    ([[1.0, np.nan]], "NaN"),
    ([[1, -2]], "negative"),
    ([1, 2], "matrix"),
])
def test_stats_rejects_bad_load(load, match):
    with pytest.raises(InvalidInputError, match=match):
        RoutingStats(load=np.array(load), num_tokens=1, top_k=1)


def test_stats_layer_slice():
    s = RoutingStats(load=np.ones((4, 3), int), num_tokens=1, top_k=1,
                     top1_transitions=np.zeros((3, 3, 3), int), coactivation=np.zeros((4, 3, 3), int))
    sub = s.layers(1, 3)
    assert sub.load.shape == (2, 3) and sub.top1_transitions.shape == (1, 3, 3)
    assert sub.coactivation.shape == (2, 3, 3)


def test_model_spec_checks_and_round_trip():
    m = ModelSpec("x", 4, (1, 2, 3), 8, 2, hidden_size=64, expert_ffn_size=32, num_groups=4, topk_groups=2)
    assert ModelSpec.from_dict(m.to_dict()) == m
    assert m.expert_weight_bytes == 3 * 64 * 32 * 2
    with pytest.raises(InvalidInputError, match="num_groups"):
        ModelSpec("x", 4, (1,), 8, 2, num_groups=3)
    with pytest.raises(InvalidInputError, match="moe_layer_ids"):
        ModelSpec("x", 4, (1, 4), 8, 2)
    with pytest.raises(InvalidInputError, match="top_k"):
        ModelSpec("x", 4, (1,), 8, 9)


def test_solve_result_status():
    with pytest.raises(InvalidInputError, match="status"):
        SolveResult(placement=None, status="optimalish", objective=0.0)
    with pytest.raises(InvalidInputError, match="needs a placement"):
        SolveResult(placement=None, status="feasible", objective=0.0)
    assert SolveResult(placement=None, status="infeasible", objective=float("inf")).placement is None


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_the_compiled_id_check_matches_numpy(k):
    from placer.types._scan import scan

    rng = np.random.default_rng(k)
    for trial in range(30):
        ids = np.stack([np.stack([rng.permutation(16)[:k] for _ in range(3)]) for _ in range(5)]).astype(np.int16)
        if trial % 3 == 1 and k > 1:  # plant one duplicate
            t, layer, a, b = rng.integers(5), rng.integers(3), *rng.choice(k, 2, replace=False)
            ids[t, layer, a] = ids[t, layer, b]
        if trial % 5 == 2:
            ids[rng.integers(5), rng.integers(3), rng.integers(k)] = -3 if trial % 2 else 40
        s = np.sort(ids, axis=-1)
        expected = (int(ids.min()), int(ids.max()), bool(np.any(s[..., 1:] == s[..., :-1])))
        assert scan(ids) == expected
    assert scan(np.zeros((0, 2, 2), np.int16)) == (0, 0, False)
