"""Assignment (perfect matching of a square matrix), the one place placer solves it.

:func:`max_weight_assignment` takes integer weights and runs OR-Tools' exact linear sum
assignment: the context-coherent solvers (:mod:`placer.ilp.exact`: GPU labels of consecutive
layers) and the live re-placement planner (:mod:`placer.runtime.plan`: which requested GPU lands
on which physical one). :func:`min_cost_assignment` takes float costs, which OR-Tools' integer
solver cannot take without rounding, and runs the Hungarian method (MoETuner's bottleneck
cluster-to-GPU mapping, :mod:`placer.ilp.moetuner`).
"""

from __future__ import annotations

import numpy as np
from ortools.graph.python import linear_sum_assignment

__all__ = ["max_weight_assignment", "min_cost_assignment"]


def max_weight_assignment(weight: np.ndarray) -> np.ndarray:
    """Row -> column assignment of largest total integer ``weight``.

    ``weight``: int [n, n]. Returns int64 [n] ``sigma`` maximising ``sum_i weight[i, sigma[i]]``
    (OR-Tools minimises ``max(weight) - weight``: the same optimum, all costs non-negative).
    Ties go to whichever optimum OR-Tools finds first; a caller that wants a particular one
    breaks ties in the weights.
    """
    w = np.asarray(weight, dtype=np.int64)
    n = w.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    solver = linear_sum_assignment.SimpleLinearSumAssignment()
    tails, heads = np.divmod(np.arange(n * n, dtype=np.int64), n)
    solver.add_arcs_with_cost(tails, heads, (w.max() - w).ravel())
    status = solver.solve()
    if status != solver.OPTIMAL:
        raise RuntimeError(f"linear sum assignment failed with status {status}")
    return np.array([solver.right_mate(i) for i in range(n)], dtype=np.int64)


def min_cost_assignment(cost: np.ndarray) -> np.ndarray:
    """Row -> column assignment of least total cost (Hungarian method, shortest augmenting path).

    ``cost`` float [n, n]; returns int64 [n] with ``cost[i, out[i]]`` summed minimal.
    """
    n = cost.shape[0]
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)  # match[j] = row (1-based) assigned to column j
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            free = ~used[1:]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    out = np.empty(n, dtype=np.int64)
    out[match[1:] - 1] = np.arange(n)
    return out
