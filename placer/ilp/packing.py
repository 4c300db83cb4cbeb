"""Packing a re-solve's replicas into the running placement (:func:`keep_in_place`), the
candidates :func:`placer.ilp.movement.solve_from` builds layer by layer.

Compiled (:func:`_pack_layers`) once numba's cache holds the kernel (``python -m placer._warm``,
run by ``make install``), else the same packing in Python and numpy (:func:`_pack_numpy`), so
that a cold cache compiles nothing inside a solve's time limit. Both give the same rows
(``tests/ilp/test_keep_in_place_kernel.py``).
"""

from __future__ import annotations

import numpy as np

from placer._numba import cache_holds, njit
from placer.errors import InvalidInputError
from placer.types import Placement
from placer.validate import check_placement

__all__ = ["keep_in_place"]


def keep_in_place(old: Placement, target: Placement, load: np.ndarray, *, tolerance: float = 0.05) -> Placement:
    """``target``'s replica counts packed to keep ``old``'s experts on their GPUs.

    Per layer, a replica's load is its expert's load over its replica count:

    1. **Keep**: every replica an old GPU already holds, heaviest first, stays on that GPU while
       the GPU's load stays within ``(1 + tolerance)`` times the mean GPU load and its slots allow.
    2. **Fill**: the remaining replicas, heaviest first, go to the least-loaded GPU with a free
       slot that does not hold that expert. When every free slot is on a GPU holding it, a
       replica ``y`` of a GPU without it moves to the free slot (where ``y`` is not) and the
       expert takes its place; only an expert with more replicas than GPUs can end up twice on
       one GPU.

    Ties go to the lower GPU index, then the lower expert index.

    Parameters
    ----------
    old : Placement, what runs now, ``[L, P]``.
    target : Placement, the balanced re-solve (e.g. EPLB on the new load), same shape.
    load : float [L, E], the new load the re-solve balanced.
    tolerance : float, how far above the mean GPU load a kept replica may push its GPU.

    Returns
    -------
    Placement, ``[L, P]``, validated; each expert has ``target``'s replica count.
    """
    load = np.asarray(load, dtype=np.float64)
    if old.physical_to_logical.shape != target.physical_to_logical.shape or \
            old.slots_per_gpu != target.slots_per_gpu or old.num_experts != target.num_experts:
        raise InvalidInputError("the running placement has another shape than the re-solve's", source="--from")
    pack = _pack_compiled if cache_holds(_pack_layers) else _pack_numpy  # a cold cache compiles nothing
    return check_placement(Placement(pack(old, target, load, tolerance), old.slots_per_gpu, old.num_experts))


