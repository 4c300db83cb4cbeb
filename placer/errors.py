"""Exception hierarchy of placer.

Every error a user can cause is a :class:`PlacerError`. The CLI turns
``InvalidInputError`` and ``InfeasibleError`` into exit code 2 with one line
that names the input and the problem; a :class:`ClusterError` (the cluster
failed in a way placer recognises) into exit code 1 with one line; anything
else is unexpected (exit 1, and a hint to rerun with ``--debug``).
"""

from __future__ import annotations


class PlacerError(Exception):
    """Base class of all placer errors."""


class InvalidInputError(PlacerError, ValueError):
    """Bad input: missing or truncated file, wrong shape, ids out of range, NaN, unknown format.

    ``source`` names the offending input (a path, a flag, a field) when known.
    """

    def __init__(self, message: str, *, source: str | None = None):
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class InfeasibleError(PlacerError):
    """The requested sizes admit no valid placement (the message names the nearest feasible one)."""


class PlacementError(InvalidInputError):
    """A placement violates an invariant checked by :func:`placer.validate.check_placement`."""


class ClusterError(PlacerError, RuntimeError):
    """The cluster a deployment runs on failed in a known way (a rank or a Ray node lost for good,
    no room for the ranks); the message says what and where."""


class MissingDependencyError(PlacerError):
    """An optional dependency (torch, ray, triton) is needed for this input or command."""

    def __init__(self, package: str, extra: str, what: str):
        super().__init__(f"{what} needs {package}; install it with: pip install 'placer[{extra}]'")
