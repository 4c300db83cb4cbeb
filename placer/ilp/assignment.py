"""Maximum-weight perfect matching of a square matrix: OR-Tools' exact linear sum assignment.

Used by the context-coherent solvers (:mod:`placer.ilp.exact`: GPU labels of consecutive layers)
and the live re-placement planner (:mod:`placer.runtime.plan`: which requested GPU lands on
which physical one).
"""

from __future__ import annotations

import numpy as np
from ortools.graph.python import linear_sum_assignment

__all__ = ["max_weight_assignment"]


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
