"""Triton kernels for permute (scatter: load a token once, store its k rows) and unpermute
(gather-reduce: load a token's k rows, weight them, sum in float32, store once; no atomics).

Imported only by :mod:`placer.kernels.ops`, never by ``import placer``. On a CPU machine
the kernels run under Triton's interpreter, which is chosen when ``triton`` is first imported:
set ``TRITON_INTERPRET=1`` before that (the tests do, in ``tests/kernels/conftest.py``).

The launchers here trust their arguments: shapes, dtypes, devices and id ranges are checked by
the host wrappers in :mod:`placer.kernels.ops`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# One program per (token, hidden block). 1024 elements = 2 KiB of bf16 per load/store.
BLOCK_H = 1024


def _block(hidden: int) -> int:
    return min(BLOCK_H, triton.next_power_of_2(max(hidden, 16)))


# x:        (T, H), float16 / bfloat16 / float32, contiguous. Token inputs.
# row_map:  (T, K), int64, contiguous. Destination row of copy k of token t, in [0, N).
# out:      (N, H), dtype of x, contiguous. Permuted rows; each (t, k) row written once.
# hidden:   int, H.
# TOP_K:    constexpr int, K.
# BLOCK:    constexpr int, power of two >= 16: hidden elements per program.
# Grid:     (T, cdiv(H, BLOCK)).
@triton.jit
def _permute_kernel(x, row_map, out, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hidden
    vals = tl.load(x + token * hidden + offs, mask=mask)
    for k in tl.static_range(TOP_K):
        row = tl.load(row_map + token * TOP_K + k)
        tl.store(out + row * hidden + offs, vals, mask=mask)


# rows:     (N, H), float16 / bfloat16 / float32, contiguous. Permuted rows.
# row_map:  (T, K), int64, contiguous. Row of copy k of token t, in [0, N).
# weights:  (T, K), float32, contiguous. Combine weight of copy k of token t.
# out:      (T, H), float16 / bfloat16 / float32, contiguous. Combined tokens.
# hidden:   int, H.
# TOP_K:    constexpr int, K.
# BLOCK:    constexpr int, power of two >= 16: hidden elements per program.
# Grid:     (T, cdiv(H, BLOCK)). Accumulates in float32 in the order k = 0..K-1.
@triton.jit
def _unpermute_kernel(rows, row_map, weights, out, hidden, TOP_K: tl.constexpr,
                      BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        row = tl.load(row_map + token * TOP_K + k)
        w = tl.load(weights + token * TOP_K + k)
        vals = tl.load(rows + row * hidden + offs, mask=mask, other=0.0).to(tl.float32)
        acc += vals * w
    tl.store(out + token * hidden + offs, acc.to(out.dtype.element_ty), mask=mask)


def permute_rows(x: torch.Tensor, row_map: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Launch :func:`_permute_kernel`. x (T, H); row_map int64 (T, K); out (N, H), x's dtype.
    Returns ``out``."""
    tokens, hidden = x.shape
    if tokens and hidden and row_map.shape[1]:
        block = _block(hidden)
        grid = (tokens, triton.cdiv(hidden, block))
        _permute_kernel[grid](x, row_map, out, hidden, TOP_K=row_map.shape[1], BLOCK=block)
    return out


def unpermute_rows(rows: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
    """Launch :func:`_unpermute_kernel`. rows (N, H); row_map int64 (T, K); weights float32
    (T, K); out (T, H). Returns ``out``."""
    tokens, top_k = row_map.shape
    hidden = rows.shape[1]
    if top_k == 0:
        return out.zero_()
    if tokens and hidden:
        block = _block(hidden)
        grid = (tokens, triton.cdiv(hidden, block))
        _unpermute_kernel[grid](rows, row_map, weights, out, hidden, TOP_K=top_k, BLOCK=block)
    return out
