"""Render simulator results as one self-contained HTML report (opens offline, no CDN).

The report only presents what a results directory holds (see ``docs/simulator-results.md``):
it draws empirical CDFs of the stored per-request and per-iteration times, and pivots the stored
tables into bars and heatmaps; it computes no simulation quantity. plotly.js is inlined once, in
the first figure; no ``<script src>``, ``<link>`` or other external fetch is emitted.

Element ids (stable; ``i`` is the placement's 0-based index in report order, ``k`` the extra
section's 0-based index):

=========================  ====================================================================
``sim-summary``            ``<table>``: one column per placement, one row per summary metric that
                           any placement has (values in units: :mod:`placer.display`)
``plot-latency-cdf``       CDFs of TTFT, TPOT and end-to-end latency (``data-source="requests"``)
                           or, when no placement has requests, of the iteration time
                           (``data-source="iterations"``); one curve per placement, a step per
                           sample; ``note-short-run`` says when there are too few samples for
                           the p99
``plot-layer-phases-{i}``  attention/dispatch/compute/combine mean seconds per MoE layer, stacked;
                           with two-batch overlap also a line of the all-to-all seconds hidden
                           under compute (``layers.a2a_hidden_s``)
``plot-gpu-load-{i}``      heatmap of token-expert pairs per iteration, MoE layer x GPU
``plot-links-{i}``         heatmaps of bytes src x dst over the run, NVLink and RDMA side by side;
                           a kind without traffic is not drawn, a note says why (``single node:
                           no RDMA traffic``)
``sim-inputs``             ``<details>`` with the inputs of each results directory as JSON
``extra-{k}``              ``<section>`` of the k-th entry of ``extra_sections``
=========================  ====================================================================

Every plot is a ``<div class="sim-plot" id="plot-..." data-plot="<kind>"
data-placement="<label>">`` wrapping plotly's figure div (id ``"<plot id>-figure"``); once
plotly has drawn it, that inner div has class ``js-plotly-plot``. :func:`plot_ids` lists the
plot ids a report of ``n`` placements contains.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from placer.display import MISSING, format_html, is_missing
from placer.io.atomic import atomic_write_text
from placer.simulator.results import SUMMARY_KEYS, TABLES, SimResults, read_results

CDF_MAX_POINTS = 2000
"""Curves with more points are drawn through this many evenly spaced order statistics."""

SHORT_RUN_SAMPLES = 100
"""With fewer samples than this, a p99 is the largest sample: the report says so."""

PHASES = (("attention_s", "attention", "#7f7f7f"), ("dispatch_s", "dispatch", "#1f77b4"),
          ("compute_s", "compute", "#2ca02c"), ("combine_s", "combine", "#ff7f0e"))
PER_PLACEMENT_PLOTS = ("layer-phases", "gpu-load", "links")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5rem 2rem;color:#222}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
h3{font-size:1rem;margin:1rem 0 0}
table.sim-table{border-collapse:collapse;font-size:.85rem;font-variant-numeric:tabular-nums}
table.sim-table th,table.sim-table td{border:1px solid #ddd;padding:.2rem .5rem;text-align:right}
table.sim-table th:first-child,table.sim-table td:first-child{text-align:left}
table.sim-table thead th{background:#f3f3f3}
table.sim-table td,table.sim-table tbody th{white-space:nowrap}
.table-scroll{max-width:100%;overflow-x:auto}
.note{color:#555;font-size:.85rem}
body{max-width:1400px;box-sizing:border-box}
details>summary{cursor:pointer;margin:.5rem 0}
pre{background:#f7f7f7;padding:.5rem;overflow:auto;font-size:.8rem}
.sim-plot{margin:.5rem 0}
"""


def plot_ids(num_placements: int) -> list[str]:
    """Ids of the plot divs in a report of ``num_placements`` placements (no extra sections)."""
    per = [f"plot-{kind}-{i}" for kind in PER_PLACEMENT_PLOTS for i in range(num_placements)]
    return ["plot-latency-cdf", *per]


