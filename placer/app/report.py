"""One HTML report of simulator results plus the solver's placement files (``placer report``).

The simulator's report (:mod:`placer.simulator.report`) draws what a results directory holds:
latency CDFs, per-layer phase times, per-GPU load heatmaps and link-traffic matrices. This
module adds, through that report's ``extra_sections`` hook, what placement files hold:

* the placements themselves (MoE layer x slot -> logical expert),
* per-GPU load bars for every placement whose load is known (the simulator's ``gpu_load.csv``;
  for a placement file, :func:`placer.metrics.gpu_load` on a routing input when one is given),
* first, the methods (:mod:`placer.app.report_methods`): one row per method with the columns
  that decide between placements, in units, and every metric behind a toggle (each placement
  file's ``metrics`` flattened, without solver internals, and every simulator summary),
* for a sweep directory, before them, each headline metric against GPU count and against rate
  (:mod:`placer.app.report_sweep`).

Placement files come from ``placements`` (paths), from the native placement JSONs found in the
results directory (recognised by their keys, :data:`placer.io.placements.NATIVE_KEYS`), and
from the files a simulation was run on (``metrics.json`` ``inputs.placements[label].path``,
when the file still exists with the recorded SHA-256). A file whose SHA-256 matches a simulated
placement shares that placement's column in the methods table.

Element ids added to those of :mod:`placer.simulator.report` (``j``: 0-based index of the
placement file in report order):

======================  =========================================================================
``report-headline``     ``<table>``: one row per method, the headline columns (first section)
``report-methods``      ``<table>`` inside ``<details id="report-methods-details">``: one column
                        per method (simulated placement or placement file), one row per metric
``plot-sweep-gpus``     sweeps only: headline metrics against GPU count (``plot-sweep-rate``:
                        against request rate); drawn when the axis has two values or more
``plot-gpu-bars``       bars per GPU: load / mean over GPUs (all MoE layers), and the worst
                        layer's load / that layer's mean; one bar group per placement with load
``plot-placement-{j}``  heatmap MoE layer x slot -> logical expert of the j-th placement file,
                        GPU boundaries drawn
======================  =========================================================================

Every plot follows the simulator report's convention: ``<div class="sim-plot" id=...
data-plot=... data-placement=...>`` around plotly's div ``"<id>-figure"``. :func:`report_plot_ids`
lists the plot ids of a report.

Example::

    info = render_full_report("sim/", "report.html", placements=["p.json"])
    info.plot_ids     # every plot div id in the page, in order
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from placer.app.report_methods import LIST_MAX, flatten_metrics, method_columns, methods_section
from placer.app.report_sweep import sweep_parts
from placer.errors import InvalidInputError
from placer.io.placements import NATIVE_KEYS, PlacementFile, read_placement_json
from placer.io.routing import gather_routing
from placer.metrics import gpu_load
from placer.simulator.report import plot_ids, render_report
from placer.simulator.results import METRICS_FILE, SimResults, read_results, sha256_of
from placer.types import RoutingStats, RoutingTrace

TEXT_CELLS_MAX = 2048
"""Placement heatmaps with at most this many cells print the expert id in each cell."""

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf")


@dataclass
class PlacementEntry:
    """A placement file shown in the report."""

    label: str
    path: Path
    file: PlacementFile
    sim_label: str | None = None
    """Report label of the simulated placement this file is (same SHA-256), if any."""
    gpu_load: np.ndarray | None = None
    """[MoE layers, GPUs] token-expert pairs on the routing input, when one was given."""


@dataclass
class ReportInfo:
    """What :func:`render_full_report` wrote."""

    output: Path
    sim_labels: list[str]
    placements: list[PlacementEntry]
    plot_ids: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Finding inputs
# --------------------------------------------------------------------------------------------

def results_items(results_dir: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """The results directories under ``results_dir``: itself, or a sweep's points.

    A directory with ``metrics.json`` is one result; a directory without one whose immediate
    sub-directories hold ``metrics.json`` is a sweep (points in name order). Anything else
    raises :class:`InvalidInputError` naming ``results_dir``.
    """
    root = Path(results_dir)
    if not root.exists():
        raise InvalidInputError("results directory not found", source=str(root))
    if not root.is_dir():
        raise InvalidInputError("is not a directory", source=str(root))
    if (root / METRICS_FILE).exists():
        return [(root.resolve().name or str(root), root)]
    points = sorted(p for p in root.iterdir() if p.is_dir() and (p / METRICS_FILE).is_file())
    if not points:
        raise InvalidInputError(f"not a results directory (no {METRICS_FILE}, and no sweep point "
                                f"directories holding one)", source=str(root))
    return [(p.name, p) for p in points]


def is_placement_json(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a JSON object with every key of a native placement file."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and all(k in doc for k in NATIVE_KEYS)


def placement_files_in(directory: str | os.PathLike[str]) -> list[Path]:
    """Native placement JSONs directly in ``directory`` (name order; ``metrics.json`` excluded)."""
    return [p for p in sorted(Path(directory).glob("*.json"))
            if p.name != METRICS_FILE and p.is_file() and is_placement_json(p)]


def _recorded_files(groups: list[tuple[str, SimResults, Path]]) -> list[Path]:
    """Files the simulations were run on that still exist with the recorded SHA-256."""
    found = []
    for _, res, directory in groups:
        for info in res.inputs.get("placements", {}).values():
            if not isinstance(info, dict) or not info.get("path") or not info.get("sha256"):
                continue
            for cand in (Path(info["path"]), directory / info["path"]):
                if cand.is_file() and sha256_of(cand) == info["sha256"]:
                    found.append(cand)
                    break
    return found


def _unique(names: list[str], taken: set[str]) -> list[str]:
    out = []
    for name in names:
        label, n = name, 2
        while label in taken:
            label, n = f"{name} #{n}", n + 1
        taken.add(label)
        out.append(label)
    return out


def collect_placements(paths: Sequence[str | os.PathLike[str]],
                       groups: list[tuple[str, SimResults, Path]], *, prefix: bool,
                       sim_labels: Sequence[str]) -> list[PlacementEntry]:
    """Read ``paths`` (each once, by resolved path) and match them to simulated placements."""
    seen: dict[Path, Path] = {}
    for p in paths:
        seen.setdefault(Path(p).resolve(), Path(p))
    files = list(seen.values())
    read = [(p, read_placement_json(p)) for p in files]
    by_sha: dict[str, str] = {}
    for name, res, _ in groups:
        for label, info in res.inputs.get("placements", {}).items():
            if isinstance(info, dict) and info.get("sha256"):
                by_sha.setdefault(info["sha256"], f"{name} / {label}" if prefix else label)
    labels = _unique([p.stem for p, _ in read], set(sim_labels))
    return [PlacementEntry(label, p, pf, by_sha.get(sha256_of(p)))
            for label, (p, pf) in zip(labels, read, strict=True)]


def attach_gpu_load(entries: Sequence[PlacementEntry],
                    routing: RoutingTrace | RoutingStats | None, *, source: str = "routing") -> None:
    """Set each entry's ``gpu_load`` from ``routing`` (its shape must match every placement)."""
    if routing is None:
        return
    layers = routing.num_layers
    for e in entries:
        pl = e.file.placement
        if (pl.num_layers, pl.num_experts) != (layers, routing.num_experts):
            raise InvalidInputError(f"routing has {layers} MoE layers x {routing.num_experts} "
                                    f"experts, placement {e.path} {pl.num_layers} x "
                                    f"{pl.num_experts}", source=source)
        e.gpu_load = gpu_load(pl, e.file.topology, routing, dispatch=e.file.dispatch)


