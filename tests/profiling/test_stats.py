"""Streaming statistics: numba kernel vs numpy reference, streaming, merging, phases, slicing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placer.errors import InvalidInputError
from placer.presets import MODELS
from placer.stats import StatsBuilder, _count, compute_stats, merge_stats
from placer.synthetic import synthesize, synthesize_trace
from placer.types import ModelSpec, RoutingStats, RoutingTrace

COUNTS = ("load", "top1_transitions", "pair_transitions", "coactivation")
SAMPLE = ("sample_ids", "sample_token_index", "sample_home_rank", "sample_keys")


def _random_ids(rng: np.random.Generator, t: int, num_layers: int, e: int, k: int) -> np.ndarray:
    keys = rng.random((t, num_layers, e))
    return np.argsort(keys, axis=-1)[..., :k].astype(np.int16)


def _zeros(num_layers: int, e: int, top1: bool):
    return (np.zeros((num_layers, e), np.int64),
            np.zeros((num_layers - 1, e, e), np.int64) if top1 else None,
            np.zeros((num_layers - 1, e, e), np.int64),
            np.zeros((num_layers, e, e), np.int64))


def _same_counts(a: RoutingStats, b: RoutingStats) -> None:
    assert a.num_tokens == b.num_tokens
    for name in COUNTS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert np.array_equal(x, y), name


def _same_sample(a: RoutingStats, b: RoutingStats) -> None:
    for name in SAMPLE:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), t=st.integers(0, 40), num_layers=st.integers(1, 4),
       e=st.integers(1, 12), k_frac=st.floats(0, 1), top1=st.booleans(), split=st.floats(0, 1))
def test_numba_kernel_matches_numpy_reference(seed, t, num_layers, e, k_frac, top1, split):
    k = 1 + int(k_frac * (min(e, 5) - 1))
    rng = np.random.default_rng(seed)
    ids = _random_ids(rng, t, num_layers, e, k)
    cut = int(split * t)
    got, want = _zeros(num_layers, e, top1), _zeros(num_layers, e, top1)
    for part in (ids[:cut], ids[cut:]):  # two calls: counts add up
        _count.accumulate(part, *got)
        _count.accumulate_numpy(part, *want)
    for g, w in zip(got, want, strict=True):
        assert (g is None and w is None) or np.array_equal(g, w)
    coact = got[3]
    assert np.array_equal(coact, coact.transpose(0, 2, 1))
    assert not np.any(np.diagonal(coact, axis1=1, axis2=2))


@pytest.mark.skipif(not _count.HAVE_NUMBA, reason="numba missing")
def test_both_kernel_paths_and_int32_segments():
    rng = np.random.default_rng(7)
    ids = _random_ids(rng, 300, 3, 10, 4)
    want = _zeros(3, 10, True)
    _count.accumulate_numpy(ids, *want)
    direct = _zeros(3, 10, True)
    _count._kernel_direct(ids, direct[0], direct[1], True, direct[2], direct[3])
    for segment in (1, 7, 10_000):  # flushes every `segment` tokens
        scratch = _zeros(3, 10, True)
        _count._kernel_scratch(ids, scratch[0], scratch[1], True, scratch[2], scratch[3], segment)
        for s, w in zip(scratch, want, strict=True):
            assert np.array_equal(s, w)
    for d, w in zip(direct, want, strict=True):
        assert np.array_equal(d, w)


def test_accumulate_checks_ids_and_falls_back():
    ids = np.array([[[0, 3]], [[1, 2]]], np.int16)
    with pytest.raises(ValueError):
        _count.accumulate(ids, *_zeros(1, 3, False))
    # count arrays that are not C-contiguous int64 take the numpy path, same result
    load = np.zeros((4, 1), np.int64).T
    want = _zeros(1, 4, False)
    _count.accumulate_numpy(ids, *want)
    _count.accumulate(ids, load, None, np.zeros((0, 4, 4), np.int64), np.zeros((1, 4, 4), np.int64))
    assert np.array_equal(load, want[0])


def test_builder_numba_equals_builder_numpy(monkeypatch):
    model = MODELS["deepseek-v3"]
    chunks = list(synthesize(model, 1500, seed=4, chunk_tokens=700))
    fast = compute_stats(chunks, sample_size=100)
    monkeypatch.setattr(_count, "accumulate", _count.accumulate_numpy)
    slow = compute_stats(chunks, sample_size=100)
    _same_counts(fast, slow)
    _same_sample(fast, slow)


@pytest.fixture(scope="module")
def trace() -> RoutingTrace:
    """3000 tokens of OLMoE shape with mixed phases and home ranks."""
    base = synthesize_trace(MODELS["olmoe-1b-7b"], 3000, seed=11)
    phase = (np.arange(3000) % 3 == 0).astype(np.int8)  # 1/3 decode
    return RoutingTrace(base.expert_ids, base.num_experts, "sorted", base.gate_weights,
                        phase=phase, home_rank=np.arange(3000) % 8, model=base.model)


def _chunks(trace: RoutingTrace, sizes: list[int]) -> list[RoutingTrace]:
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == trace.num_tokens
    return [trace.select_tokens(np.arange(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def test_streaming_equals_one_shot(trace):
    one = compute_stats(trace, sample_size=200, seed=3)
    streamed = compute_stats(_chunks(trace, [1, 999, 1234, 766]), sample_size=200, seed=3)
    _same_counts(one, streamed)
    _same_sample(one, streamed)
    assert one.sample_size == 200
    assert np.all(np.diff(one.sample_keys) >= 0)
    assert np.array_equal(one.sample_ids, trace.expert_ids[one.sample_token_index])
    assert np.array_equal(one.sample_home_rank, trace.home_rank[one.sample_token_index])


def test_merge_equals_concatenation(trace):
    a_tr, b_tr = _chunks(trace, [1800, 1200])
    a = compute_stats(a_tr, sample_size=150, seed=1)
    b = compute_stats(b_tr, sample_size=150, seed=2)
    merged = merge_stats([a, b])
    _same_counts(merged, compute_stats(trace, sample_size=150))
    keys = np.concatenate([a.sample_keys, b.sample_keys])
    ids = np.concatenate([a.sample_ids, b.sample_ids])
    order = np.argsort(keys, kind="stable")[:150]
    assert merged.sample_size == 150
    assert np.array_equal(merged.sample_keys, keys[order])
    assert np.array_equal(merged.sample_ids, ids[order])
    # builders merge the same way
    ba = StatsBuilder(16, 64, 8, sample_size=150, seed=1)
    ba.update(a_tr)
    _same_counts(merge_stats([ba.result(), b]), merged)


def test_final_result_hands_over_the_counts(trace):
    """``result(final=True)`` equals ``result()``, shares the builder's arrays, and ends updates."""
    b = StatsBuilder(16, 64, 8, sample_size=100, seed=4)
    b.update(trace)
    copied = b.result()
    final = b.result(final=True)
    _same_counts(copied, final)
    _same_sample(copied, final)
    assert not final.coactivation.flags.writeable
    with pytest.raises(RuntimeError, match="after result"):
        b.update(trace)
    a, c = _chunks(trace, [1000, 2000])
    merged = merge_stats([compute_stats(a), compute_stats(c)])
    _same_counts(merged, compute_stats(trace))
    assert merge_stats([final]).coactivation is final.coactivation  # one input: shared, not summed