@dataclass
class _Entry:
    """One placement as shown in the report."""

    label: str
    summary: dict[str, Any]
    rows: dict[str, pd.DataFrame]
    num_nodes: int | None = None
    """Nodes of the simulated cluster (``inputs.topology.num_nodes``), when recorded."""


def render_report(results: str | os.PathLike[str] | SimResults | Sequence[Any],
                  output_html: str | os.PathLike[str], *, title: str | None = None,
                  extra_sections: Iterable[tuple[str, Any]] | Mapping[str, Any] | None = None,
                  lead_sections: Iterable[tuple[str, Any]] | Mapping[str, Any] | None = None
                  ) -> None:
    """Write one self-contained HTML report of ``results`` to ``output_html`` (atomically).

    ``results`` is a results directory, a :class:`SimResults`, or a list of those (e.g. the
    grid points of a sweep); a list item may also be a ``(name, directory | SimResults)`` pair.
    With several results, each label is shown as ``"<name> / <label>"`` (name: the pair's name,
    else the directory's base name, else ``"results <n>"``).

    ``extra_sections`` (a list of ``(title, content)`` pairs or a mapping) are appended after
    the simulator sections; ``content`` is an HTML fragment (inserted as is: the caller vouches
    for it), a DataFrame (rendered as an escaped table), a plotly figure, or a list of those and
    of ``(figure, plot id, kind)`` triples (drawn under that id). ``lead_sections``
    (same form; ids ``lead-{k}``) come first, before the summary: what a reader looks for first.
    """
    import plotly.graph_objects as go  # deferred: plotly is needed only to render

    groups = _groups(results)
    entries = _entries(groups)
    figs = _Figures()
    title = title or "Simulation report"
    parts = [f"<h1>{_esc(title)}</h1>",
             f"<p>{len(entries)} placement(s): {', '.join(_esc(e.label) for e in entries)}</p>"]
    for k, (sec_title, content) in enumerate(_extra_items(lead_sections)):
        parts.append(f'<section class="lead-section" id="lead-{k}"><h2>{_esc(sec_title)}</h2>'
                     f"{_extra_html(figs, content, f'lead-{k}')}</section>")
    parts += ['<section id="sec-summary"><h2>Summary</h2>', _summary_table(entries), "</section>",
             '<section id="sec-latency"><h2>Latency CDFs</h2>', _latency(go, figs, entries),
             "</section>"]
    sections = (("layer-phases", "Per-layer phase times (mean seconds per iteration)", _phases),
                ("gpu-load", "Per-GPU load (token-expert pairs per iteration)", _gpu_load),
                ("links", "Link traffic (bytes over the run)", _links))
    for kind, heading, draw in sections:
        parts.append(f'<section id="sec-{kind}"><h2>{_esc(heading)}</h2>')
        for i, entry in enumerate(entries):
            parts.append(f"<h3>{_esc(entry.label)}</h3>")
            if kind == "links" and (note := _links_note(entry)):
                parts.append(f'<p class="note" id="note-links-{i}">{_esc(note)}</p>')
            parts.append(figs.html(draw(go, entry), f"plot-{kind}-{i}", kind, entry.label))
        parts.append("</section>")
    inputs = "".join(f"<h3>{_esc(name)}</h3>" * (len(groups) > 1)
                     + f"<pre>{_esc(json.dumps(res.inputs, indent=2))}</pre>"
                     for name, res in groups)
    parts.append(f'<section id="sec-inputs"><h2>Inputs</h2><details id="sim-inputs">'
                 f"<summary>inputs of the simulation</summary>{inputs}</details></section>")
    for k, (sec_title, content) in enumerate(_extra_items(extra_sections)):
        parts.append(f'<section class="extra-section" id="extra-{k}"><h2>{_esc(sec_title)}</h2>'
                     f"{_extra_html(figs, content, f'extra-{k}')}</section>")
    page = ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")
    atomic_write_text(output_html, page)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def _groups(results: Any) -> list[tuple[str, SimResults]]:
    items = [results] if isinstance(results, (str, os.PathLike, SimResults)) else list(results)
    if not items:
        raise ValueError("render_report needs at least one results directory")
    groups = []
    for n, item in enumerate(items):
        name = None
        if isinstance(item, tuple) and len(item) == 2:
            name, item = str(item[0]), item[1]
        if isinstance(item, (str, os.PathLike)):
            name = name or Path(item).resolve().name or str(item)
            item = read_results(item)
        if not isinstance(item, SimResults):
            raise TypeError(f"cannot render {type(item).__name__}: expected a results "
                            "directory or SimResults")
        groups.append((name or f"results {n}", item))
    return groups


