"""PuLP plumbing: backend choice (CBC, HiGHS when present) and honest status triage.

PuLP reports "Optimal" for CBC runs stopped by a time limit (coin-or/pulp #445, #711). A run is
called optimal here only when the solver's solution status says so and, under a limit, the
bound read back from the solver closes the gap.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass

import pulp

from placer.errors import InvalidInputError

BACKENDS = ("cbc", "highs")


@dataclass(frozen=True)
class PulpOutcome:
    status: str  # optimal / timeout / feasible / infeasible / unknown
    objective: float | None
    bound: float | None
    wall_time_s: float
    backend: str


def highs_available() -> bool:
    return "HiGHS" in pulp.listSolvers(onlyAvailable=True)


def check_backend(backend: str) -> None:
    """Raise InvalidInputError unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise InvalidInputError(f"unknown PuLP backend {backend!r}; known: {', '.join(BACKENDS)}", source="--backend")


def run_pulp(prob: pulp.LpProblem, *, backend: str = "cbc", time_limit_s: float | None = None,
             threads: int = 1, gap_rel: float = 1e-6, msg: bool = False,
             warm_start: bool = False) -> PulpOutcome:
    """Solve ``prob`` with CBC or HiGHS and triage the result honestly.

    ``warm_start`` passes the variables' initial values to CBC as a MIP start (PuLP's HiGHS
    interface takes none, so it is ignored there).
    """
    check_backend(backend)
    start = time.perf_counter()
    bound: float | None = None
    proven = False
    if backend == "highs":
        if not highs_available():
            raise InvalidInputError("the HiGHS backend needs highspy (pip install highspy)", source="--backend")
        solver = pulp.HiGHS(msg=msg, timeLimit=time_limit_s, threads=threads, gapRel=gap_rel)
        prob.solve(solver)
        model = getattr(solver, "solverModel", None) or getattr(prob, "solverModel", None)
        if model is not None:
            try:
                bound = float(model.getInfo().mip_dual_bound)
            except Exception:  # noqa: BLE001 - the bound is optional information
                bound = None
    else:
        fd, log_path = tempfile.mkstemp(suffix=".log", prefix="placer-cbc-")
        os.close(fd)
        try:
            with warnings.catch_warnings():  # PuLP 3 deprecates the bundled CBC it still ships
                warnings.simplefilter("ignore", DeprecationWarning)
                solver = pulp.PULP_CBC_CMD(msg=msg, timeLimit=time_limit_s, threads=threads, gapRel=gap_rel,
                                           logPath=log_path, warmStart=warm_start)
            prob.solve(solver)
            bound, proven = _cbc_bound(log_path)
        finally:
            os.unlink(log_path)
    wall = time.perf_counter() - start
    objective = pulp.value(prob.objective) if prob.sol_status in (1, 2) else None
    if objective is not None and prob.sense == pulp.LpMaximize:
        raise InvalidInputError("placer's PuLP models minimise", source="model")
    if prob.sol_status == pulp.LpSolutionInfeasible or prob.status == pulp.LpStatusInfeasible:
        status = "infeasible"
    elif objective is None:
        status = "unknown"
    elif prob.sol_status == pulp.LpSolutionOptimal and (
            time_limit_s is None or proven
            or (bound is not None and objective - bound <= gap_rel * max(1.0, abs(objective)))):
        status = "optimal"
        bound = objective if bound is None else bound
    else:
        status = "timeout" if time_limit_s is not None else "feasible"
    return PulpOutcome(status=status, objective=None if objective is None else float(objective),
                       bound=bound, wall_time_s=wall, backend=backend)


_BOUND_PATTERNS = (re.compile(r"Lower bound:\s*([-+0-9.eE]+)"),
                   re.compile(r"best possible\s*([-+0-9.eE]+)"))


def _cbc_bound(log_path: str) -> tuple[float | None, bool]:
    """CBC's best bound from its log, and whether it reports the search as completed."""
    try:
        with open(log_path) as fh:
            text = fh.read()
    except OSError:
        return None, False
    proven = "Result - Optimal solution found" in text
    for pattern in _BOUND_PATTERNS:
        found = pattern.findall(text)
        if found:
            try:
                return float(found[-1]), proven
            except ValueError:
                continue
    if proven:
        found = re.findall(r"Objective value:\s*([-+0-9.eE]+)", text)
        if found:
            return float(found[-1]), True
    return None, proven
