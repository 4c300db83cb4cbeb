"""The compiled ``nearest`` dispatch table (``metrics.dispatch._nearest_kernel``) and its numpy
path (``_nearest_numpy``, used on a cold numba cache) are bit-identical to the numpy
implementation of before the kernel (kept here as the reference): same table, and the seeded
generator left in the same state, on random placements with replicas (1-4 nodes, 1-8 GPUs per
node, 1-4 slots per GPU, several layers and seeds). The kernel's draws equal numpy's own
``Generator.choice(replace=False)`` and ``Generator.permutation``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placer.metrics import dispatch
from placer.metrics.dispatch import (
    _fair_into,
    _nearest_kernel,
    _nearest_numpy,
    _nearest_table,
    _sample_indices,
)
from placer.types import Placement, Topology


def reference_fair(candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """The replaced ``dispatch._fair``."""
    q, r = divmod(count, len(candidates))
    if len(candidates) == 1:
        picks = np.full(q, candidates[0], dtype=candidates.dtype)
    else:
        picks = np.tile(candidates, q) if q else candidates[:0]
    if r:
        picks = np.concatenate([picks, rng.choice(candidates, size=r, replace=False)])
    return rng.permutation(picks) if len(picks) > 1 else picks


def reference_missing_by_node(missing: np.ndarray, gpn: int):
    """The replaced ``dispatch._missing_by_node``."""
    num_gpus, num_experts = missing.shape
    if gpn >= 63:
        per = missing.T.reshape(num_experts, -1, gpn)
        return lambda e: [(int(n), (n * gpn + np.flatnonzero(per[e, n])).tolist())
                          for n in np.flatnonzero(per[e].any(axis=1))]
    bits = (missing.T.reshape(num_experts, -1, gpn) * np.left_shift(1, np.arange(gpn, dtype=np.int64))).sum(axis=2)
    return lambda e: [(node, [node * gpn + lane for lane in range(gpn) if b >> lane & 1])
                      for node, b in enumerate(bits[e].tolist()) if b]


def reference_table(placement: Placement, topology: Topology, rng: np.random.Generator) -> np.ndarray:
    """The replaced ``dispatch._nearest_table`` (drawing from ``rng``)."""
    num_layers, num_gpus, num_experts = placement.num_layers, placement.num_gpus, placement.num_experts
    gpn = topology.gpus_per_node
    gpu_of_slot = placement.gpu_of_slot()
    node_of_slot = (np.arange(num_gpus) // gpn)[gpu_of_slot]
    cnt = placement.logcnt()
    table = np.full((num_layers, num_gpus, num_experts), -1, dtype=np.int64)
    slots = np.arange(placement.num_slots)
    none = placement.num_slots
    for layer in range(num_layers):
        p2l = placement.physical_to_logical[layer]
        local = np.full((num_gpus, num_experts), none, dtype=np.int64)
        np.minimum.at(local, (gpu_of_slot, p2l), slots)
        table[layer] = np.where(local < none, local, -1)
        single = cnt[layer] == 1
        only_slot = np.full(num_experts, -1, dtype=np.int64)
        only_slot[p2l] = np.arange(placement.num_slots)
        table[layer][:, single] = only_slot[single][None, :]
        order = np.argsort(p2l, kind="stable")
        starts = np.searchsorted(p2l[order], np.arange(num_experts + 1))
        missing_by_node = reference_missing_by_node(table[layer] < 0, gpn)
        for expert in np.flatnonzero(~single).tolist():
            column = table[layer, :, expert]
            by_node = missing_by_node(expert)
            if not by_node:
                continue
            candidates = order[starts[expert]:starts[expert + 1]]
            cand_list, cand_nodes = candidates.tolist(), node_of_slot[candidates].tolist()
            rest: list[int] = []
            for node, need in by_node:
                here = [c for c, n in zip(cand_list, cand_nodes, strict=True) if n == node]
                if here:
                    column[need] = reference_fair(np.asarray(here, dtype=candidates.dtype), len(need), rng)
                else:
                    rest.extend(need)
            if rest:
                column[rest] = reference_fair(candidates, len(rest), rng)
    return table


def _same_state(a: np.random.Generator, b: np.random.Generator) -> bool:
    return a.bit_generator.state == b.bit_generator.state


@st.composite
def cases(draw):
    """(placement, topology, seed): 1-4 nodes x 1-8 GPUs x 1-4 slots, 1-4 layers, every expert
    placed, the other slots replicas (few or many experts, so some are replicated many times)."""
    nodes, gpn, spg = draw(st.integers(1, 4)), draw(st.integers(1, 8)), draw(st.integers(1, 4))
    p = nodes * gpn * spg
    experts = draw(st.integers(1, p))
    layers = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p2l = np.stack([rng.permutation(np.concatenate([np.arange(experts), rng.integers(0, experts, p - experts)]))
                    for _ in range(layers)])
    return Placement(p2l, spg, experts), Topology("t", nodes, gpn), draw(st.integers(0, 2**32 - 1))


@settings(max_examples=200, deadline=None)
@given(cases())
def test_table_and_stream_equal_the_reference(case):
    placement, topology, seed = case
    numpys, ours = np.random.default_rng(seed), np.random.default_rng(seed)
    expected = reference_table(placement, topology, numpys)
    got = _nearest_kernel(placement.physical_to_logical, placement.slots_per_gpu, topology.gpus_per_node,
                          placement.num_experts, ours)
    assert got.dtype == np.int64 and np.array_equal(got, expected)
    assert _same_state(ours, numpys)
    again = np.random.default_rng(seed)
    assert np.array_equal(_nearest_numpy(placement, topology, again), expected) and _same_state(again, numpys)


@pytest.mark.parametrize("ready", [True, False])
def test_table_takes_the_kernel_once_cached(monkeypatch, ready):
    """``_nearest_table`` runs the kernel when numba's cache holds it, else the numpy path: the
    same table either way."""
    placement = Placement(np.array([[0, 1, 2, 0, 1, 0], [2, 2, 1, 0, 0, 1]]), 2, 3)
    topology = Topology("t", 3, 1)
    monkeypatch.setattr(dispatch, "cache_holds", lambda kernel: ready)
    calls = []
    monkeypatch.setattr(dispatch, "_nearest_numpy", lambda *a: calls.append(a) or _nearest_numpy(*a))
    got = _nearest_table(placement, topology, 42)
    assert len(calls) == (0 if ready else 1)
    assert np.array_equal(got, reference_table(placement, topology, np.random.default_rng(42)))


@pytest.mark.parametrize("shape", [(8, 4, 8, 1, 40), (64, 8, 9, 3, 256), (16, 16, 4, 2, 8), (72, 72, 2, 1, 100)])
def test_large_clusters_equal_the_reference(shape):
    """Cluster sizes the property test does not reach: DeepSeek-V3's (64 GPUs in 8 nodes, 256
    experts, 64 redundant slots), experts replicated on most GPUs, a node of 72 GPUs."""
    num_gpus, gpn, spg, layers, experts = shape
    rng = np.random.default_rng(num_gpus)
    p = num_gpus * spg
    p2l = np.stack([rng.permutation(np.concatenate([np.arange(experts), rng.integers(0, experts, p - experts)]))
                    for _ in range(layers)])
    placement, topology = Placement(p2l, spg, experts), Topology("t", num_gpus // gpn, gpn)
    for seed in (0, 42):
        assert np.array_equal(_nearest_table(placement, topology, seed),
                              reference_table(placement, topology, np.random.default_rng(seed)))


@pytest.mark.parametrize("population", [1, 2, 3, 5, 8, 33, 10001, 20000])
def test__sample_indices_are_numpys_choice(population):
    """Floyd's algorithm below 10,000 candidates, numpy's tail shuffle above (for samples over a
    fiftieth of them): the same indices and the generator left in the same state."""
    sizes = sorted({1, population // 2, population // 50, population // 50 + 1, population - 1, population} - {0})
    for seed in range(3):
        ours, numpys = np.random.default_rng(seed), np.random.default_rng(seed)
        for size in sizes:
            idx = _sample_indices(ours, population, size)
            assert np.array_equal(idx, numpys.choice(population, size=size, replace=False))
            assert _same_state(ours, numpys)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=12, unique=True), st.integers(1, 40),
       st.integers(0, 2**32 - 1))
def test_fair_is_the_reference(candidates, count, seed):
    """Each candidate ``count // n`` times, the remainder drawn as ``choice(replace=False)``, then
    ``permutation`` (skipped for one pick): the same picks and state as numpy's calls."""
    cands = np.asarray(candidates, dtype=np.int64)
    ours, numpys = np.random.default_rng(seed), np.random.default_rng(seed)
    out = np.empty(count, dtype=np.int64)
    _fair_into(cands, count, ours, out)
    assert np.array_equal(out, reference_fair(cands, count, numpys))
    assert _same_state(ours, numpys)