def _pack_compiled(old: Placement, target: Placement, load: np.ndarray, tolerance: float) -> np.ndarray:
    """:func:`keep_in_place`'s rows, int64 [L, P], packed by :func:`_pack_layers`."""
    g, s, e = old.num_gpus, old.slots_per_gpu, old.num_experts
    cnt = target.logcnt()
    w = load / cnt  # [L, E] per-replica load
    cap = np.array([(1.0 + tolerance) * float((w_l * c_l).sum()) / g for w_l, c_l in zip(w, cnt, strict=True)])
    old_p2l = old.physical_to_logical.astype(np.int64)
    rows = np.arange(old.num_layers)[:, None]
    slot_gpu = np.broadcast_to(np.arange(old.num_slots) // s, old_p2l.shape)
    keep_order = np.lexsort((old_p2l, slot_gpu, -w[rows, old_p2l]), axis=-1)  # heaviest, then GPU, then expert
    fill_order = np.lexsort((np.broadcast_to(np.arange(e), w.shape), -w), axis=-1)  # heaviest, then expert
    return _pack_layers(old_p2l, cnt, w, cap, keep_order, fill_order, s).reshape(old_p2l.shape)


@njit
def _pack_layers(old_p2l, cnt, w, cap, keep_order, fill_order, s):  # pragma: no cover - numba
    """:func:`keep_in_place`'s packing. ``old_p2l`` int64 [L, P]; ``cnt`` int64 [L, E] the
    target's replica counts; ``w`` float64 [L, E] per-replica loads; ``cap`` float64 [L] the keep
    step's GPU load cap; ``keep_order`` [L, P] the old slots in keep order; ``fill_order`` [L, E]
    the experts in fill order. Returns int64 [L, G, S]: each GPU's row in the order it was packed."""
    num_layers, num_slots = old_p2l.shape
    g, e = num_slots // s, cnt.shape[1]
    out = np.empty((num_layers, g, s), dtype=np.int64)
    for layer in range(num_layers):
        wl = w[layer]
        rows = out[layer]
        used = np.zeros(g, dtype=np.int64)
        gpu_load = np.zeros(g)
        quota = cnt[layer].copy()
        for i in keep_order[layer]:
            gpu, x = i // s, old_p2l[layer, i]
            if quota[x] and used[gpu] < s and not _holds(rows, used, gpu, x) and gpu_load[gpu] + wl[x] <= cap[layer]:
                rows[gpu, used[gpu]] = x
                used[gpu] += 1
                quota[x] -= 1
                gpu_load[gpu] += wl[x]
        holds = np.zeros((g, e), dtype=np.bool_)  # kept beside rows: a swap clears it for a doubled copy
        for gpu in range(g):
            for j in range(used[gpu]):
                holds[gpu, rows[gpu, j]] = True
        for x in fill_order[layer]:
            for _ in range(quota[x]):
                _fill(rows, used, holds, gpu_load, wl, x)
    return out


@njit
def _holds(rows, used, gpu, x):  # pragma: no cover - numba
    """Whether ``gpu``'s row holds ``x``."""
    for j in range(used[gpu]):
        if rows[gpu, j] == x:
            return True
    return False


@njit
def _fill(rows, used, holds, gpu_load, w, x):  # pragma: no cover - numba
    """Put one replica of ``x`` on a GPU without it (:func:`keep_in_place`, step 2)."""
    g, s = rows.shape
    best = -1  # the least-loaded GPU with a free slot, without x; the lowest index on ties
    for k in range(g):
        if used[k] < s and not holds[k, x] and (best < 0 or gpu_load[k] < gpu_load[best]):
            best = k
    if best >= 0:
        _put(rows, used, holds, gpu_load, w, best, x)
        return
    by_load = np.arange(g)  # ascending load, then index (an insertion sort)
    for i in range(1, g):
        k = by_load[i]
        j = i
        while j > 0 and gpu_load[by_load[j - 1]] > gpu_load[k]:
            by_load[j] = by_load[j - 1]
            j -= 1
        by_load[j] = k
    for f in by_load:
        if used[f] == s:
            continue
        for h in by_load:  # every free GPU holds x: a full GPU without it hands one of its experts over
            if used[h] < s or _holds(rows, used, h, x):
                continue
            y = -1  # h's lightest expert (the lowest on ties) that f lacks
            for j in range(s):
                c = rows[h, j]
                if not _holds(rows, used, f, c) and (y < 0 or w[c] < w[y] or (w[c] == w[y] and c < y)):
                    y = c
            if y < 0:
                continue
            at = 0
            while rows[h, at] != y:
                at += 1
            for j in range(at, s - 1):  # list.remove(y), then x appended
                rows[h, j] = rows[h, j + 1]
            rows[h, s - 1] = x
            rows[f, used[f]] = y
            holds[h, y], holds[f, y], holds[h, x] = False, True, True
            used[f] += 1
            gpu_load[h] += w[x] - w[y]
            gpu_load[f] += w[y]
            return
    best = -1  # more replicas than GPUs
    for k in range(g):
        if used[k] < s and (best < 0 or gpu_load[k] < gpu_load[best]):
            best = k
    _put(rows, used, holds, gpu_load, w, best, x)


@njit
def _put(rows, used, holds, gpu_load, w, gpu, x):  # pragma: no cover - numba
    """Append ``x`` to ``gpu``'s row."""
    rows[gpu, used[gpu]] = x
    used[gpu] += 1
    holds[gpu, x] = True
    gpu_load[gpu] += w[x]


def _pack_numpy(old: Placement, target: Placement, load: np.ndarray, tolerance: float) -> np.ndarray:
    """:func:`_pack_layers` in Python and numpy (the same rows), for a cold numba cache. int [L, P]."""
    load = np.asarray(load, dtype=np.float64)
    g, s, e = old.num_gpus, old.slots_per_gpu, old.num_experts
    cnt = target.logcnt()
    out = np.empty_like(old.physical_to_logical)
    for layer in range(old.num_layers):
        w = load[layer] / cnt[layer]
        cap = (1.0 + tolerance) * float((w * cnt[layer]).sum()) / g
        quota = cnt[layer].copy()
        gpu_load = np.zeros(g)
        rows: list[list[int]] = [[] for _ in range(g)]
        old_rows = old.physical_to_logical[layer].reshape(g, s)
        candidates = [(w[x], gpu, int(x)) for gpu in range(g) for x in old_rows[gpu]]
        for weight, gpu, x in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
            if quota[x] and x not in rows[gpu] and len(rows[gpu]) < s and gpu_load[gpu] + weight <= cap:
                rows[gpu].append(x)
                quota[x] -= 1
                gpu_load[gpu] += weight
        holds = np.zeros((g, e), dtype=bool)
        for gpu, row in enumerate(rows):
            holds[gpu, row] = True
        used = np.array([len(r) for r in rows], dtype=np.int64)
        for x in sorted((int(x) for x in np.repeat(np.arange(e), quota)), key=lambda x: (-w[x], x)):
            _fill_numpy(rows, holds, used, gpu_load, w, s, x)
        out[layer] = np.concatenate(rows)
    return out


def _fill_numpy(rows, holds, used, gpu_load, w, s, x) -> None:
    """:func:`_fill` on lists."""
    def put(gpu: int) -> None:
        rows[gpu].append(x)
        holds[gpu, x] = True
        used[gpu] += 1
        gpu_load[gpu] += w[x]

    free = used < s
    without = free & ~holds[:, x]
    if without.any():
        put(int(np.argmin(np.where(without, gpu_load, np.inf))))
        return
    g = len(rows)
    for f in sorted(np.flatnonzero(free).tolist(), key=lambda k: (gpu_load[k], k)):
        for h in sorted(range(g), key=lambda k: (gpu_load[k], k)):
            if len(rows[h]) < s or x in rows[h]:
                continue
            y = next((y for y in sorted(rows[h], key=lambda y: (w[y], y)) if y not in rows[f]), None)
            if y is None:
                continue
            rows[h].remove(y)
            rows[f].append(y)
            rows[h].append(x)
            holds[h, y], holds[f, y], holds[h, x] = False, True, True
            used[f] += 1
            gpu_load[h] += w[x] - w[y]
            gpu_load[f] += w[y]
            return
    put(min(np.flatnonzero(free).tolist(), key=lambda k: (gpu_load[k], k)))