def _entries(groups: list[tuple[str, SimResults]]) -> list[_Entry]:
    prefix = len(groups) > 1
    return [_Entry(f"{name} / {label}" if prefix else label, res.summaries[label],
                   {table: res.rows(table, label) for table in TABLES},
                   (res.inputs.get("topology") or {}).get("num_nodes"))
            for name, res in groups for label in res.labels]


def _extra_items(extra: Any) -> list[tuple[str, Any]]:
    if extra is None:
        return []
    return [(str(t), c) for t, c in (extra.items() if isinstance(extra, Mapping) else extra)]


def _extra_html(figs: _Figures, content: Any, section_id: str) -> str:
    """HTML of a section's content; a list is joined, and a ``(figure, plot id, kind)`` item in it
    is drawn under that plot id (so a figure before the simulator's own ones carries plotly.js)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(figs.html(item[0], item[1], item[2], "") if isinstance(item, tuple)
                       else _extra_html(figs, item, section_id) for item in content)
    if isinstance(content, pd.DataFrame):
        return ('<div class="table-scroll">'
                + content.to_html(classes="sim-table", border=0, escape=True, na_rep=MISSING) + "</div>")
    if hasattr(content, "to_plotly_json") and hasattr(content, "to_html"):
        return figs.html(content, f"{section_id}-plot", "extra", "")
    raise TypeError(f"extra section content of type {type(content).__name__} is not an HTML "
                    "string, DataFrame or plotly figure")


# --------------------------------------------------------------------------------------------
# HTML helpers
# --------------------------------------------------------------------------------------------

def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


class _Figures:
    """Turns figures into wrapped divs; inlines plotly.js in the first one only."""

    def __init__(self) -> None:
        self._inlined = False

    def html(self, fig: Any, div_id: str, kind: str, label: str, **data: str) -> str:
        inner = fig.to_html(full_html=False, include_plotlyjs=not self._inlined,
                            div_id=f"{div_id}-figure", config={"displaylogo": False})
        self._inlined = True
        attrs = "".join(f' data-{_esc(k)}="{_esc(v)}"' for k, v in data.items())
        return (f'<div class="sim-plot" id="{_esc(div_id)}" data-plot="{_esc(kind)}" '
                f'data-placement="{_esc(label)}"{attrs}>{inner}</div>')


_REQUEST_COUNTS = ("requests", "requests_finished")


def _summary_table(entries: list[_Entry]) -> str:
    """The summaries, one row per metric that any placement has; the others named below."""
    keys = list(SUMMARY_KEYS)
    for e in entries:
        keys += [k for k in e.summary if k not in keys]
    replay = not any(e.summary.get("requests") for e in entries)
    empty = [k for k in keys if all(is_missing(e.summary.get(k)) for e in entries)
             or (replay and k in _REQUEST_COUNTS)]
    head = "".join(f'<th scope="col">{_esc(e.label)}</th>' for e in entries)
    body = "".join(f'<tr><th scope="row">{_esc(k)}</th>'
                   + "".join(f"<td>{format_html(k, e.summary.get(k))}</td>" for e in entries)
                   + "</tr>" for k in keys if k not in empty)
    note = ""
    if empty:
        why = " (replay: no requests)" if replay else ""
        note = (f'<p class="note" id="sim-summary-empty">No value for any placement{why}: '
                + ", ".join(f"<code>{_esc(k)}</code>" for k in empty) + ".</p>")
    return (f'<div class="table-scroll"><table class="sim-table" id="sim-summary"><thead><tr>'
            f"<th>metric</th>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}")


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf")


def _cdf(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Sorted finite values and their empirical CDF, thinned to CDF_MAX_POINTS points."""
    x = np.sort(values.to_numpy(dtype=np.float64, na_value=np.nan))
    x = x[np.isfinite(x)]
    y = np.arange(1, x.size + 1) / max(x.size, 1)
    if x.size > CDF_MAX_POINTS:
        keep = np.unique(np.linspace(0, x.size - 1, CDF_MAX_POINTS).round().astype(np.int64))
        x, y = x[keep], y[keep]
    return x, y


