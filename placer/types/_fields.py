"""Checks shared by the dataclasses of :mod:`placer.types`: a field error, integer arrays, freezing."""

from __future__ import annotations

from typing import Any

import numpy as np

from placer.errors import InvalidInputError


def bad_field(field_name: str, message: str) -> InvalidInputError:
    """The error of an invalid field (``source`` names it)."""
    return InvalidInputError(message, source=field_name)


def as_int_array(name: str, value: Any, ndim: int, dtype: type) -> np.ndarray:
    """``value`` as a C-contiguous ``dtype`` array of ``ndim`` dimensions; integral floats pass."""
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise bad_field(name, f"expected {ndim} dimensions, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        integral = (np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr))
                    and np.all(arr == np.round(arr)))
        if not integral:
            raise bad_field(name, f"expected integer ids, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


def freeze(arr: np.ndarray | None) -> np.ndarray | None:
    """``arr`` made read-only (in place)."""
    if arr is not None:
        arr.flags.writeable = False
    return arr
