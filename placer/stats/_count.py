"""Counting kernels behind :class:`placer.stats.StatsBuilder`.

:func:`accumulate` runs a numba kernel; :func:`accumulate_numpy` is the plain-numpy reference
(and the fallback when numba cannot be imported). Both add one chunk's counts in place and give
identical results.

The numba kernel loops layers outer and tokens inner, so the matrices of one layer (``[E, E]``
pairs and co-activation) stay in cache while every token of the chunk passes; for chunks large
enough to pay for it, it counts into int32 scratch matrices (half the cache footprint; the
co-activation scratch holds the upper triangle only, half the increments) and adds them to the
int64 totals once per layer.
"""

from __future__ import annotations

import numpy as np

from placer._numba import HAVE_NUMBA, njit  # numba is a core dependency; numpy without it

_INT32_MAX = np.iinfo(np.int32).max


def accumulate_numpy(ids: np.ndarray, load: np.ndarray, top1: np.ndarray | None, pairs: np.ndarray,
                     coact: np.ndarray) -> None:
    """Add one chunk's counts in place (plain numpy; the reference of :func:`accumulate`).

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


if HAVE_NUMBA:
    @njit
    def _ids_in_range(ids, e):
        flat = ids.ravel()
        for i in range(flat.shape[0]):
            v = flat[i]
            if v < 0 or v >= e:
                return False
        return True

    @njit
    def _count_transitions(ids, layer, lo, hi, top1, has_top1, out):
        """Add the layer -> layer + 1 transitions of tokens ``lo .. hi - 1``: top-1 into ``top1``,
        every (a, b) expert pair into ``out`` [E, E] (int64 totals or int32 scratch)."""
        k = ids.shape[2]
        for i in range(lo, hi):
            if has_top1:
                top1[layer, ids[i, layer, 0], ids[i, layer + 1, 0]] += 1
            for a in range(k):
                row = out[ids[i, layer, a]]
                for b in range(k):
                    row[ids[i, layer + 1, b]] += 1

    @njit
    def _kernel_direct(ids, load, top1, has_top1, pairs, coact):
        """Small chunks: increment the int64 totals directly."""
        t, num_layers, k = ids.shape
        for layer in range(num_layers):
            ld = load[layer]
            cu = coact[layer]
            for i in range(t):
                for a in range(k):
                    x = ids[i, layer, a]
                    ld[x] += 1
                    for b in range(a + 1, k):
                        y = ids[i, layer, b]
                        cu[x, y] += 1
                        cu[y, x] += 1
            if layer + 1 < num_layers:
                _count_transitions(ids, layer, 0, t, top1, has_top1, pairs[layer])

    @njit
    def _kernel_scratch(ids, load, top1, has_top1, pairs, coact, segment):
        """Large chunks: int32 scratch per layer (coact upper triangle), flushed per layer.

        ``segment`` tokens at most between flushes keep every int32 cell below 2**31.
        """
        t, num_layers, k = ids.shape
        e = load.shape[1]
        cs = np.zeros((e, e), np.int32)
        ps = np.zeros((e, e), np.int32)
        for layer in range(num_layers):
            ld = load[layer]
            cu = coact[layer]
            for s0 in range(0, t, segment):
                s1 = min(t, s0 + segment)
                cs[:] = 0
                for i in range(s0, s1):
                    for a in range(k):
                        x = ids[i, layer, a]
                        ld[x] += 1
                        for b in range(a + 1, k):
                            y = ids[i, layer, b]
                            cs[min(x, y), max(x, y)] += 1
                if k > 1:
                    for x in range(e):
                        for y in range(e):
                            cu[x, y] += cs[x, y] + cs[y, x]
                if layer + 1 < num_layers:
                    ps[:] = 0
                    _count_transitions(ids, layer, s0, s1, top1, has_top1, ps)
                    pr = pairs[layer]
                    for x in range(e):
                        for y in range(e):
                            pr[x, y] += ps[x, y]


def _numba_ready(load: np.ndarray, top1: np.ndarray | None, pairs: np.ndarray, coact: np.ndarray) -> bool:
    arrays = [load, pairs, coact] + ([top1] if top1 is not None else [])
    return all(a.dtype == np.int64 and a.flags.c_contiguous and a.flags.writeable for a in arrays)


def accumulate(ids: np.ndarray, load: np.ndarray, top1: np.ndarray | None, pairs: np.ndarray,
               coact: np.ndarray) -> None:
    """Add one chunk's counts in place (numba kernel; same contract as :func:`accumulate_numpy`).

    ``ids``: int [T, L, K], top-1 first when ``top1`` is given. ``load`` [L, E], ``top1`` and
    ``pairs`` [L-1, E, E], ``coact`` [L, E, E] (symmetric, zero diagonal). Ids outside
    ``[0, E)`` raise ``ValueError``. Falls back to :func:`accumulate_numpy` without numba or
    when the count arrays are not writeable C-contiguous int64.
    """
    t, num_layers, k = ids.shape
    if t == 0:
        return
    if not HAVE_NUMBA or not _numba_ready(load, top1, pairs, coact):
        accumulate_numpy(ids, load, top1, pairs, coact)
        return
    e = load.shape[1]
    if ids.dtype not in (np.int16, np.int32, np.int64):
        ids = ids.astype(np.int64)
    ids = np.ascontiguousarray(ids)
    if not _ids_in_range(ids, e):
        raise ValueError(f"expert ids must be in [0, {e})")
    has_top1 = top1 is not None
    top1_arr = top1 if has_top1 else np.zeros((1, 1, 1), np.int64)
    if t * k * k < e * e:  # scratch zeroing and flushing would cost more than the counting
        _kernel_direct(ids, load, top1_arr, has_top1, pairs, coact)
    else:
        _kernel_scratch(ids, load, top1_arr, has_top1, pairs, coact, max(1, _INT32_MAX // (k * k)))