def _latency(go: Any, figs: _Figures, entries: list[_Entry]) -> str:
    from plotly.subplots import make_subplots  # deferred: plotly is needed only to render

    metrics: tuple[tuple[str, str], ...]
    if any(len(e.rows["requests"]) for e in entries):
        source = "requests"
        metrics = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "End-to-end"))
    else:
        source = "iterations"
        metrics = (("duration_s", "Iteration time"),)
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[m[1] for m in metrics])
    short: list[tuple[str, int]] = []
    for i, e in enumerate(entries):
        for col, (metric, _) in enumerate(metrics, start=1):
            x, y = _cdf(e.rows[source][metric])
            if col == 1 and x.size < SHORT_RUN_SAMPLES:
                short.append((e.label, int(x.size)))
            # An empirical CDF is a staircase: from 0 before the first sample to 1 at the last.
            x, y = np.concatenate([x[:1], x]), np.concatenate([[0.0], y])
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers" if x.size <= 50 else "lines",
                                     line_shape="hv", name=_esc(e.label), legendgroup=f"p{i}",
                                     showlegend=col == 1, marker={"size": 5},
                                     line={"color": _PALETTE[i % len(_PALETTE)]}),
                          row=1, col=col)
    fig.update_xaxes(title_text="seconds")
    fig.update_yaxes(title_text="fraction", range=[0, 1.02], row=1, col=1)
    fig.update_layout(height=380, margin={"t": 40, "b": 40}, template="plotly_white")
    return figs.html(fig, "plot-latency-cdf", "latency-cdf", "", source=source) + _short_note(
        short, "requests" if source == "requests" else "iterations")


def _short_note(short: list[tuple[str, int]], what: str) -> str:
    """A note naming the placements with too few samples for their percentiles."""
    if not short:
        return ""
    counts = sorted({n for _, n in short})
    if len(counts) == 1:
        who = f"{', '.join(label for label, _ in short)}: {counts[0]} {what} each"
    else:
        who = "; ".join(f"{label}: {n}" for label, n in short)
    return (f'<p class="note" id="note-short-run">Too short for its percentiles ({_esc(who)}): '
            f"with fewer than {SHORT_RUN_SAMPLES} {what} the p99 (and with fewer than 10 the "
            f"p90) is the largest sample, and each CDF is a staircase with one step per sample. "
            f"Simulate more {what} for tail latencies.</p>")


def _no_data(fig: Any, what: str) -> None:
    fig.add_annotation(text=f"no {what}", showarrow=False, xref="paper", yref="paper",
                       x=0.5, y=0.5)


def _phases(go: Any, entry: _Entry) -> Any:
    layers = entry.rows["layers"]
    fig = go.Figure()
    for col, name, color in PHASES:
        extra = {}
        if name in ("dispatch", "combine"):
            extra = {"customdata": layers[f"{name}_p99_s"].to_numpy(),
                     "hovertemplate": "layer %{x}: mean %{y:.4g} s, p99 %{customdata:.4g} s"}
        fig.add_trace(go.Bar(x=layers["layer"].to_numpy(), y=layers[col].to_numpy(), name=name,
                             marker_color=color, **extra))
    if "a2a_hidden_s" in layers:  # two-batch overlap: how much of dispatch + combine ran under compute
        hidden = layers["a2a_hidden_s"].to_numpy(dtype=np.float64)
        a2a = (layers["dispatch_s"] + layers["combine_s"]).to_numpy(dtype=np.float64)
        share = np.divide(hidden, a2a, out=np.zeros_like(hidden), where=a2a > 0)
        fig.add_trace(go.Scatter(x=layers["layer"].to_numpy(), y=hidden, name="a2a hidden", mode="lines+markers",
                                 line={"color": "#222222"}, customdata=share,
                                 hovertemplate="layer %{x}: %{y:.4g} s of dispatch + combine hidden "
                                               "(%{customdata:.1%})<extra></extra>"))
    if layers.empty:
        _no_data(fig, "MoE layers")
    fig.update_layout(barmode="stack", height=340, template="plotly_white",
                      margin={"t": 30, "b": 40}, xaxis_title="MoE layer",
                      yaxis_title="seconds per iteration")
    return fig


