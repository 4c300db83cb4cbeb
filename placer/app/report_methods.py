"""The report's methods tables: the headline one a reader looks at first, and every metric.

Each method is a simulated placement, a placement file, or both (a file whose SHA-256 matches a
simulated placement). :func:`headline_table` has one row per method and the columns that decide
between placements, in units; :func:`methods_table` has one column per method and one row per
metric (file facts, the file's ``metrics`` flattened, the simulator's summary), without solver
internals and without rows that no method has. The page shows the second behind a toggle.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from placer.display import format_html, is_missing
from placer.io.placements import PlacementFile
from placer.simulator.results import SimResults

LIST_MAX = 8
"""Lists in a placement's ``metrics`` longer than this (per-layer arrays) are left out of the
methods table; shorter ones are shown joined."""

INTERNAL = re.compile(r"(^|\.)(objective\.terms\.(start_.*|returned_start)|objective\.start(_.*)?"
                      r"|start_j|start_objective)$")
"""Flattened metric keys that are solver internals (which start the search returned, each start's
objective): left out of the report."""

DUPLICATES = ("num_gpus", "num_nodes", "gpus_per_node", "slots_per_gpu", "num_redundant", "model",
              "cluster", "dispatch")
"""Keys of a file's ``metrics`` that repeat the file's own facts (shown once, as file rows)."""

HEADLINE: tuple[tuple[str, str, str], ...] = (
    # (column, where: info / metrics / sim, key)
    ("status", "info", "status"),
    ("solve time", "info", "solve_seconds"),
    ("GPUs", "info", "GPUs"),
    ("max/mean GPU load, median layer", "metrics", "load_max_over_mean_median"),
    ("max/mean GPU load, worst layer", "metrics", "load_max_over_mean_worst"),
    ("other GPUs per token-layer", "metrics", "other_ranks_per_token_layer"),
    ("other nodes per token-layer", "metrics", "inter_node_nodes_per_token_layer"),
    ("top-1 expert changes GPU", "metrics", "frac_top1_transitions_cross_gpu"),
    ("throughput", "sim", "throughput_tok_s"),
    ("step p50", "sim", "iteration_p50_s"),
    ("step p99", "sim", "iteration_p99_s"),
    ("TTFT p99", "sim", "ttft_p99_s"),
    ("TPOT p99", "sim", "tpot_p99_s"),
    ("all-to-all p99", "sim", "a2a_p99_s"),
    ("straggler share", "sim", "straggler_share"),
    ("RDMA bytes", "sim", "rdma_bytes"),
)
"""The headline table's columns; a column no method has a value for is left out, and so are the
inter-node ones when every method runs on one node."""

_MULTI_NODE_ONLY = ("inter_node_nodes_per_token_layer", "rdma_bytes")


class PlacementEntry(Protocol):
    """A placement file shown in the report (:class:`placer.app.report.PlacementEntry`)."""

    label: str
    path: Path
    file: PlacementFile
    sim_label: str | None


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """Scalar leaves of ``metrics`` keyed by dotted path, and the keys of the lists left out.

    Lists of at most :data:`LIST_MAX` scalars become one comma-joined string; longer lists
    (per-layer arrays) are left out and their keys returned.
    """
    flat: dict[str, Any] = {}
    skipped: list[str] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            sub, sub_skipped = flatten_metrics(value, f"{name}.")
            flat.update(sub)
            skipped += sub_skipped
        elif isinstance(value, list):
            if len(value) <= LIST_MAX and all(not isinstance(x, (list, dict)) for x in value):
                flat[name] = ", ".join(str(x) for x in value)
            else:
                skipped.append(name)
        else:
            flat[name] = value
    return flat, skipped


def is_internal(key: str) -> bool:
    """Whether flattened metric ``key`` is left out of the report (solver internal or duplicate)."""
    return bool(INTERNAL.search(key)) or key.rsplit(".", 1)[-1] in DUPLICATES


@dataclass
class Column:
    """One method: its facts, its placement file's flattened metrics, its simulated summary."""

    label: str
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    sim: dict[str, Any] = field(default_factory=dict)

    def get(self, where: str, key: str) -> Any:
        """A value; a file's metrics are looked up held-out first (``holdout.<key>``, the demo)."""
        if where == "metrics":
            return self.metrics.get(f"holdout.{key}", self.metrics.get(key))
        return (self.info if where == "info" else self.sim).get(key)


def _file_info(e: PlacementEntry) -> dict[str, Any]:
    pf, pl = e.file, e.file.placement
    return {"placement file": e.path.name, "method": pf.method, "status": pf.status,
            "solve_seconds": pf.solve_seconds, "model": pf.model.name, "cluster": pf.topology.name,
            "GPUs": pf.topology.num_gpus, "nodes": pf.topology.num_nodes,
            "slots per GPU": pl.slots_per_gpu, "redundant slots": pl.num_redundant,
            "dispatch": pf.dispatch}


