"""The NumPy reference (the definition of permute/unpermute) and the dispatch-rule bridge."""

from __future__ import annotations

import numpy as np
import pytest

from placer.errors import InvalidInputError
from placer.kernels import permute_reference, slot_map, split_sizes, unpermute_reference
from placer.metrics.dispatch import select_slots
from placer.types import Placement, Topology


def test_permute_reference_hand_drawn():
    # 2 GPUs x 3 slots; logical expert e lives in slot [4, 1, 2, 5][e].
    #   token 0 -> experts (0, 1) -> slots (4, 1)
    #   token 1 -> experts (2, 0) -> slots (2, 4)
    #   token 2 -> experts (1, 3) -> slots (1, 5)
    # rows by slot, then token:  slot 1: t0, t2 | slot 2: t1 | slot 4: t0, t1 | slot 5: t2
    x = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]], dtype=np.float32)
    ids = np.array([[0, 1], [2, 0], [1, 3]])
    rows, row_map, counts = permute_reference(x, ids, np.array([4, 1, 2, 5]), 6)
    np.testing.assert_array_equal(rows[:, 0], [1, 3, 2, 1, 2, 3])
    np.testing.assert_array_equal(row_map, [[3, 0], [2, 4], [1, 5]])
    np.testing.assert_array_equal(counts, [0, 2, 1, 0, 2, 1])
    np.testing.assert_array_equal(split_sizes(counts, 3), [3, 3])
    out = unpermute_reference(rows, row_map, np.array([[0.5, 0.25], [1.0, 2.0], [0.0, 1.0]]))
    np.testing.assert_array_equal(out, [[0.75, 7.5], [6.0, 60.0], [3.0, 30.0]])


def test_per_token_slot_map_and_empty_input():
    ids = np.array([[1], [1]])
    smap = np.array([[0, 3], [0, 2]])  # token 0 uses slot 3 for expert 1, token 1 slot 2
    rows, row_map, counts = permute_reference(np.array([[7.0], [8.0]]), ids, smap, 4)
    np.testing.assert_array_equal(rows[:, 0], [8.0, 7.0])
    np.testing.assert_array_equal(row_map, [[1], [0]])
    np.testing.assert_array_equal(counts, [0, 0, 1, 1])
    rows, row_map, counts = permute_reference(np.zeros((0, 4)), np.zeros((0, 2), int),
                                              np.arange(3), 3)
    assert rows.shape == (0, 4) and row_map.shape == (0, 2) and counts.tolist() == [0, 0, 0]


def _placement() -> tuple[Placement, Topology]:
    rng = np.random.default_rng(3)
    e, g, spg = 6, 4, 3  # 2 nodes x 2 GPUs, 12 slots, 6 redundant
    p2l = np.stack([rng.permutation(np.concatenate([np.arange(e), rng.integers(0, e, g * spg - e)]))
                    for _ in range(2)])
    return Placement(p2l, spg, e), Topology("t", 2, 2)


@pytest.mark.parametrize("rule", ["nearest", "sglang-static", "sglang-dynamic", "vllm"])
def test_slot_map_agrees_with_select_slots(rule):
    placement, topology = _placement()
    rng = np.random.default_rng(0)
    tokens, top_k = 40, 2
    ids = np.stack([rng.choice(6, top_k, replace=False) for _ in range(tokens)])  # [T, K]
    positions = np.arange(tokens) + 5
    for layer in range(placement.num_layers):
        for rank in range(placement.num_gpus):
            home = np.full(tokens, rank)
            want = select_slots(placement, topology, np.repeat(ids[:, None, :], 2, axis=1),
                                home_rank=home, token_index=positions, rule=rule)[:, layer]
            smap = slot_map(placement, topology, layer, rank=rank, positions=positions, rule=rule)
            assert smap.shape == ((tokens, 6) if rule in ("sglang-dynamic", "vllm") else (6,))
            _, row_map, counts = permute_reference(np.zeros((tokens, 1)), ids, smap,
                                                   placement.num_slots)
            slots = smap[ids] if smap.ndim == 1 else np.take_along_axis(smap, ids, 1)
            np.testing.assert_array_equal(slots, want)
            np.testing.assert_array_equal(counts, np.bincount(want.ravel(), minlength=12))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"layer": 2, "rank": 0}, "layer 2 out of range"),
    ({"layer": 0}, "needs a rank"),
    ({"layer": 0, "rank": 4}, "needs a rank"),
    ({"layer": 0, "rule": "vllm"}, "needs token positions"),
    ({"layer": 0, "rule": "vllm", "positions": np.zeros((2, 2))}, "positions must be 1-D"),
])
def test_slot_map_rejects_bad_arguments(kwargs, match):
    placement, topology = _placement()
    with pytest.raises(InvalidInputError, match=match):
        slot_map(placement, topology, **kwargs)


def test_split_sizes_rejects_uneven_slots():
    with pytest.raises(InvalidInputError, match="do not split"):
        split_sizes(np.zeros(7, dtype=np.int64), 3)
