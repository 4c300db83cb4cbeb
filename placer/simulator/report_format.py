"""Values in the HTML reports: the unit a metric's key implies, and the value shown with it.

A key names its unit by its suffix (the results layout's convention, ``docs/simulator-results.md``:
times in seconds, sizes in bytes, rates per second); shares and fractions are shown in percent.
Values keep 4 significant digits and are scaled to a readable unit (``3.291e-05`` s is shown as
``32.91 us``); the raw value stays in the cell's ``title``.

Example::

    unit_of("a2a_p99_s")            # "time"
    format_value("a2a_p99_s", 3.291e-05)   # "32.91 us"
    format_value("nvlink_bytes", 6.822e8)  # "682.2 MB"
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

MISSING = "–"
"""Shown for a value that is missing (null in the results)."""

_PERCENT_WORDS = ("share", "utilisation", "fraction", "frac_")
_TIME_STEPS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns"))
_BYTE_STEPS = ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"))


def unit_of(key: str) -> str | None:
    """``"time"``, ``"bytes"``, ``"rate"``, ``"bandwidth"``, ``"percent"`` or None (a plain number).

    Only the last dotted component of ``key`` counts (``metrics.holdout.solve_seconds`` is a time).
    """
    name = key.rsplit(".", 1)[-1]
    if name.endswith("_tok_s"):
        return "rate"
    if name.endswith("_gbps"):
        return "bandwidth"
    if name.endswith(("_s", "_seconds")) or name == "seconds":
        return "time"
    if "bytes" in name:
        return "bytes"
    if name.startswith("frac") or any(w in name for w in _PERCENT_WORDS):
        return "percent"
    return None


def _sig(x: float) -> str:
    """4 significant digits, without an exponent for the magnitudes a scaled unit leaves."""
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:,.0f}" if abs(x) >= 1e4 else f"{x:.3e}"
    return f"{x:.4g}"


def format_number(key: str, v: float | int) -> str:
    """``v`` as text in the unit ``key`` implies (see :func:`unit_of`)."""
    unit = unit_of(key)
    x = float(v)
    if not math.isfinite(x):
        return str(x)
    if unit == "time":
        if x == 0:
            return "0 s"
        scale, name = next(((s, n) for s, n in _TIME_STEPS if abs(x) >= s), _TIME_STEPS[-1])
        return f"{_sig(x / scale)} {name}"
    if unit == "bytes":
        scale, name = next(((s, n) for s, n in _BYTE_STEPS if abs(x) >= s), (1.0, "B"))
        return f"{_sig(x / scale) if scale > 1 else f'{x:,.4g}'} {name}"
    if unit == "rate":
        return f"{x:,.0f} tok/s" if abs(x) >= 100 else f"{x:.4g} tok/s"
    if unit == "bandwidth":
        return f"{x:.4g} GB/s"
    if unit == "percent":
        return f"{100 * x:.3g} %"
    if isinstance(v, int):
        return f"{v:,}"
    return _sig(x)


def format_value(key: str, v: Any) -> str:
    """Plain text of value ``v`` of metric ``key`` (:data:`MISSING` for None)."""
    if is_missing(v):
        return MISSING
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)) or hasattr(v, "dtype"):
        try:
            num = v.item() if hasattr(v, "item") else v
        except (AttributeError, ValueError):
            return str(v)
        if isinstance(num, (int, float)) and not isinstance(num, bool):
            return format_number(key, num)
    return v if isinstance(v, str) else json.dumps(v)


def format_cell(key: str, v: Any) -> str:
    """HTML of value ``v`` of metric ``key``: escaped text, the raw float in a ``title``."""
    text = html.escape(format_value(key, v), quote=True)
    if isinstance(v, float) or (hasattr(v, "dtype") and getattr(v.dtype, "kind", "") == "f"):
        return f'<span title="{float(v)!r}">{text}</span>'
    return text


def is_missing(v: Any) -> bool:
    """Whether ``v`` is shown as :data:`MISSING` (None, or a float NaN)."""
    return v is None or (isinstance(v, float) and math.isnan(v))
