"""Shared inputs of the torch and Triton kernel tests (not a test module)."""

from __future__ import annotations

import numpy as np
import torch

from placer.kernels import permute_reference, unpermute_reference


def make_case(tokens: int, hidden: int, top_k: int, experts: int, slots: int,
              per_token: bool, dtype: torch.dtype, seed: int = 0):
    """(x (T, H), ids (T, K) distinct per token, slot_map (E,) or (T, E), weights (T, K))."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((tokens, hidden), dtype=np.float32)).to(dtype)
    ids = np.array([rng.choice(experts, top_k, replace=False) for _ in range(tokens)],
                   dtype=np.int64).reshape(tokens, top_k)
    shape = (tokens, experts) if per_token else (experts,)
    smap = rng.integers(0, slots, size=shape)
    weights = torch.from_numpy(rng.random((tokens, top_k), dtype=np.float32))
    return x, torch.from_numpy(ids).to(torch.int32), torch.from_numpy(smap), weights


def reference(x, ids, smap, weights, slots):
    """NumPy results as torch tensors: (rows, row_map, counts, combined float32)."""
    rows, row_map, counts = permute_reference(x.float().numpy(), ids.numpy(), smap.numpy(), slots)
    combined = unpermute_reference(rows, row_map, weights.numpy())
    return (torch.from_numpy(rows).to(x.dtype), torch.from_numpy(row_map),
            torch.from_numpy(counts), torch.from_numpy(combined))
