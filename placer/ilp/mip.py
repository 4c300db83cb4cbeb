"""One mixed 0-1 linear program, described once, solved by CP-SAT or PuLP (CBC / HiGHS).

Every MIP of :mod:`placer.ilp` (:mod:`placer.ilp.coherent`, :mod:`placer.ilp.moetuner`,
:mod:`placer.ilp.exflow`) is written once against :class:`MipModel`, in the OR-Tools sample
style: data, variables, commented constraints, objective, hints, solve, status triage and
read-back. The backend shows through in four places only:

- **Coefficients.** CP-SAT takes integers only (:attr:`MipModel.integral`): a model rounds its
  data before building when that is set, and :meth:`MipModel.dot` casts coefficients.
- **Relaxed variables.** :meth:`MipModel.aux_var` and :meth:`MipModel.num_var` are integer in
  CP-SAT and continuous in PuLP (integral at the optimum of the models that use them).
- **Row order.** Constraints marked ``cut`` (valid inequalities, symmetry breaking) go in
  place in CP-SAT and after all other rows in PuLP.
- **Starts.** :meth:`MipModel.hint` is a CP-SAT hint; PuLP records it as the variable's initial
  value, which CBC takes as a MIP start when :meth:`MipModel.solve` is asked to
  (``warm_start``); PuLP's HiGHS interface takes no start.

:class:`Budget` splits one wall-clock and one deterministic-time limit over many sub-solves.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pulp

from placer.errors import InvalidInputError
from placer.ilp._cpsat import run_cpsat
from placer.ilp._pulp import run_pulp

__all__ = ["BACKENDS", "Budget", "MipModel", "MipOutcome", "normalise_backend", "worst_status"]

BACKENDS = ("cpsat", "pulp", "pulp-cbc", "pulp-highs")


def normalise_backend(backend: str) -> str:
    """``"cpsat"``, ``"pulp-cbc"`` or ``"pulp-highs"`` (``"pulp"`` means CBC)."""
    if backend not in BACKENDS:
        raise InvalidInputError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}",
                                source="--backend")
    return "pulp-cbc" if backend == "pulp" else backend


@dataclass(frozen=True)
class MipOutcome:
    """One solve: ``status`` optimal / timeout / feasible / infeasible / unknown (no solution).

    ``bound`` is a proven lower bound (a proven PuLP optimum is its own bound: CBC's log can
    report an earlier, weaker one); ``solver_bound`` the bound as the solver reported it.
    ``value(var)`` reads a variable rounded to an integer, ``level(var)`` as the solver left
    it (PuLP's may be fractional within tolerances); both None when there is no solution.
    """

    status: str
    objective: float | None
    bound: float | None
    value: Callable[[Any], int] | None
    deterministic_time: float = 0.0
    level: Callable[[Any], float] | None = None
    solver_bound: float | None = None

    @property
    def solved(self) -> bool:
        return self.value is not None


class MipModel:
    """A minimising mixed 0-1 linear program built once, solved with CP-SAT or PuLP (CBC / HiGHS).

    Expressions are built with ``+``, ``*`` and :meth:`dot`, which both libraries accept.
    ``numbered``: PuLP names get a running number (the names given need not be unique); with
    False they are used as given, so they must be unique (PuLP orders the columns by name).
    """

    def __init__(self, backend: str, name: str = "placer", *, numbered: bool = True):
        self.backend = normalise_backend(backend)
        self.numbered = numbered
        self._count = 0
        self._cuts: list[Any] = []  # PuLP: cut rows, added after the others when solving
        if self.backend == "cpsat":
            from ortools.sat.python import cp_model  # deferred: 0.4-0.8 s a process

            self.cp = cp_model.CpModel()
            self._linear = cp_model.LinearExpr
            self.cp.name = name
        else:
            self.lp = pulp.LpProblem(re.sub(r"\W", "_", name), pulp.LpMinimize)

    @property
    def integral(self) -> bool:
        """Whether the backend takes integer coefficients only (CP-SAT)."""
        return self.backend == "cpsat"

    def _name(self, name: str) -> str:
        if not self.numbered:
            return name
        self._count += 1
        return f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}__{self._count}"

    def bool_var(self, name: str) -> Any:
        if self.backend == "cpsat":
            return self.cp.new_bool_var(name)
        return self.lp.add_variable(self._name(name), cat="Binary")

    def aux_var(self, upper: int, name: str) -> Any:
        """A variable in ``[0, upper]``: integer in CP-SAT, continuous in PuLP."""
        if self.backend == "cpsat":
            return self.cp.new_int_var(0, int(upper), name)
        return self.lp.add_variable(self._name(name), 0, float(upper))

    def num_var(self, lower: float, upper: float | None, name: str) -> Any:
        """A variable in ``[lower, upper]``: integer in CP-SAT (``upper`` required), continuous
        in PuLP (``upper`` None: unbounded above)."""
        if self.backend == "cpsat":
            if upper is None:
                raise ValueError("a CP-SAT variable needs an upper bound")
            return self.cp.new_int_var(int(lower), int(upper), name)
        return self.lp.add_variable(self._name(name), lowBound=lower, upBound=upper)

    def dot(self, coefs: Sequence[float], variables: Sequence[Any]) -> Any:
        if self.backend == "cpsat":
            return self._linear.weighted_sum(list(variables), [int(c) for c in coefs])
        return pulp.lpSum(float(c) * v for c, v in zip(coefs, variables, strict=True))

    def add(self, constraint: Any, *, cut: bool = False) -> None:
        """Add ``constraint``. ``cut``: it only strengthens the formulation (a valid inequality,
        symmetry breaking); CP-SAT takes it in place, PuLP after all other rows when solving."""
        if self.backend == "cpsat":
            self.cp.add(constraint)
        elif cut:
            self._cuts.append(constraint)
        else:
            self.lp += constraint

    def exactly_one(self, variables: Sequence[Any]) -> None:
        """Exactly one of the binaries ``variables`` is 1."""
        if self.backend == "cpsat":
            self.cp.add_exactly_one(variables)
        else:
            self.lp += pulp.lpSum(variables) == 1

    def implies(self, enforce: Any, a: Any, b: Any) -> None:
        """``enforce = 1`` forces ``a <= b`` (binaries ``a``, ``b``; ``enforce`` binary or in [0, 1]).

        CP-SAT: the clause ``not a or b`` enforced by ``enforce``; PuLP: ``enforce <= 1 - a + b``.
        """
        if self.backend == "cpsat":
            self.cp.add_bool_or([a.Not(), b]).only_enforce_if(enforce)
        else:
            self.lp += enforce <= 1 - a + b

    def minimize(self, expr: Any) -> None:
        if self.backend == "cpsat":
            self.cp.minimize(expr)
        else:
            self.lp.setObjective(expr)

    def hint(self, var: Any, value: float) -> None:
        """A start value: a CP-SAT hint (rounded down to an integer); PuLP's initial value."""
        if self.backend == "cpsat":
            self.cp.add_hint(var, int(value))
        else:
            var.setInitialValue(value)

    def solve(self, *, time_limit_s: float | None = None, deterministic_time: float | None = None,
              num_workers: int = 1, seed: int = 0, warm_start: bool = False,
              log: bool = False) -> MipOutcome:
        """Solve under the limits (``deterministic_time``: CP-SAT only). ``warm_start`` passes the
        hints to CBC as a MIP start (CP-SAT always uses its hints); ``log`` prints the search."""
        if self.backend == "cpsat":
            out = run_cpsat(self.cp, time_limit_s=time_limit_s, deterministic_time=deterministic_time,
                            num_workers=num_workers, seed=seed, log=log)
            solver = out.solver
            solved = out.objective is not None
            return MipOutcome(out.status, out.objective, out.bound,
                              (lambda v: int(solver.value(v))) if solved else None,
                              float(solver.deterministic_time),
                              level=(lambda v: float(solver.value(v))) if solved else None,
                              solver_bound=out.bound)
        for cut in self._cuts:
            self.lp += cut
        self._cuts.clear()
        pulp_backend = self.backend.removeprefix("pulp-")
        res = run_pulp(self.lp, backend=pulp_backend, time_limit_s=time_limit_s, threads=num_workers,
                       msg=log, warm_start=warm_start and pulp_backend == "cbc")
        solved = res.objective is not None
        # A proven optimum is its own bound (CBC's log can report an earlier, weaker one).
        bound = res.objective if res.status == "optimal" else res.bound
        return MipOutcome(res.status, res.objective, bound,
                          (lambda v: int(round(v.value() or 0.0))) if solved else None,
                          level=(lambda v: float(v.value() or 0.0)) if solved else None,
                          solver_bound=res.bound)


class Budget:
    """Splits a wall-clock and a deterministic-time limit over weighted sub-solves.

    Each :meth:`take` hands out ``remaining * weight / remaining_weight`` of both limits (None
    when unlimited); unused time rolls over to later sub-solves. ``cap_s`` bounds every share.
    """

    def __init__(self, time_limit_s: float | None, deterministic_time: float | None,
                 total_weight: float, cap_s: float | None = None):
        self.deadline = None if time_limit_s is None else time.perf_counter() + float(time_limit_s)
        self.det_left = None if deterministic_time is None else float(deterministic_time)
        self.weight_left = float(total_weight)
        self.cap_s = cap_s
        self.limited = False  # set once any sub-solve ran under a limit

    def take(self, weight: float = 1.0) -> tuple[float | None, float | None]:
        share = min(1.0, weight / self.weight_left) if self.weight_left > 0 else 1.0
        self.weight_left = max(0.0, self.weight_left - weight)
        wall = None
        if self.deadline is not None:
            wall = max(0.0, self.deadline - time.perf_counter()) * share
        if self.cap_s is not None:
            wall = self.cap_s if wall is None else min(wall, self.cap_s)
        det = None if self.det_left is None else self.det_left * share
        return wall, det

    def charge(self, outcome: MipOutcome) -> None:
        if self.det_left is not None:
            self.det_left = max(0.0, self.det_left - outcome.deterministic_time)

    def run(self, model: MipModel, weight: float = 1.0, *, num_workers: int = 1,
            seed: int = 0) -> MipOutcome:
        """Solve ``model`` with its share of the budget; an exhausted budget gives ``unknown``."""
        wall, det = self.take(weight)
        if (wall is not None and wall <= 1e-3) or (det is not None and det <= 0.0):
            self.limited = True
            return MipOutcome("unknown", None, None, None)
        outcome = model.solve(time_limit_s=wall, deterministic_time=det, num_workers=num_workers,
                              seed=seed)
        self.charge(outcome)
        if outcome.status in ("timeout", "unknown"):
            self.limited = True
        return outcome


def worst_status(statuses: Sequence[str]) -> str:
    """Combine sub-solve statuses: timeout if any stopped at a limit, optimal if all proven."""
    if any(s in ("timeout", "unknown") for s in statuses):
        return "timeout"
    return "optimal" if all(s == "optimal" for s in statuses) else "feasible"
