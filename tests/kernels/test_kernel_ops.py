"""The torch ops (checked wrappers, torch backend on CPU) against the NumPy reference."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _cases import make_case, reference

from placer.errors import InvalidInputError
from placer.kernels import permute, split_sizes, unpermute

# (tokens, hidden, top_k, experts, slots, per-token slot map)
SHAPES = (
    (0, 8, 2, 4, 6, False),
    (1, 1, 1, 1, 1, False),
    (5, 3, 1, 4, 4, False),
    (7, 17, 3, 5, 10, True),
    (64, 96, 2, 8, 12, False),
    (129, 130, 4, 16, 24, True),  # more tokens than one CPU chunk
    (300, 64, 8, 64, 72, False),
)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_backend_matches_reference_exactly(shape, dtype):
    *dims, per_token = shape
    slots = dims[-1]
    x, ids, smap, weights = make_case(*dims, per_token, dtype)
    rows, row_map, counts, combined = reference(x, ids, smap, weights, slots)
    got = permute(x, ids, smap, slots, backend="torch")
    assert got.rows.dtype == dtype and got.row_map.dtype == torch.int64
    assert torch.equal(got.rows, rows)
    assert torch.equal(got.row_map, row_map)
    assert torch.equal(got.slot_counts, counts)
    out = unpermute(got.rows, got.row_map, weights, backend="torch")
    assert out.dtype == dtype and out.shape == x.shape
    # Same products and the same k order as the reference: equal to the last bit.
    assert torch.equal(out, combined.to(dtype))
    fp32 = unpermute(got.rows, got.row_map, weights, out_dtype=torch.float32, backend="torch")
    assert torch.equal(fp32, combined)


def test_roundtrip_restores_tokens_and_splits_by_rank():
    x, ids, smap, _ = make_case(50, 32, 4, 8, 12, False, torch.float32, seed=1)
    p = permute(x, ids, smap, 12)
    assert p.rows.shape == (200, 32)
    assert torch.equal(split_sizes(p.slot_counts, 3), p.slot_counts.view(4, 3).sum(1))
    assert int(split_sizes(p.slot_counts, 4).sum()) == 200
    slots_of_rows = torch.repeat_interleave(torch.arange(12), p.slot_counts)
    assert torch.equal(p.rows, x[torch.argsort(p.row_map.view(-1)) // 4])
    assert torch.equal(smap.long()[ids.long()].view(-1)[torch.argsort(p.row_map.view(-1))],
                       slots_of_rows)
    back = unpermute(p.rows, p.row_map, torch.full((50, 4), 0.25))
    torch.testing.assert_close(back, x, rtol=1e-6, atol=1e-6)


def test_repeated_calls_are_bitwise_identical():
    x, ids, smap, weights = make_case(257, 48, 8, 32, 40, False, torch.bfloat16, seed=2)
    a = permute(x, ids, smap, 40)
    b = permute(x, ids, smap, 40)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert torch.equal(unpermute(a.rows, a.row_map, weights), unpermute(b.rows, b.row_map, weights))


def _permute_args():
    x, ids, smap, _ = make_case(4, 8, 2, 4, 6, False, torch.float32)
    return {"x": x, "topk_ids": ids, "slot_map": smap, "num_slots": 6}


@pytest.mark.parametrize(("change", "match"), [
    ({"x": torch.zeros(4, 8, dtype=torch.float64)}, "x has dtype torch.float64"),
    ({"x": torch.zeros(4)}, "x must be 2-D"),
    ({"x": [[0.0]]}, "x must be a torch.Tensor"),
    ({"topk_ids": torch.zeros(3, 2, dtype=torch.int64)}, "topk_ids has 3 tokens, x has 4"),
    ({"topk_ids": torch.zeros(4, 2)}, "topk_ids has dtype torch.float32"),
    ({"topk_ids": torch.full((4, 2), 4)}, r"topk_ids must lie in \[0, 4\), found .*\[4, 4\]"),
    ({"topk_ids": torch.full((4, 2), -1)}, r"topk_ids must lie in \[0, 4\)"),
    ({"slot_map": torch.tensor([0, 1, 2, 6])}, r"slot_map must lie in \[0, 6\)"),
    ({"slot_map": torch.zeros(3, 4, dtype=torch.int64)}, "per-token slot_map needs 4 rows"),
    ({"slot_map": torch.zeros(1, 1, 4, dtype=torch.int64)}, "slot_map must be a 1-D"),
    ({"num_slots": 0}, "num_slots must be a positive int"),
    ({"num_slots": 6.0}, "num_slots must be a positive int"),
])
def test_permute_rejects_bad_input(change, match):
    args = _permute_args() | change
    with pytest.raises(InvalidInputError, match=match) as info:
        permute(**args)
    assert isinstance(info.value, ValueError) and str(info.value).startswith("permute: ")


@pytest.mark.parametrize(("change", "match"), [
    ({"rows": torch.zeros(8, 8, dtype=torch.int32)}, "rows has dtype torch.int32"),
    ({"row_map": torch.full((4, 2), 8)}, r"row_map must lie in \[0, 8\)"),
    ({"row_map": torch.zeros(4, 2, dtype=torch.float32)}, "row_map has dtype"),
    ({"weights": torch.ones(4, 3)}, r"weights has shape \(4, 3\), row_map \(4, 2\)"),
    ({"out_dtype": torch.int8}, "out_dtype torch.int8 is not a supported"),
    ({"backend": "cuda"}, "unknown backend 'cuda'"),
])
def test_unpermute_rejects_bad_input(change, match):
    args = {"rows": torch.zeros(8, 8), "row_map": torch.arange(8).view(4, 2),
            "weights": torch.ones(4, 2)} | change
    with pytest.raises(InvalidInputError, match=match):
        unpermute(**args)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InvalidInputError, match="needs CUDA tensors"):
        permute(**_permute_args(), backend="triton")


def test_importing_placer_kernels_imports_neither_torch_nor_triton():
    code = ("import sys, placer, placer.kernels, placer.kernels.reference; "
            "bad = {'torch', 'triton'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
