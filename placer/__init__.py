"""placer: expert placement and cluster optimizer for Mixture-of-Experts serving."""

from placer.errors import InfeasibleError, InvalidInputError, PlacementError, PlacerError
from placer.types import ModelSpec, Placement, RoutingStats, RoutingTrace, SolveResult, Topology

__version__ = "0.1.0"

__all__ = [
    "InfeasibleError", "InvalidInputError", "ModelSpec", "Placement", "PlacementError", "PlacerError",
    "RoutingStats", "RoutingTrace", "SolveResult", "Topology", "__version__",
]