def _heat_height(rows: int) -> int:
    return int(max(300, min(900, 14 * rows + 140)))


def _gpu_load(go: Any, entry: _Entry) -> Any:
    load = entry.rows["gpu_load"]
    grid = load.pivot(index="layer", columns="gpu", values="pairs").sort_index().sort_index(axis=1)
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=grid.columns.to_numpy(),
                               y=grid.index.to_numpy(), colorscale="Viridis",
                               colorbar={"title": {"text": "pairs"}},
                               hovertemplate="layer %{y}, GPU %{x}: %{z:.4g} pairs<extra></extra>"))
    if load.empty:
        _no_data(fig, "GPU load rows")
    fig.update_layout(height=_heat_height(len(grid)), template="plotly_white",
                      margin={"t": 30, "b": 40}, xaxis_title="GPU", yaxis_title="MoE layer")
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


_LINK_KINDS = (("nvlink", "NVLink"), ("rdma", "RDMA"))


def _link_kinds(entry: _Entry) -> list[str]:
    """The link kinds that carried traffic in ``entry``'s run."""
    links = entry.rows["links"]
    return [kind for kind, _ in _LINK_KINDS
            if float(links.loc[links["kind"] == kind, "bytes"].sum()) > 0]


def _links_note(entry: _Entry) -> str:
    """Why a link kind is not drawn ("" when both are)."""
    kinds = _link_kinds(entry)
    notes = []
    if "rdma" not in kinds:
        notes.append("single node: no RDMA traffic" if entry.num_nodes == 1 else "no RDMA traffic")
    if "nvlink" not in kinds:
        notes.append("no NVLink traffic (one GPU per node)" if entry.num_nodes and "rdma" in kinds
                     else "no NVLink traffic")
    return "; ".join(notes)


def _links(go: Any, entry: _Entry) -> Any:
    from plotly.subplots import make_subplots  # deferred: plotly is needed only to render

    links = entry.rows["links"]
    ranks = sorted({*links["src"].tolist(), *links["dst"].tolist(),
                    *entry.rows["gpu_load"]["gpu"].tolist()})
    kinds = _link_kinds(entry)
    if not kinds:
        fig = go.Figure(go.Heatmap(z=[[0.0]], x=[0], y=[0], showscale=False, colorscale="Blues"))
        _no_data(fig, "link traffic")
        fig.update_layout(height=300, template="plotly_white", margin={"t": 40, "b": 40})
        return fig
    names = dict(_LINK_KINDS)
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=[f"{names[k]} bytes" for k in kinds],
                        horizontal_spacing=0.16)
    for col, kind in enumerate(kinds, start=1):
        part = links.loc[links["kind"] == kind]
        # Absent (src, dst) pairs carried no traffic: the layout lists only links with traffic.
        grid = (part.pivot(index="src", columns="dst", values="bytes")
                .reindex(index=ranks, columns=ranks).fillna(0.0))
        fig.add_trace(go.Heatmap(z=grid.to_numpy(), x=ranks, y=ranks, colorscale="Blues",
                                 colorbar={"x": 0.42 if col < len(kinds) else 1.0, "len": 0.9,
                                           "title": {"text": "bytes"}},
                                 hovertemplate="src %{y} -> dst %{x}: %{z:.4g} B<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="dst GPU", type="category", row=1, col=col)
        fig.update_yaxes(title_text="src GPU" if col == 1 else None, type="category",
                         autorange="reversed", row=1, col=col)
    fig.update_layout(height=_heat_height(len(ranks)), template="plotly_white",
                      margin={"t": 40, "b": 40})
    return fig
