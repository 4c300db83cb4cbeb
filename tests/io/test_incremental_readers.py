"""Inputs read incrementally (R3 .npy and base64, SGLang per_token dumps, Parquet): the chunks
streamed from the file, concatenated, are the whole-file trace, whatever the chunk size; bad data
found while streaming is an error naming the file."""

from __future__ import annotations

import base64
import sys

import numpy as np
import pytest
from cli_helpers import one_line_exit2
from io_helpers import assert_same_trace, random_ids

from placer.errors import InvalidInputError
from placer.io import read_input, read_trace, write_trace_parquet
from placer.io import sglang as sglang_io
from placer.io.common import rechunk
from placer.io.traces import concat_traces
from placer.types import RoutingTrace

CHUNKS = [1, 2, 7, 16, 37, 1000]  # 1 token, sizes that do not divide the token count, all at once
TOKENS = 37


def _streamed(path, chunk_tokens, **kwargs) -> RoutingTrace:
    """The chunks of ``path`` concatenated, each checked to hold ``chunk_tokens`` tokens (the last fewer)."""
    inp = read_input(path, chunk_tokens=chunk_tokens, **kwargs)
    assert inp.chunks is not None
    parts = list(inp.chunks())
    sizes = [p.num_tokens for p in parts]
    assert all(n == chunk_tokens for n in sizes[:-1]) and 0 < sizes[-1] <= chunk_tokens, sizes
    return concat_traces(parts) if len(parts) > 1 else parts[0]


def test_rechunk_regroups_pieces():
    pieces = [(np.arange(a, b), np.full(b - a, i)) for i, (a, b) in enumerate([(0, 3), (3, 3), (3, 10), (10, 11)])]
    for size in (1, 3, 4, 11, 50):
        groups = list(rechunk(iter(pieces), size))
        assert [len(g[0]) for g in groups[:-1]] == [size] * (len(groups) - 1)
        np.testing.assert_array_equal(np.concatenate([g[0] for g in groups]), np.arange(11))
        np.testing.assert_array_equal(np.concatenate([g[1] for g in groups]), [0, 0, 0] + [2] * 7 + [3])
    assert list(rechunk(iter([]), 4)) == []


# ---------------------------------------------------------------------------- R3 .npy


@pytest.mark.parametrize("fortran", [False, True], ids=["C-order", "Fortran-order"])
def test_r3_npy_streams(tmp_path, rng, tiny, fortran):
    full = random_ids(rng, TOKENS, tiny.num_hidden_layers, 8, 2).astype(np.int32)
    p = tmp_path / "routed.npy"
    np.save(p, np.asfortranarray(full) if fortran else full)
    whole = read_trace(p, model=tiny)
    np.testing.assert_array_equal(whole.expert_ids, full[:, 1:])
    no_model = read_trace(p)
    assert no_model.num_layers == 4 and no_model.num_experts == int(full.max()) + 1
    for chunk_tokens in CHUNKS:
        assert_same_trace(_streamed(p, chunk_tokens, model=tiny), whole)
        assert_same_trace(_streamed(p, chunk_tokens), no_model)


def test_r3_npy_is_checked_before_streaming(tmp_path, rng, tiny):
    """An id out of range anywhere in the file is reported when it is opened, not mid-stream."""
    full = random_ids(rng, TOKENS, tiny.num_hidden_layers, 8, 2).astype(np.int32)
    full[TOKENS - 1, 2, 1] = 9
    p = tmp_path / "routed.npy"
    np.save(p, full)
    with pytest.raises(InvalidInputError, match=r"expert id 9 out of range \[0, 8\) for tiny") as exc:
        read_input(p, model=tiny, chunk_tokens=4)
    assert str(p) in str(exc.value)
    full[TOKENS - 1, 0, 1] = 40_000  # a dense layer: never read as ids
    full[TOKENS - 1, 2, 1] = 1 - full[TOKENS - 1, 2, 0]
    np.save(p, full)
    assert read_trace(p, model=tiny).num_tokens == TOKENS


def test_r3_npy_truncated_data(tmp_path, rng, tiny):
    p = tmp_path / "routed.npy"
    np.save(p, random_ids(rng, TOKENS, 4, 8, 2).astype(np.int32))
    p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(InvalidInputError, match=r"declares an array of 1\.184 kB; the file holds 1\.176 kB") as exc:
        read_input(p, model=tiny)
    assert str(p) in str(exc.value)


