"""Placement methods behind one interface: ``solve(problem, method=...) -> SolveResult``."""

from placer.ilp import eplb  # noqa: F401, I001  (registers eplb; one import per method)
from placer.ilp import simple  # noqa: F401  (registers contiguous, round-robin)
from placer.ilp import joint  # noqa: F401
from placer.ilp import moetuner, exflow  # noqa: F401
from placer.ilp import exact, coherent  # noqa: F401
from placer.ilp.base import METHODS, PlacementProblem, check_feasible, method_options, register, solve

__all__ = ["METHODS", "PlacementProblem", "check_feasible", "method_options", "register", "solve"]