# --------------------------------------------------------------------------------------------
# HTML helpers
# --------------------------------------------------------------------------------------------

def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _figure_html(fig: Any, div_id: str, kind: str, label: str) -> str:
    """A plotly figure in the simulator report's wrapper; plotly.js is not included.

    The simulator report inlines plotly.js in its first figure (the latency CDFs, always drawn
    before the extra sections), so these fragments only call ``Plotly.newPlot``.
    """
    inner = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"{div_id}-figure",
                        config={"displaylogo": False})
    return (f'<div class="sim-plot" id="{_esc(div_id)}" data-plot="{_esc(kind)}" '
            f'data-placement="{_esc(label)}">{inner}</div>')


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

def _sim_loads(groups: list[tuple[str, SimResults, Path]], prefix: bool
               ) -> list[tuple[str, np.ndarray]]:
    out = []
    for name, res, _ in groups:
        for label in res.labels:
            rows = res.rows("gpu_load", label)
            if rows.empty:
                continue
            grid = rows.pivot(index="layer", columns="gpu", values="pairs").sort_index()
            grid = grid.reindex(columns=range(int(rows["gpu"].max()) + 1)).fillna(0.0)
            out.append((f"{name} / {label}" if prefix else label, grid.to_numpy(np.float64)))
    return out


