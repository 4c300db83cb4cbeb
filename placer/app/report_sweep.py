"""The sweep section of a report: each headline metric against GPU count and against rate.

A sweep directory holds one results directory per grid point (``placer simulate sweep``); each
point records its cluster (``inputs.topology``) and workload (``inputs.workload``, whose ``rate``
is the swept one in serving). :func:`sweep_rows` reads the points back into one table and
:func:`sweep_parts` draws it: ``plot-sweep-gpus`` (x: GPUs, one line per placement and rate) and
``plot-sweep-rate`` (x: requests per second, one line per placement and GPU count), one panel per
headline metric that any point has. An axis with a single value is not drawn; a note says so.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from placer.display import unit_of
from placer.simulator.results import SimResults

SWEEP_METRICS: tuple[tuple[str, str], ...] = (
    ("throughput_tok_s", "throughput"), ("ttft_p99_s", "TTFT p99"), ("tpot_p99_s", "TPOT p99"),
    ("e2e_p99_s", "end-to-end p99"), ("iteration_p99_s", "step p99"),
    ("a2a_p99_s", "all-to-all p99"), ("straggler_share", "straggler share"),
    ("max_link_utilisation", "busiest link utilisation"))
"""(summary key, panel title) of the metrics charted against GPU count and rate."""

SWEEP_PLOTS = (("gpus", "plot-sweep-gpus", "GPUs"), ("rate", "plot-sweep-rate", "requests / s"))

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf")
_COLS = 3
_DASHES = ("solid", "dash", "dot", "dashdot")


def sweep_rows(groups: list[tuple[str, SimResults, Path]]) -> pd.DataFrame:
    """One row per (point, placement): ``point, gpus, rate, placement`` and every summary key.

    ``rate`` is the serving workload's request rate (NaN in replay).
    """
    rows = []
    for name, res, _ in groups:
        topo = res.inputs.get("topology") or {}
        workload = res.inputs.get("workload") or {}
        gpus = (topo.get("num_nodes") or 0) * (topo.get("gpus_per_node") or 0) or None
        rate = workload.get("rate") if workload.get("kind") == "serving" else None
        for label in res.labels:
            rows.append({"point": name, "gpus": gpus, "rate": rate, "placement": label,
                         **res.summaries[label]})
    return pd.DataFrame(rows)


def _scale(key: str, values: np.ndarray) -> tuple[float, str]:
    """Factor and unit that show ``values`` of metric ``key`` readably on an axis."""
    unit = unit_of(key)
    if unit == "percent":
        return 100.0, "%"
    if unit == "rate":
        return 1.0, "tok/s"
    if unit == "time":
        top = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
        for factor, name in ((1.0, "s"), (1e3, "ms"), (1e6, "us")):
            if top * factor >= 1.0:
                return factor, name
        return 1e9, "ns"
    return 1.0, ""


def sweep_figure(table: pd.DataFrame, axis: str, metrics: list[tuple[str, str]]) -> Any:
    """Panels of ``metrics`` against column ``axis`` (``gpus`` or ``rate``) of ``table``."""
    other = "rate" if axis == "gpus" else "gpus"
    split = table[other].nunique(dropna=True) > 1
    rows = -(-len(metrics) // _COLS)
    fig = make_subplots(rows=rows, cols=_COLS, subplot_titles=[t for _, t in metrics],
                        horizontal_spacing=0.08, vertical_spacing=0.5 / max(rows, 1))
    placements = list(dict.fromkeys(table["placement"]))
    others = sorted(table[other].dropna().unique())
    series = sorted(table.groupby(["placement", other] if split else ["placement"], sort=False,
                                  dropna=False),  # by placement, then by the other axis
                    key=lambda g: (placements.index(g[0][0]), others.index(g[0][-1])
                                   if split and g[0][-1] in others else 0))
    for n, (key, _) in enumerate(metrics):
        r, c = n // _COLS + 1, n % _COLS + 1
        factor, unit = _scale(key, table[key].to_numpy(np.float64, na_value=np.nan))
        for ident, part in series:
            ident = ident if isinstance(ident, tuple) else (ident,)
            part = part.sort_values(axis)
            known = split and ident[1] in others
            name = str(ident[0]) + (f", {other} {ident[1]:g}" if known else "")
            color = _PALETTE[placements.index(ident[0]) % len(_PALETTE)]
            dash = _DASHES[others.index(ident[1]) % len(_DASHES)] if known else "solid"
            y = part[key].to_numpy(np.float64, na_value=np.nan) * factor
            fig.add_trace(go.Scatter(x=part[axis].to_numpy(np.float64), y=y, mode="lines+markers",
                                     name=html.escape(name), legendgroup=name, showlegend=n == 0,
                                     line={"color": color, "dash": dash},
                                     hovertemplate=f"{axis} %{{x:g}}: %{{y:.4g}} {unit}"
                                                   "<extra>%{fullData.name}</extra>"),
                          row=r, col=c)
        fig.update_yaxes(title_text=unit or None, rangemode="tozero", row=r, col=c)
    fig.update_xaxes(title_text=dict((a, t) for a, _, t in SWEEP_PLOTS)[axis])
    if axis == "gpus":
        fig.update_xaxes(tickmode="array", tickvals=sorted(table["gpus"].dropna().unique()))
    fig.update_layout(height=260 * rows + 80, template="plotly_white", margin={"t": 40, "b": 40})
    return fig


def sweep_parts(groups: list[tuple[str, SimResults, Path]]) -> tuple[list[Any], list[str]]:
    """The sweep section's content (HTML and ``(figure, plot id, kind)`` items) and its plot ids."""
    table = sweep_rows(groups)
    metrics = [(k, t) for k, t in SWEEP_METRICS
               if k in table and pd.to_numeric(table[k], errors="coerce").notna().any()]
    parts: list[Any] = [f'<p class="note">{len(groups)} grid points; every placement is simulated '
                        "with the same seeds at every point.</p>"]
    ids: list[str] = []
    for axis, plot_id, title in SWEEP_PLOTS:
        values = sorted(table[axis].dropna().unique())
        if len(values) < 2:
            what = "GPU count" if axis == "gpus" else "request rate (replay has none)"
            shown = f" ({', '.join(f'{v:g}' for v in values)})" if values else ""
            parts.append(f'<p class="note" id="note-sweep-{axis}">One {html.escape(what)}'
                         f"{html.escape(shown)}: no chart against {html.escape(title)}.</p>")
            continue
        parts.append(f"<h3>Against {html.escape(title)}</h3>")
        parts.append((sweep_figure(table, axis, metrics), plot_id, f"sweep-{axis}"))
        ids.append(plot_id)
    return parts, ids
