"""Native trace npz, stats npz and Parquet: round trips, chunking, headers and model checks."""

from __future__ import annotations

import numpy as np
import pytest
from io_helpers import assert_same_trace, random_ids

from placer.errors import InvalidInputError
from placer.io import (
    detect_format,
    read_input,
    read_stats_npz,
    read_trace,
    write_stats_npz,
    write_trace_npz,
    write_trace_parquet,
)
from placer.stats import StatsBuilder, load_only_stats
from placer.types import ModelSpec, RoutingTrace


def test_trace_npz_round_trip(tmp_path, trace, tiny):
    p = tmp_path / "t.npz"
    write_trace_npz(p, trace)
    assert detect_format(p) == "placer-npz"
    inp = read_input(p, chunk_tokens=16)
    assert inp.kind == "trace" and inp.format == "placer-npz" and inp.stats is None
    assert inp.model == tiny and inp.source == str(p) and not inp.synthetic
    chunks = list(inp.chunks())
    assert [c.num_tokens for c in chunks] == [16, 16, 16, 2]
    assert all(c.model == tiny for c in chunks)
    assert [c.num_tokens for c in inp.chunks()] == [16, 16, 16, 2]  # re-iterable
    assert_same_trace(read_trace(p), trace)


def test_trace_npz_minimal_and_synthetic(tmp_path, rng):
    ids = random_ids(rng, 7, 2, 5, 3)
    t = RoutingTrace(ids, 5, "unknown")
    p = tmp_path / "m.npz"
    write_trace_npz(p, t, synthetic=True)
    inp = read_input(p)
    assert inp.model is None and inp.synthetic
    assert_same_trace(read_trace(p), t)


def test_trace_npz_empty(tmp_path):
    t = RoutingTrace(np.zeros((0, 2, 2), np.int16), 4)
    p = tmp_path / "e.npz"
    write_trace_npz(p, t)
    assert read_trace(p).num_tokens == 0


def test_header_model_contradicts_given_model(tmp_path, trace):
    p = tmp_path / "t.npz"
    write_trace_npz(p, trace)
    other = ModelSpec.from_shape(3, 8, 2, name="other")  # no dense layer: different shape
    with pytest.raises(InvalidInputError, match="contradicts") as exc:
        read_input(p, model=other)
    assert str(p) in str(exc.value)


def test_given_model_wrong_shape_for_headerless_trace(tmp_path, rng):
    t = RoutingTrace(random_ids(rng, 5, 2, 8, 2), 8)
    p = tmp_path / "t.npz"
    write_trace_npz(p, t)
    with pytest.raises(InvalidInputError, match=r"layer count 2 does not match m \(3 MoE layers\)"):
        read_input(p, model=ModelSpec.from_shape(3, 8, 2, name="m"))


def test_num_gpus_checks_home_ranks(tmp_path, trace):
    p = tmp_path / "t.npz"
    write_trace_npz(p, trace)
    assert sum(c.num_tokens for c in read_input(p, num_gpus=4).chunks()) == 50
    with pytest.raises(InvalidInputError, match="home rank 3 out of range for 2 GPUs") as exc:
        list(read_input(p, num_gpus=2).chunks())
    assert str(p) in str(exc.value)


def _stats_by_phase(trace):
    b = StatsBuilder(trace.num_layers, trace.num_experts, trace.top_k, sample_size=8, model=trace.model)
    b.update(trace)
    return b, {"prefill": b.result("prefill"), "decode": b.result("decode")}


def test_stats_npz_round_trip(tmp_path, trace, tiny):
    b, phases = _stats_by_phase(trace)
    p = tmp_path / "s.npz"
    write_stats_npz(p, phases)
    assert detect_format(p) == "placer-stats"
    inp = read_input(p)
    assert inp.kind == "stats" and inp.chunks is None and inp.model == tiny
    whole = b.result("all")
    got = inp.stats
    assert got.phase == "all" and got.num_tokens == 50 and got.model == tiny
    for name in ("load", "top1_transitions", "pair_transitions", "coactivation", "sample_ids", "sample_keys"):
        np.testing.assert_array_equal(getattr(got, name), getattr(whole, name), err_msg=name)
    dec = read_stats_npz(p, "decode")
    assert dec.phase == "decode" and dec.num_tokens == 25
    np.testing.assert_array_equal(dec.load, phases["decode"].load)
    with pytest.raises(InvalidInputError, match="phase 'unknown' is absent") as exc:
        read_stats_npz(p, "unknown")
    assert str(p) in str(exc.value)


def test_stats_npz_single_and_load_only(tmp_path, tiny):
    s = load_only_stats(np.arange(24, dtype=float).reshape(3, 8) + 0.5, 2, model=tiny)
    p = tmp_path / "s.npz"
    write_stats_npz(p, s)
    got = read_stats_npz(p)
    np.testing.assert_array_equal(got.load, s.load)
    assert got.top1_transitions is None and got.sample_ids is None and got.model == tiny
    with pytest.raises(InvalidInputError, match="holds only counts"):
        read_trace(p)


def test_stats_npz_keeps_stored_all(tmp_path, trace):
    b, phases = _stats_by_phase(trace)
    p = tmp_path / "s.npz"
    write_stats_npz(p, {"all": b.result("all"), **phases})
    assert read_stats_npz(p).num_tokens == 50  # not double counted


def test_parquet_round_trip(tmp_path, trace, tiny):
    p = tmp_path / "t.parquet"
    chunks = [trace.select_tokens(slice(0, 30)), trace.select_tokens(slice(30, 50))]
    assert write_trace_parquet(p, chunks, row_group_tokens=12) == 50
    assert detect_format(p) == "parquet"
    inp = read_input(p)
    assert inp.model == tiny
    got = list(inp.chunks())
    assert [c.num_tokens for c in got] == [12, 12, 6, 12, 8]  # one trace per row group
    assert [c.num_tokens for c in read_input(p, chunk_tokens=10).chunks()] == [10, 2, 10, 2, 6, 10, 2, 8]
    assert_same_trace(read_trace(p), trace)


def test_parquet_minimal(tmp_path, rng):
    t = RoutingTrace(random_ids(rng, 9, 3, 6, 2), 6, "unknown")
    p = tmp_path / "t.pq"
    write_trace_parquet(p, t)
    assert_same_trace(read_trace(p), t)
    assert read_input(p).model is None


def test_parquet_rejects_mismatched_chunks(tmp_path, rng):
    a = RoutingTrace(random_ids(rng, 4, 3, 6, 2), 6)
    b = RoutingTrace(random_ids(rng, 4, 2, 6, 2), 6)
    p = tmp_path / "t.parquet"
    with pytest.raises(InvalidInputError, match="differs from the first chunk"):
        write_trace_parquet(p, [a, b])
    assert not p.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(InvalidInputError, match="no trace chunks"):
        write_trace_parquet(p, [])