def gpu_bars(loads: Sequence[tuple[str, np.ndarray]]) -> Any:
    """Figure: per GPU, load / mean over GPUs (all layers) and the worst layer's load / mean."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        "load / mean load, all MoE layers", "worst MoE layer: load / that layer's mean"))
    for i, (label, grid) in enumerate(loads):
        total = grid.sum(axis=0)
        share = total / total.mean() if total.mean() > 0 else np.ones_like(total)
        mean = grid.mean(axis=1, keepdims=True)
        ratio = np.divide(grid, mean, out=np.ones_like(grid), where=mean > 0)
        worst = ratio.max(axis=0)
        gpus = [str(g) for g in range(grid.shape[1])]
        color = _PALETTE[i % len(_PALETTE)]
        fig.add_trace(go.Bar(x=gpus, y=share, name=_esc(label), legendgroup=f"p{i}",
                             marker_color=color, customdata=total,
                             hovertemplate="GPU %{x}: %{y:.4f} x mean (%{customdata:.4g} pairs)"
                                           "<extra>%{fullData.name}</extra>"), row=1, col=1)
        fig.add_trace(go.Bar(x=gpus, y=worst, name=_esc(label), legendgroup=f"p{i}",
                             showlegend=False, marker_color=color,
                             customdata=ratio.argmax(axis=0),
                             hovertemplate="GPU %{x}: %{y:.4f} x mean at layer %{customdata}"
                                           "<extra>%{fullData.name}</extra>"), row=1, col=2)
    if not loads:
        fig.add_annotation(text="no per-GPU load (no gpu_load rows; give --routing for "
                                "placement files)", showarrow=False, xref="paper", yref="paper",
                           x=0.5, y=0.5)
    fig.update_xaxes(title_text="GPU", type="category")
    fig.update_yaxes(title_text="x mean", row=1, col=1)
    fig.update_layout(barmode="group", height=380, template="plotly_white",
                      margin={"t": 40, "b": 40})
    return fig


def _expert_colorscale(num_experts: int) -> Any:
    if num_experts > len(_PALETTE):
        return "Turbo"
    scale = []
    for e in range(num_experts):
        color = _PALETTE[e]
        scale += [[e / num_experts, color], [(e + 1) / num_experts, color]]
    return scale


def placement_heatmap(entry: PlacementEntry) -> Any:
    """Figure: MoE layer x slot -> logical expert, with lines at GPU boundaries."""
    pl = entry.file.placement
    p2l = np.asarray(pl.physical_to_logical)
    layers, slots = p2l.shape
    spg = pl.slots_per_gpu
    gpu = np.broadcast_to(np.arange(slots) // spg, p2l.shape)
    text = {}
    if p2l.size <= TEXT_CELLS_MAX:
        text = {"texttemplate": "%{z}", "textfont": {"size": 9}}
    e = pl.num_experts
    fig = go.Figure(go.Heatmap(
        z=p2l, x=np.arange(slots), y=np.arange(layers), customdata=gpu, zmin=-0.5, zmax=e - 0.5,
        colorscale=_expert_colorscale(e), colorbar={"title": {"text": "expert"}},
        hovertemplate="layer %{y}, slot %{x} (GPU %{customdata}): expert %{z}<extra></extra>",
        **text))
    for g in range(pl.num_gpus):
        if g:
            fig.add_vline(x=g * spg - 0.5, line={"color": "white", "width": 3})
        if pl.num_gpus <= 32:
            fig.add_annotation(x=g * spg + (spg - 1) / 2, y=1.0, yref="paper", yanchor="bottom",
                               text=f"GPU {g}", showarrow=False, font={"size": 11})
    pf = entry.file
    fig.update_layout(
        title={"text": _esc(f"{pf.method} ({pf.status}): {pf.model.name}, {pl.num_gpus} GPUs x "
                            f"{spg} slots, {pl.num_redundant} redundant"), "font": {"size": 13}},
        height=int(max(300, min(900, 14 * layers + 160))), template="plotly_white",
        margin={"t": 70, "b": 40}, xaxis_title="slot (GPU = slot // slots per GPU)",
        yaxis_title="MoE layer")
    fig.update_yaxes(autorange="reversed")
    return fig


def report_plot_ids(num_sim_placements: int, num_placement_files: int,
                    sweep: Sequence[str] = ()) -> list[str]:
    """Plot div ids of a :func:`render_full_report` page, in page order (``sweep``: the sweep
    section's plot ids, first on the page)."""
    return [*sweep, *plot_ids(num_sim_placements), "plot-gpu-bars",
            *(f"plot-placement-{j}" for j in range(num_placement_files))]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def render_full_report(results_dir: str | os.PathLike[str], output_html: str | os.PathLike[str],
                       *, placements: Sequence[str | os.PathLike[str]] = (),
                       routing: RoutingTrace | RoutingStats | None = None,
                       routing_inputs: Sequence[str] = (), scan: bool = True,
                       title: str | None = None) -> ReportInfo:
    """Write the simulator report of ``results_dir`` with the placement sections (atomically).

    ``results_dir`` is a results directory or a sweep directory (see :func:`results_items`).
    ``placements``: native placement files to add; with ``scan`` the placement JSONs in
    ``results_dir`` and the files the simulations recorded are added too. ``routing``: a trace
    or statistics on which :func:`placer.metrics.gpu_load` gives placement files their load;
    or ``routing_inputs``, routing files read with the first placement file's model.
    """
    items = results_items(results_dir)
    groups = [(name, read_results(path), path) for name, path in items]
    prefix = len(groups) > 1
    sim_labels = [f"{n} / {lab}" if prefix else lab for n, res, _ in groups for lab in res.labels]
    paths: list[Path] = [Path(p) for p in placements]
    if scan:
        paths += placement_files_in(results_dir) + _recorded_files(groups)
    entries = collect_placements(paths, groups, prefix=prefix, sim_labels=sim_labels)
    source = "routing"
    if routing_inputs:
        source = ", ".join(str(p) for p in routing_inputs)
        if not entries:
            raise InvalidInputError("no placement file to compute the load of (give --placement "
                                    "FILE or put placement JSONs in the results directory)",
                                    source=source)
        routing = gather_routing(list(routing_inputs), model=entries[0].file.model).data
    attach_gpu_load(entries, routing, source=source)

    loads = _sim_loads(groups, prefix)
    loads += [(e.label, e.gpu_load) for e in entries
              if e.gpu_load is not None and e.sim_label is None]
    heatmaps = "".join(
        f"<h3>{_esc(e.sim_label or e.label)}</h3>"
        f'<p>file <code title="{_esc(e.path)}">{_esc(e.path.name)}</code></p>'
        + _figure_html(placement_heatmap(e), f"plot-placement-{j}", "placement",
                       e.sim_label or e.label)
        for j, e in enumerate(entries))
    if not entries:
        heatmaps = ("<p>No placement files: give <code>--placement FILE</code> or put the "
                    "<code>placer solve -o</code> JSON in the results directory.</p>")
    columns, skipped, internal = method_columns(groups, entries, prefix=prefix)
    lead: list[tuple[str, Any]] = []
    sweep_ids: list[str] = []
    if prefix:
        parts, sweep_ids = sweep_parts(groups)
        lead.append(("Sweep: headline metrics against GPU count and rate", parts))
    lead.append(("Methods", methods_section(columns, skipped=skipped, internal=internal)))
    extra = [
        ("Per-GPU load", _figure_html(gpu_bars(loads), "plot-gpu-bars", "gpu-bars", "")),
        ("Placements (MoE layer x slot: logical expert)", heatmaps),
    ]
    render_report([(name, res) for name, res, _ in groups] if prefix else groups[0][1],
                  output_html, title=title or f"placer report: {results_dir}",
                  extra_sections=extra, lead_sections=lead)
    return ReportInfo(Path(output_html), sim_labels, entries,
                      report_plot_ids(len(sim_labels), len(entries), sweep_ids))


__all__ = ["LIST_MAX", "PlacementEntry", "ReportInfo", "attach_gpu_load", "collect_placements",
           "flatten_metrics", "gpu_bars", "is_placement_json", "placement_files_in",
           "placement_heatmap", "render_full_report", "report_plot_ids", "results_items"]
