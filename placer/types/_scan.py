"""Compiled check of routing ids (:class:`placer.types.RoutingTrace`): one pass for the range and
for an expert picked twice by one token in one layer, instead of a min, a max and a sort."""

from __future__ import annotations

import numpy as np

from placer._numba import njit


@njit
def scan_ids(ids):  # pragma: no cover - numba
    """``(lo, hi, dup)`` of integer ``ids`` [T, L, K]: the smallest and largest id, and whether
    some row ``ids[t, l]`` holds an id twice (``lo``/``hi`` are 0 for an empty array)."""
    t_n, l_n, k_n = ids.shape
    lo = 0
    hi = 0
    first = True
    dup = False
    for t in range(t_n):
        for layer in range(l_n):
            for a in range(k_n):
                x = ids[t, layer, a]
                if first:
                    lo = x
                    hi = x
                    first = False
                elif x < lo:
                    lo = x
                elif x > hi:
                    hi = x
                for b in range(a):
                    if ids[t, layer, b] == x:
                        dup = True
    return lo, hi, dup


def scan(ids: np.ndarray) -> tuple[int, int, bool]:
    """:func:`scan_ids` as Python ints and a bool."""
    lo, hi, dup = scan_ids(ids)
    return int(lo), int(hi), bool(dup)


__all__ = ["scan", "scan_ids"]
