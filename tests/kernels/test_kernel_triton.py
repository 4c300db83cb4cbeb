"""Triton kernels against the NumPy reference: under the interpreter on CPU (small grids, at
most ~200 programs per case), compiled on CUDA (``gpu`` marker, deselected by default)."""

from __future__ import annotations

import pytest
import torch
from _cases import make_case, reference

from placer.kernels import permute, unpermute

pytest.importorskip("triton")
from placer.kernels import _triton  # noqa: E402  (after the skip: needs triton)

# (tokens, hidden, top_k, experts, slots, per-token slot map); programs = tokens * blocks.
INTERPRETER_SHAPES = (
    (0, 8, 2, 4, 6, False),
    (5, 3, 1, 4, 4, False),
    (16, 64, 2, 8, 12, True),
    (33, 130, 4, 16, 24, False),
    (8, 256, 8, 64, 72, False),
)
GPU_SHAPES = INTERPRETER_SHAPES + (
    (1000, 2048, 2, 8, 12, False),
    (2048, 7168, 8, 256, 288, False),
    (777, 4097, 6, 64, 80, True),
)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(shape, dtype, device):
    *dims, per_token = shape
    slots = dims[-1]
    x, ids, smap, weights = make_case(*dims, per_token, dtype)
    rows, row_map, counts, combined = reference(x, ids, smap, weights, slots)
    dev = [t.to(device) for t in (x, ids, smap, weights)]
    got = permute(*dev[:3], slots, backend="triton")
    assert torch.equal(got.rows.cpu(), rows)
    assert torch.equal(got.row_map.cpu(), row_map)
    assert torch.equal(got.slot_counts.cpu(), counts)
    out = unpermute(got.rows, got.row_map, dev[3], out_dtype=torch.float32, backend="triton")
    # Compiled, `acc += v * w` may become a fused multiply-add: equal up to float32 rounding.
    torch.testing.assert_close(out.cpu(), combined, rtol=2e-6, atol=2e-6)
    low = unpermute(got.rows, got.row_map, dev[3], backend="triton")
    assert low.dtype == dtype
    torch.testing.assert_close(low.cpu().float(), combined.to(dtype).float(),
                               rtol=2 ** -7, atol=1e-3)
    again = permute(*dev[:3], slots, backend="triton")
    assert torch.equal(again.rows, got.rows)  # deterministic, run to run
    assert torch.equal(unpermute(again.rows, again.row_map, dev[3], backend="triton"), low)


interpreter = pytest.mark.skipif(not _triton.INTERPRET, reason="needs TRITON_INTERPRET=1 (set by "
                                 "conftest when no CUDA device exists)")


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", INTERPRETER_SHAPES, ids=str)
def test_interpreted_kernels_match_reference(shape, dtype):
    _check(shape, dtype, "cpu")


@interpreter
def test_interpreted_kernels_split_the_hidden_dimension(monkeypatch):
    monkeypatch.setattr(_triton, "BLOCK_H", 64)  # H = 130 -> 3 blocks; 20 x 3 = 60 programs
    _check((20, 130, 3, 8, 10, False), torch.bfloat16, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or _triton.INTERPRET,
                    reason="needs a CUDA GPU and compiled Triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_cuda_kernels_match_reference(shape, dtype):
    _check(shape, dtype, "cuda")
    *dims, per_token = shape
    x, ids, smap, weights = (t.cuda() for t in make_case(*dims, per_token, dtype))
    assert permute(x, ids, smap, dims[-1]).rows.is_cuda  # auto picks triton on CUDA
    a = permute(x, ids, smap, dims[-1], backend="torch")
    b = permute(x, ids, smap, dims[-1], backend="triton")
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    torch.testing.assert_close(unpermute(a.rows, a.row_map, weights, backend="torch").float(),
                               unpermute(b.rows, b.row_map, weights, backend="triton").float(),
                               rtol=2 ** -7, atol=1e-3)

