"""Counting kernels behind :class:`placer.profiling.stats.StatsBuilder` (plain numpy)."""

from __future__ import annotations

import numpy as np


def accumulate(ids: np.ndarray, load: np.ndarray, top1: np.ndarray | None, pairs: np.ndarray,
               coact: np.ndarray) -> None:
    """Add one chunk's counts in place.

    ``ids``: int [T, L, K], top-1 first when ``top1`` is given. ``load`` [L, E], ``top1`` and
    ``pairs`` [L-1, E, E], ``coact`` [L, E, E] (symmetric, zero diagonal).
    """
    t, num_layers, k = ids.shape
    e = load.shape[1]
    if t == 0:
        return
    ids = ids.astype(np.int64)
    layer = np.arange(num_layers)[None, :, None]
    load += np.bincount((layer * e + ids).ravel(), minlength=num_layers * e).reshape(num_layers, e)
    if num_layers > 1:
        lt = np.arange(num_layers - 1)[None, :]
        if top1 is not None:
            key = (lt * e + ids[:, :-1, 0]) * e + ids[:, 1:, 0]
            top1 += np.bincount(key.ravel(), minlength=(num_layers - 1) * e * e).reshape(top1.shape)
        key = ((lt[:, :, None, None] * e + ids[:, :-1, :, None]) * e + ids[:, 1:, None, :])
        pairs += np.bincount(key.ravel(), minlength=(num_layers - 1) * e * e).reshape(pairs.shape)
    if k > 1:
        a, b = np.triu_indices(k, 1)
        key = (layer * e + ids[:, :, a]) * e + ids[:, :, b]
        c = np.bincount(key.ravel(), minlength=num_layers * e * e).reshape(coact.shape)
        coact += c + c.transpose(0, 2, 1)
