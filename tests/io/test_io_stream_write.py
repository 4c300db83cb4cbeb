"""The streamed trace npz writer: the same file as the whole-trace writer, one chunk held at a time."""

from __future__ import annotations

import zipfile
from dataclasses import replace

import numpy as np
import pytest
from io_helpers import assert_same_trace

from placer.app.workflow import write_synthetic
from placer.errors import InvalidInputError
from placer.io import (
    read_input,
    read_trace,
    write_trace_npz,
    write_trace_npz_chunks,
    write_trace_parquet,
)
from placer.io.common import chunker
from placer.presets import get_model
from placer.synthetic import synthesize_trace


def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


@pytest.mark.parametrize("chunk_tokens", [1, 7, 16, 50, 64])
def test_streamed_npz_is_the_whole_trace_npz(tmp_path, trace, chunk_tokens):
    whole, streamed = tmp_path / "whole.npz", tmp_path / "streamed.npz"
    write_trace_npz(whole, trace, synthetic=True)
    n = write_trace_npz_chunks(streamed, chunker(trace, chunk_tokens)(), trace.num_tokens, synthetic=True)
    assert n == trace.num_tokens == 50
    assert _members(streamed) == _members(whole)  # byte for byte, member by member, in order
    assert_same_trace(read_trace(streamed), trace)
    assert read_input(streamed).synthetic
    assert sorted(f.name for f in tmp_path.iterdir()) == ["streamed.npz", "whole.npz"]  # spools are gone


def test_streamed_npz_refuses_a_wrong_total_and_leaves_nothing(tmp_path, trace):
    p = tmp_path / "t.npz"
    with pytest.raises(InvalidInputError, match="hold 50 tokens, 60 announced"):
        write_trace_npz_chunks(p, chunker(trace, 16)(), 60)
    with pytest.raises(InvalidInputError, match="more than the 40 tokens announced"):
        write_trace_npz_chunks(p, chunker(trace, 16)(), 40)
    with pytest.raises(InvalidInputError, match="no trace chunks"):
        write_trace_npz_chunks(p, iter(()), 0)
    assert list(tmp_path.iterdir()) == []  # no output, no spooled or temporary file


def test_streamed_npz_refuses_chunks_that_differ(tmp_path, trace):
    first = trace.select_tokens(np.arange(10))
    bare = replace(trace.select_tokens(np.arange(10, 20)), request_ids=None)
    with pytest.raises(InvalidInputError, match="differs from the first chunk"):
        write_trace_npz_chunks(tmp_path / "t.npz", [first, bare], 20)
    assert list(tmp_path.iterdir()) == []


def test_synth_npz_streams_the_synthetic_trace(tmp_path):
    """``placer synth -o x.npz`` writes chunk by chunk; the file is the whole synthetic trace."""
    model = get_model("mixtral-8x7b")
    p = tmp_path / "s.npz"
    assert write_synthetic(model, 70_000, seed=3, phase="decode", output=str(p)) == 70_000  # two chunks
    whole = synthesize_trace(model, 70_000, seed=3, phase="decode")
    got = read_trace(p)
    assert_same_trace(got, whole)
    assert got.model is not None and got.model.name == model.name and read_input(p).synthetic


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_gate_weights_left_unread_only_where_they_order_nothing(tmp_path, trace, suffix):
    unknown = replace(trace, order="unknown")
    for t, kept in ((trace, False), (unknown, True)):
        p = tmp_path / f"{t.order}{suffix}"
        if suffix == ".npz":
            write_trace_npz(p, t)
        else:
            write_trace_parquet(p, chunker(t, 16)(), row_group_tokens=16)
        chunks = list(read_input(p, chunk_tokens=16, gate_weights=False).chunks())
        assert [c.gate_weights is not None for c in chunks] == [kept] * 4
        np.testing.assert_array_equal(np.concatenate([c.sorted_ids() for c in chunks]), t.sorted_ids())
