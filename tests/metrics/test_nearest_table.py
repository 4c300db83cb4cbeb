"""The compiled ``nearest`` dispatch table (``metrics.dispatch._nearest_kernel``) is bit-identical
to its numpy path (``_nearest_numpy``: the implementation of before the kernel, used on a cold
numba cache, the reference here): same table, and the seeded generator left in the same state,
on random placements with replicas (1-4 nodes, 1-8 GPUs per node, 1-4 slots per GPU, several
layers and seeds). The kernel's draws equal numpy's own ``Generator.choice(replace=False)`` and
``Generator.permutation``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placer.metrics import dispatch
from placer.metrics.dispatch import (
    _fair,
    _fair_into,
    _nearest_kernel,
    _nearest_numpy,
    _nearest_table,
    _sample_indices,
)
from placer.types import Placement, Topology


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
    expected = _nearest_numpy(placement, topology, numpys)
    got = _nearest_kernel(placement.physical_to_logical, placement.slots_per_gpu, topology.gpus_per_node,
                          placement.num_experts, ours)
    assert got.dtype == np.int64 and np.array_equal(got, expected)
    assert _same_state(ours, numpys)


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
    assert np.array_equal(got, _nearest_numpy(placement, topology, np.random.default_rng(42)))


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
                              _nearest_numpy(placement, topology, np.random.default_rng(seed)))


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
    assert np.array_equal(out, _fair(cands, count, numpys))
    assert _same_state(ours, numpys)