def test_error_found_mid_stream_exits_2_naming_the_file(capsys, tmp_path):
    """A token picking one expert twice is found only when its chunk is built: still one line, exit 2."""
    tokens = 65536 + 500  # stats reads 65536-token chunks: the bad token is in the second
    ids = np.empty((tokens, 32, 2), np.int32)
    ids[:, :, 0] = np.arange(tokens)[:, None] % 8
    ids[:, :, 1] = (ids[:, :, 0] + 1) % 8
    ids[65536 + 100, 3] = [5, 5]
    p = tmp_path / "routed.npy"
    np.save(p, ids)
    inp = read_input(p, chunk_tokens=65536)
    assert inp.chunks is not None
    chunks = inp.chunks()
    assert next(chunks).num_tokens == 65536
    with pytest.raises(InvalidInputError, match="same expert twice") as exc:
        next(chunks)
    assert str(p) in str(exc.value)
    one_line_exit2(capsys, "stats", p, "--model", "mixtral-8x7b", "--quiet",
                   needle=f"{p}: expert_ids: a token picks the same expert twice in one layer")


# ---------------------------------------------------------------------------- R3 base64


def test_r3_base64_streams(tmp_path, rng, tiny):
    lines = [random_ids(rng, n, 4, 8, 2).astype("<i4") for n in (5, 1, 12, 3, 16)]
    p = tmp_path / "routed.b64"
    p.write_text("\n".join(base64.b64encode(a.tobytes()).decode() for a in lines) + "\n\n")
    whole = read_trace(p, model=tiny)
    np.testing.assert_array_equal(whole.expert_ids, np.concatenate(lines)[:, 1:])
    np.testing.assert_array_equal(whole.request_ids, np.repeat(np.arange(5), [len(a) for a in lines]))
    for chunk_tokens in CHUNKS:
        assert_same_trace(_streamed(p, chunk_tokens, model=tiny), whole)


def test_r3_base64_bad_last_line_found_when_opened(tmp_path, rng, tiny):
    good = base64.b64encode(random_ids(rng, 4, 4, 8, 2).astype("<i4").tobytes()).decode()
    p = tmp_path / "routed.b64"
    p.write_text(f"{good}\n{good}\n{good[:-8]}\n")
    with pytest.raises(InvalidInputError, match="line 3: ") as exc:
        read_input(p, model=tiny, chunk_tokens=1)
    assert str(p) in str(exc.value)


# ---------------------------------------------------------------------------- SGLang per_token


P2L = np.array([[(s * 3 + layer) % 8 for s in range(10)] for layer in range(4)])


def _per_token(rng, sizes, modes):
    """A per_token dump (physical ids [4, T, 8], layer 0 dense, token 1 of long records padding)
    and its logical ids [T', 3, 2] with phases."""
    torch = pytest.importorskip("torch")
    records, want, phases = [], [], []
    for i, (t, mode) in enumerate(zip(sizes, modes, strict=True)):
        phys = np.full((4, t, 8), -1, np.int32)
        for layer in (1, 2, 3):
            for tok in range(t):
                slots = rng.choice(10, 2, replace=False)
                while P2L[layer, slots[0]] == P2L[layer, slots[1]]:
                    slots = rng.choice(10, 2, replace=False)
                phys[layer, tok, :2] = slots
        if t > 3:
            phys[:, 1] = -1
        real = (phys >= 0).any(axis=(0, 2))
        want.append(np.stack([P2L[layer][phys[layer, real, :2]] for layer in (1, 2, 3)], axis=1))
        phases.append(np.full(int(real.sum()), {1: 0, 2: 1}.get(mode, -1)))
        records.append({"forward_pass_id": i, "rank": 0, "gatherer_key": "primary", "input_ids": [0] * t,
                        "forward_mode": mode, "topk_ids_of_layer": torch.from_numpy(phys), "misc_objects": []})
    return ({"records": records, "last_physical_to_logical_map": torch.from_numpy(P2L)},
            np.concatenate(want), np.concatenate(phases))


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_sglang_per_token_streams(tmp_path, rng, tiny, monkeypatch, layout):
    torch = pytest.importorskip("torch")
    obj, want, phase = _per_token(rng, (6, 0, 9, 1, 17, 4), (1, 1, 2, 3, 2, 1))
    if layout == "strided":  # views with other strides are read as saved
        for r in obj["records"]:
            r["topk_ids_of_layer"] = r["topk_ids_of_layer"].transpose(0, 1).contiguous().transpose(0, 1)
        obj["last_physical_to_logical_map"] = torch.from_numpy(P2L.T.copy()).t()
    p = tmp_path / "expert_distribution_recorder_1_0.pt"
    torch.save(obj, p)
    whole = read_trace(p, model=tiny)
    np.testing.assert_array_equal(whole.expert_ids, want)
    np.testing.assert_array_equal(whole.phase, phase)
    no_model = read_trace(p)
    np.testing.assert_array_equal(no_model.expert_ids, want)
    for chunk_tokens in CHUNKS:
        assert_same_trace(_streamed(p, chunk_tokens, model=tiny), whole)
        assert_same_trace(_streamed(p, chunk_tokens), no_model)
    # a dump whose tensors do not say where their bytes are is loaded whole: the same trace
    monkeypatch.setattr(sglang_io, "_offsets_known", lambda obj: False)
    for chunk_tokens in (1, 7, sys.maxsize):
        assert_same_trace(_streamed(p, chunk_tokens, model=tiny), whole)


