"""The one numba entry point: ``njit`` compiles with caching, or returns the function unchanged
when numba cannot be imported (numba is a core dependency; the fallback keeps placer importable)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_numba_njit: Callable[..., Any] | None
try:
    from numba import njit as _numba_njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only without numba
    _numba_njit = None
    HAVE_NUMBA = False


def njit(fn):
    """``numba.njit(cache=True, nogil=True)``, or ``fn`` itself without numba."""
    return fn if _numba_njit is None else _numba_njit(cache=True, nogil=True)(fn)
