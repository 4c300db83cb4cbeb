"""How placer shows values: one number formatter, one placeholder, one text-table writer, one JSON
normaliser. Every command's text output, the HTML reports and every ``--json`` go through here
(progress is :mod:`placer.cli.progress`).

A metric's key names its unit by its suffix (the results layout's convention,
``docs/simulator-results.md``: times in seconds, sizes in bytes, rates per second); shares and
fractions are shown in percent. Numbers keep 4 significant digits (trailing zeros kept, so a
column reads evenly) and are scaled to a readable unit; a missing value is :data:`MISSING`.

Example::

    format_value("a2a_p99_s", 3.291e-05)      # "32.91 us"
    format_value("nvlink_bytes", 6.822e8)     # "682.2 MB"
    format_value("load_max_over_mean", 1.2)   # "1.200"
    format_value("gap", None)                 # "-"
    print(table([["eplb", "1.200"], ["placer", "1.150"]], header=["method", "load"]))
    json_text({"gap": float("inf")}, indent=None)  # '{"gap": null}' (strict JSON: never NaN or Infinity)
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MISSING = "-"
"""Shown for a value that is missing (None, NaN) or does not apply, in text, tables and HTML."""

_PERCENT_WORDS = ("share", "utilisation", "fraction", "frac_")
_TIME_STEPS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns"))
_BYTE_STEPS = ((1e15, "PB"), (1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"))


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

def unit_of(key: str) -> str | None:
    """``"time"``, ``"bytes"``, ``"rate"``, ``"bandwidth"``, ``"percent"`` or None (a plain number).

    Only the last dotted component of ``key`` counts (``metrics.holdout.solve_seconds`` is a time).
    """
    name = key.rsplit(".", 1)[-1]
    if name.endswith("_tok_s"):
        return "rate"
    if name.endswith("_gbps"):
        return "bandwidth"
    if name.endswith(("_s", "_seconds")) or name in ("seconds", "s"):
        return "time"
    if "bytes" in name:
        return "bytes"
    if name == "gap" or name.startswith("frac") or any(w in name for w in _PERCENT_WORDS):
        return "percent"
    return None


def significant(x: float, digits: int = 4) -> str:
    """``x`` to ``digits`` significant digits, trailing zeros kept (``1.200``, ``0.04040``);
    thousands separated from 10,000 up, an exponent below 0.001."""
    if x == 0:
        return "0"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    if abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:#.{digits}g}".rstrip(".")


def format_number(key: str, v: float | int, digits: int = 4) -> str:
    """``v`` as text in the unit ``key`` implies (see :func:`unit_of`), ``digits`` significant."""
    unit = unit_of(key)
    x = float(v)
    if not math.isfinite(x):
        return MISSING if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if unit == "time":
        if x == 0:
            return "0 s"
        scale, name = next(((s, n) for s, n in _TIME_STEPS if abs(x) >= s), _TIME_STEPS[-1])
        return f"{significant(x / scale, digits)} {name}"
    if unit == "bytes":
        scale, name = next(((s, n) for s, n in _BYTE_STEPS if abs(x) >= s), (1.0, "B"))
        return f"{significant(x / scale, digits) if scale > 1 else f'{x:,.0f}'} {name}"
    if unit == "rate":
        return f"{x:,.0f} tok/s" if abs(x) >= 100 else f"{significant(x, digits)} tok/s"
    if unit == "bandwidth":
        return f"{significant(x, digits)} GB/s"
    if unit == "percent":
        return "0%" if x == 0 else f"{significant(100 * x, digits - 1)}%"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f"{int(v):,}"
    return significant(x, digits)


def format_value(key: str, v: Any, digits: int = 4) -> str:
    """Plain text of value ``v`` of metric ``key`` (:data:`MISSING` for None and NaN), numbers to
    ``digits`` significant digits (a caller asks for more where its values differ further down)."""
    if is_missing(v):
        return MISSING
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower()
    if isinstance(v, (int, float, np.integer, np.floating)):
        return format_number(key, v.item() if isinstance(v, np.generic) else v, digits)
    if isinstance(v, str):
        return v
    return json_text(v, indent=None)


def format_html(key: str, v: Any) -> str:
    """HTML of value ``v`` of metric ``key``: escaped text, the raw float in a ``title``."""
    text = html.escape(format_value(key, v), quote=True)
    if isinstance(v, (float, np.floating)) and not is_missing(v):
        return f'<span title="{float(v)!r}">{text}</span>'
    return text


def is_missing(v: Any) -> bool:
    """Whether ``v`` is shown as :data:`MISSING` (None, or a float NaN)."""
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


# ---------------------------------------------------------------------------------------------
# Text tables
# ---------------------------------------------------------------------------------------------

def table(rows: Sequence[Sequence[str] | str], header: Sequence[str] | None = None,
          align: str | None = None, rule: bool = True) -> str:
    """An aligned plain-text table: columns two spaces apart, the header underlined with dashes.

    ``rows``: lists of cells (text), or a plain string, printed as it is (a section heading);
    headings do not widen the columns. ``align``: one ``l`` or ``r`` per column (default: the
    first column left, the others right).
    """
    body = [list(r) for r in rows if not isinstance(r, str)]
    grid = ([list(header)] if header is not None else []) + body
    if not grid:
        return "\n".join(r for r in rows if isinstance(r, str))
    ncol = max(len(r) for r in grid)
    align = align or "l" + "r" * (ncol - 1)
    widths = [max((len(r[i]) for r in grid if i < len(r)), default=0) for i in range(ncol)]

    def line(cells: Sequence[str]) -> str:
        out = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align, strict=False)]
        return "  ".join(out).rstrip()

    lines = []
    if header is not None:
        lines.append(line(header))
        if rule:
            lines.append("  ".join("-" * w for w in widths))
    lines += [r if isinstance(r, str) else line(r) for r in rows]
    return "\n".join(lines)


def key_value_table(items: Mapping[str, Any] | Sequence[tuple[str, Any]], align: str = "ll") -> str:
    """``key  value`` lines, values through :func:`format_value` (left-aligned: values of mixed kinds)."""
    pairs = items.items() if isinstance(items, Mapping) else items
    return table([[k, format_value(k, v)] for k, v in pairs], align=align)


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------

def json_value(v: Any) -> Any:
    """Plain JSON value of ``v``: numpy scalars and arrays unwrapped, tuples as lists, paths as
    text, keys as text, non-finite floats (NaN, +-inf) as None. Anything else raises TypeError."""
    if isinstance(v, Mapping):
        return {str(k): json_value(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return [json_value(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    raise TypeError(f"{type(v).__name__} is not JSON-serialisable")


def json_text(v: Any, indent: int | None = 2) -> str:
    """``v`` as strict JSON text (through :func:`json_value`: never NaN or Infinity)."""
    return json.dumps(json_value(v), indent=indent, allow_nan=False)
