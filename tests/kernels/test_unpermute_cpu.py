"""The numba CPU unpermute equals the chunked torch path bit for bit (bfloat16 / float32)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from placer.kernels.ops import _unpermute_cpu, _unpermute_torch  # noqa: E402


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 3, 5), (64, 2, 96), (33, 8, 130)])
def test_numba_unpermute_equals_torch_path(in_dtype, out_dtype, shape):
    tokens, top_k, hidden = shape
    gen = torch.Generator().manual_seed(tokens * 131 + top_k * 7 + hidden)
    rows = (torch.randn(tokens * top_k + 3, hidden, generator=gen) * 100).to(in_dtype)
    rows[0, 0] = float("nan")
    rows[1, 0] = float("inf")
    row_map = torch.randperm(rows.shape[0], generator=gen)[: tokens * top_k].reshape(tokens, top_k)
    weights = torch.rand(tokens, top_k, generator=gen)
    a = _unpermute_cpu(rows, row_map, weights, torch.empty(tokens, hidden, dtype=out_dtype))
    b = _unpermute_torch(rows, row_map, weights, torch.empty(tokens, hidden, dtype=out_dtype))
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(torch.nan_to_num(a.float()), torch.nan_to_num(b.float()))