def test_phase_filtering(trace):
    b = StatsBuilder(16, 64, 8, sample_size=100)
    for c in _chunks(trace, [1000, 2000]):
        b.update(c)
    for phase, code in (("prefill", 0), ("decode", 1)):
        got = b.result(phase)
        want = compute_stats(trace.select_tokens(trace.phase == code), sample_size=100)
        _same_counts(got, want)
        assert got.phase == phase
        assert np.all(trace.phase[got.sample_token_index] == code)
    total = b.result("all")
    _same_counts(total, compute_stats(trace, sample_size=100))
    assert b.result("unknown").num_tokens == 0
    no_phase = compute_stats(RoutingTrace(trace.expert_ids, 64, "sorted"), sample_size=10)
    assert no_phase.num_tokens == 3000
    bp = StatsBuilder(16, 64, 8)
    bp.update(RoutingTrace(trace.expert_ids[:10], 64, "sorted"))
    with pytest.raises(InvalidInputError):
        bp.result("decode")


def test_layer_slicing(trace):
    stats = compute_stats(trace, sample_size=50)
    cut = stats.layers(3, 7)
    sub = RoutingTrace(trace.expert_ids[:, 3:7], 64, "sorted", phase=trace.phase,
                       home_rank=trace.home_rank)
    _same_counts(cut, compute_stats(sub, sample_size=50))
    assert np.array_equal(cut.sample_ids, stats.sample_ids[:, 3:7])
    assert cut.top1_transitions.shape == (3, 64, 64) and cut.coactivation.shape == (4, 64, 64)


def test_memory_bounded_by_sample_size():
    model = ModelSpec.from_shape(3, 16, 2)
    shapes = []
    for n in (50, 5000):
        b = StatsBuilder(3, 16, 2, sample_size=100)
        for c in synthesize(model, n, chunk_tokens=512):
            b.update(c)
        s = b.result()
        assert s.num_tokens == n
        assert s.sample_size == min(n, 100)
        acc = next(iter(b._phases.values()))
        assert acc.sample_ids.shape[0] == min(n, 100)
        shapes.append(tuple(getattr(s, name).shape for name in COUNTS))
    assert shapes[0] == shapes[1]


def test_unknown_order_without_gate_weights_has_no_top1(trace):
    ids = trace.expert_ids[:500]
    shuffled = np.take_along_axis(ids, np.argsort(np.random.default_rng(0).random(ids.shape), axis=-1), -1)
    unknown = RoutingTrace(shuffled, 64, "unknown")
    stats = compute_stats(unknown, sample_size=20)
    assert stats.top1_transitions is None and not stats.has_top1
    with pytest.raises(InvalidInputError):
        stats.require_top1("affinity")
    known = compute_stats(RoutingTrace(ids, 64, "sorted"), sample_size=20)
    assert np.array_equal(stats.pair_transitions, known.pair_transitions)  # order-free counts
    assert np.array_equal(stats.coactivation, known.coactivation)
    assert np.array_equal(stats.load, known.load)
    # a later unknown-order chunk drops top-1 for the whole stream
    b = StatsBuilder(16, 64, 8)
    b.update(RoutingTrace(ids, 64, "sorted"))
    b.update(unknown)
    assert b.result().top1_transitions is None
    # unknown order with gate weights: top-1 recovered from the weights
    w = np.take_along_axis(trace.gate_weights[:500], np.argsort(
        np.random.default_rng(0).random(ids.shape), axis=-1), -1)
    weighted = compute_stats(RoutingTrace(shuffled, 64, "unknown", gate_weights=w), sample_size=20)
    assert np.array_equal(weighted.top1_transitions, known.top1_transitions)
