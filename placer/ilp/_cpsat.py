"""CP-SAT plumbing shared by every CP-SAT formulation: parameters, hints, status triage.

Tests pass ``deterministic_time`` (CP-SAT ``max_deterministic_time``) and a fixed worker count,
never a wall-clock limit, so their outputs are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:  # imported where a model is solved (with pandas: 0.4-0.8 s a process)
    from ortools.sat.python import cp_model


@dataclass(frozen=True)
class CpSatOutcome:
    """Triage of one CP-SAT run. ``status`` is optimal / feasible / timeout / infeasible / unknown."""

    solver: cp_model.CpSolver
    status: str
    objective: float | None
    bound: float | None
    wall_time_s: float


def run_cpsat(model: cp_model.CpModel, *, time_limit_s: float | None = None,
              deterministic_time: float | None = None, num_workers: int = 1, seed: int = 0,
              log: bool = False) -> CpSatOutcome:
    """Solve ``model`` and map CP-SAT's status onto placer's statuses.

    ``feasible`` means a solution without proof of optimality and no limit reached (never
    happens with CP-SAT's own stop rules); a run stopped by a limit with a solution is ``timeout``;
    a run stopped by a limit without one is ``unknown`` (the caller keeps its heuristic).
    """
    from ortools.sat.python import cp_model  # deferred: see the import above

    solver = cp_model.CpSolver()
    params = solver.parameters
    params.num_workers = int(num_workers)
    params.random_seed = int(seed)
    params.log_search_progress = bool(log)
    if time_limit_s is not None:
        params.max_time_in_seconds = float(time_limit_s)
    if deterministic_time is not None:
        params.max_deterministic_time = float(deterministic_time)
    code = solver.solve(model)
    has_objective = model.has_objective()
    if code == cp_model.OPTIMAL:
        status = "optimal"
    elif code == cp_model.FEASIBLE:
        status = "timeout"
    elif code == cp_model.INFEASIBLE:
        status = "infeasible"
    elif code == cp_model.MODEL_INVALID:
        raise RuntimeError(f"CP-SAT rejected the model: {model.validate()}")
    else:
        status = "unknown"
    solved = code in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    return CpSatOutcome(
        solver=solver, status=status,
        objective=float(solver.objective_value) if solved and has_objective else None,
        bound=float(solver.best_objective_bound) if has_objective and status != "infeasible" else None,
        wall_time_s=float(solver.wall_time))


@overload
def relative_gap(objective: float, bound: float) -> float: ...
@overload
def relative_gap(objective: float, bound: None) -> None: ...
@overload
def relative_gap(objective: float, bound: float | None) -> float | None: ...
def relative_gap(objective: float, bound: float | None) -> float | None:
    """``(objective - bound) / max(|objective|, 1e-9)``, clipped at 0; None without a bound."""
    if bound is None:
        return None
    return max(0.0, (objective - bound) / max(abs(objective), 1e-9))
