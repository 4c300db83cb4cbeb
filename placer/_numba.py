"""The one numba entry point: ``njit`` compiles with caching, or returns the function unchanged
when numba cannot be imported (numba is a core dependency; the fallback keeps placer importable)."""

from __future__ import annotations

import os
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


def cache_holds(kernel) -> bool:
    """Whether ``kernel`` (an :func:`njit` function) runs without compiling: it is compiled in this
    process, or numba's on-disk cache holds it (an index that matches the sources: a stale one
    loads empty). False without numba or with a cache layout this does not know."""
    if _numba_njit is None:
        return False
    if kernel.signatures:
        return True
    try:
        index = kernel._cache._cache_file
        return os.path.exists(index._index_path) and bool(index._load_index())
    except Exception:  # noqa: BLE001 - another numba layout: as a cold cache
        return False