def test_sglang_per_token_is_not_loaded_whole(tmp_path, rng, tiny, monkeypatch):
    """Only the structure is unpickled (meta tensors); the ids come from file reads of one window."""
    torch = pytest.importorskip("torch")
    obj, want, _ = _per_token(rng, (40,), (1,))
    p = tmp_path / "d.pt"
    torch.save(obj, p)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("map_location")) or real_load(*a, **k))
    reads = []
    real_block = sglang_io._PtData._block
    monkeypatch.setattr(sglang_io._PtData, "_block",
                        lambda self, t, what, first, shape, strides: reads.append(shape) or
                        real_block(self, t, what, first, shape, strides))
    inp = read_input(p, model=tiny, chunk_tokens=8)
    assert loads == ["meta"]
    reads.clear()
    got = [c.expert_ids for c in inp.chunks()]
    np.testing.assert_array_equal(np.concatenate(got), want)
    assert max(s[0] for s in reads if len(s) == 2 and s[1] == 8) == 8  # rows of 8 ids, 8 tokens at a time


def test_sglang_per_token_bad_id_late_in_the_dump(tmp_path, rng, tiny):
    torch = pytest.importorskip("torch")
    obj, _, _ = _per_token(rng, (5, 5, 5), (1, 1, 1))
    ids = obj["records"][2]["topk_ids_of_layer"].clone()
    ids[3, 4, 0] = 10
    obj["records"][2]["topk_ids_of_layer"] = ids
    p = tmp_path / "d.pt"
    torch.save(obj, p)
    with pytest.raises(InvalidInputError, match="physical expert id 10 outside") as exc:
        read_input(p, model=tiny, chunk_tokens=2)
    assert str(p) in str(exc.value)


# ---------------------------------------------------------------------------- Parquet


def test_parquet_one_big_row_group_is_read_in_bounded_batches(tmp_path, trace):
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    write_trace_parquet(p, trace, row_group_tokens=trace.num_tokens)
    assert pq.ParquetFile(p).num_row_groups == 1
    whole = read_trace(p)
    assert_same_trace(whole, trace)
    for chunk_tokens in CHUNKS:
        assert_same_trace(_streamed(p, chunk_tokens), trace)
        inp = read_input(p, chunk_tokens=chunk_tokens, gate_weights=False)
        assert inp.chunks is not None
        parts = list(inp.chunks())
        assert all(c.gate_weights is None for c in parts)
        assert sum(c.num_tokens for c in parts) == trace.num_tokens


def test_parquet_small_row_groups_are_split_never_merged(tmp_path, trace):
    p = tmp_path / "t.parquet"
    write_trace_parquet(p, trace, row_group_tokens=12)  # groups of 12, 12, 12, 12, 2
    inp = read_input(p, chunk_tokens=5)
    assert inp.chunks is not None
    assert [c.num_tokens for c in inp.chunks()] == [5, 5, 2] * 4 + [2]