def method_columns(groups: list[tuple[str, SimResults, Path]], entries: Sequence[PlacementEntry],
                   *, prefix: bool) -> tuple[list[Column], list[str], list[str]]:
    """The methods, and the metric keys left out: per-layer arrays, solver internals."""
    columns: list[Column] = []
    by_label: dict[str, Column] = {}
    for name, res, _ in groups:
        topo = res.inputs.get("topology") or {}
        model = res.inputs.get("model") or {}
        for label in res.labels:
            col = Column(f"{name} / {label}" if prefix else label)
            placed = res.inputs.get("placements", {}).get(label) or {}
            col.info = {"results": name, "method": placed.get("method"),
                        "model": model.get("name"), "cluster": topo.get("name"),
                        "GPUs": (topo.get("num_nodes") or 0) * (topo.get("gpus_per_node") or 0)
                        or None, "nodes": topo.get("num_nodes")}
            col.sim = dict(res.summaries[label])
            columns.append(col)
            by_label[col.label] = col
    skipped: set[str] = set()
    internal: set[str] = set()
    for e in entries:
        found = by_label.get(e.sim_label) if e.sim_label else None
        col = found if found is not None else Column(e.label)
        if found is None:
            columns.append(col)
        col.info.update(_file_info(e))
        flat, skip = flatten_metrics(e.file.metrics)
        internal.update(k for k in flat if is_internal(k))
        col.metrics = {k: v for k, v in flat.items() if not is_internal(k)}
        skipped.update(skip)
    return columns, sorted(skipped), sorted(internal)


def _keys(dicts: Iterable[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for d in dicts:
        keys += [k for k in d if k not in keys]
    return keys


def headline_table(columns: Sequence[Column]) -> str:
    """``<table id="report-headline">``: one row per method, the columns that matter, in units."""
    multi_node = any((c.info.get("nodes") or 1) > 1 for c in columns)
    shown = [(title, where, key) for title, where, key in HEADLINE
             if (multi_node or key not in _MULTI_NODE_ONLY)
             and not all(is_missing(c.get(where, key)) for c in columns)]
    head = "".join(f'<th scope="col" title="{_esc(key)}">{_esc(title)}</th>'
                   for title, _, key in shown)
    body = "".join(f'<tr><th scope="row">{_esc(c.label)}</th>'
                   + "".join(f"<td>{format_html(key, c.get(where, key))}</td>"
                             for _, where, key in shown) + "</tr>" for c in columns)
    held = any("holdout.load_max_over_mean_median" in c.metrics for c in columns)
    note = ("Load and traffic columns: the placement file's metrics"
            + (" on the held-out routing" if held else "") + "; throughput to straggler share: "
            "the simulator's summary (step: one iteration; straggler share: how often the GPU "
            "that most often finished a layer last did so). Hover a column for its metric key.")
    return (f'<div class="table-scroll"><table class="sim-table" id="report-headline"><thead><tr>'
            f"<th>method</th>{head}</tr></thead><tbody>{body}</tbody></table></div>"
            f'<p class="note">{note}</p>')


def methods_table(columns: Sequence[Column], *, skipped: Sequence[str] = (),
                  internal: Sequence[str] = ()) -> str:
    """``<table id="report-methods">``: one column per method, one row per metric any has."""
    rows = ([(k, [c.info.get(k) for c in columns]) for k in _keys(c.info for c in columns)]
            + [(f"metrics.{k}", [c.metrics.get(k) for c in columns])
               for k in _keys(c.metrics for c in columns)]
            + [(f"sim.{k}", [c.sim.get(k) for c in columns]) for k in _keys(c.sim for c in columns)])
    empty = [k for k, values in rows if all(is_missing(v) for v in values)]
    head = "".join(f'<th scope="col">{_esc(c.label)}</th>' for c in columns)
    body = "".join(f'<tr><th scope="row">{_esc(k)}</th>'
                   + "".join(f"<td>{format_html(k, v)}</td>" for v in values) + "</tr>"
                   for k, values in rows if k not in empty)
    note = ("<p class=\"note\">metrics.*: the placement file's <code>metrics</code> (evaluated by "
            "<code>placer solve</code>); sim.*: the simulator's summary.")
    for what, keys in (("Per-layer arrays left out", [f"metrics.{k}" for k in skipped]),
                       ("No value for any method", empty),
                       ("Solver internals left out", [f"metrics.{k}" for k in internal])):
        if keys:
            note += f" {what}: " + ", ".join(f"<code>{_esc(k)}</code>" for k in keys) + "."
    return (f'<div class="table-scroll"><table class="sim-table" id="report-methods"><thead><tr>'
            f"<th>metric</th>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}</p>")


def methods_section(columns: Sequence[Column], *, skipped: Sequence[str] = (),
                    internal: Sequence[str] = ()) -> str:
    """The headline table, then every metric behind a ``<details id="report-methods-details">``."""
    return (headline_table(columns)
            + '<details id="report-methods-details"><summary>Every metric of every method '
              "(file facts, the placement file's metrics, the simulator's summary)</summary>"
            + methods_table(columns, skipped=skipped, internal=internal) + "</details>")
