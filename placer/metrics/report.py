"""Reporting helpers of :mod:`placer.metrics`: metric descriptions, plain values, the text table."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

METRIC_DESCRIPTIONS: dict[str, str] = {
    "load_max_over_mean_median": "GPU load max/mean per layer (token-slots served per GPU), median over layers",
    "load_max_over_mean_worst": "GPU load max/mean per layer, largest over layers",
    "load_max_over_mean_worst_layer": "MoE layer index (0-based) of the largest max/mean",
    "intra_node_ranks_per_token_layer": "standard EP: other ranks in the home node receiving the token, per token-layer",
    "inter_node_nodes_per_token_layer": "standard EP: remote nodes receiving the token (one RDMA send each), per token-layer",
    "remote_node_ranks_per_token_layer": "standard EP: destination ranks in remote nodes, per token-layer",
    "other_ranks_per_token_layer": "standard EP: ranks other than home receiving the token, per token-layer",
    "rdma_bytes_per_token_layer": "standard EP: RDMA bytes sent per token-layer, dispatch only (combine is the same back)",
    "nvlink_bytes_per_token_layer": "standard EP: NVLink bytes per token-layer (intra-node sends + forwarding in remote nodes), dispatch only",
    "frac_token_slots_off_gpu": "token-expert pairs served off the home GPU / (tokens x layers x top_k)",
    "frac_token_slots_off_node": "token-expert pairs served off the home node / (tokens x layers x top_k)",
    "frac_top1_transitions_cross_gpu": "top-1 expert GPU changes between consecutive layers / (tokens x (layers-1))",
    "frac_top1_transitions_cross_node": "top-1 expert node changes between consecutive layers / (tokens x (layers-1))",
    "cc_state_moves_per_token_layer": "context-coherent: token state moved to another GPU, per token-layer",
    "cc_other_gpus_per_token_layer": "context-coherent: GPUs other than the top-1 GPU serving the other experts, per token-layer",
    "cc_bytes_per_token_layer": "context-coherent: bytes per token-layer (state move + dispatch + combine of the other experts)",
    "expert_memory_bytes_per_gpu": "bytes of routed-expert weights per GPU",
    "expert_memory_frac_of_gpu_memory": "routed-expert weight bytes per GPU / GPU memory bytes",
}


def plain(v: Any) -> Any:
    """Plain JSON-serialisable Python values (NaN -> None)."""
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [plain(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else float(v)
    return v


# --------------------------------------------------------------------------------------------
# Text table
# --------------------------------------------------------------------------------------------

_TABLE_SECTIONS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("GPU load", (
        ("load_max_over_mean_median", "max/mean GPU load, median over layers"),
        ("load_max_over_mean_worst", "max/mean GPU load, worst layer"),
        ("load_max_over_mean_worst_layer", "worst layer"),
    )),
    ("standard EP (dispatch direction; combine is symmetric)", (
        ("other_ranks_per_token_layer", "ranks other than home, per token-layer"),
        ("intra_node_ranks_per_token_layer", "same-node ranks, per token-layer"),
        ("inter_node_nodes_per_token_layer", "remote nodes (RDMA sends), per token-layer"),
        ("remote_node_ranks_per_token_layer", "remote-node ranks, per token-layer"),
        ("rdma_bytes_per_token_layer", "RDMA bytes per token-layer"),
        ("nvlink_bytes_per_token_layer", "NVLink bytes per token-layer"),
        ("frac_token_slots_off_gpu", "token-expert pairs off home GPU / all pairs"),
        ("frac_token_slots_off_node", "token-expert pairs off home node / all pairs"),
    )),
    ("context-coherent (ExFlow)", (
        ("frac_top1_transitions_cross_gpu", "top-1 cross-GPU transitions / tokens x (L-1)"),
        ("frac_top1_transitions_cross_node", "top-1 cross-node transitions / tokens x (L-1)"),
        ("cc_state_moves_per_token_layer", "state moves per token-layer"),
        ("cc_other_gpus_per_token_layer", "other-expert GPUs per token-layer"),
        ("cc_bytes_per_token_layer", "bytes per token-layer (move + dispatch + combine)"),
    )),
    ("memory", (
        ("expert_memory_bytes_per_gpu", "routed-expert weights per GPU"),
        ("expert_memory_frac_of_gpu_memory", "expert weights / GPU memory"),
    )),
)


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool) or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if "bytes" in key and not key.startswith("frac"):
        for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
            if abs(v) >= scale:
                return f"{v / scale:.3f} {unit}"
        return f"{v:.1f} B"
    return f"{v:.4f}"


def format_table(metrics: dict[str, Any]) -> str:
    """A readable aligned plain-text table of :func:`evaluate`'s output."""
    data = metrics.get("data") or {}
    head = [f"dispatch={metrics.get('dispatch')}  execution={metrics.get('execution')}  "
            f"seed={metrics.get('seed')}",
            f"model={metrics.get('model')}  cluster={metrics.get('cluster')}  "
            f"{metrics.get('num_nodes')} node(s) x {metrics.get('gpus_per_node')} GPUs  "
            f"slots/GPU={metrics.get('slots_per_gpu')}  redundant={metrics.get('num_redundant')}",
            f"data: {data.get('source')}, {data.get('tokens')} tokens (of {data.get('total_tokens')})"
            + ("" if data.get("synthetic") is None else f", synthetic={data.get('synthetic')}")
            + f"; load from {metrics.get('load_source')}"]
    if data.get("inputs"):
        head.append("inputs: " + ", ".join(str(x) for x in data["inputs"]))
    rows: list[tuple[str, str]] = []
    for title, items in _TABLE_SECTIONS:
        if title.startswith(str(metrics.get("execution"))):
            title += "  [selected]"
        rows.append((f"[{title}]", ""))
        for key, label in items:
            if key in metrics:
                rows.append(("  " + label, _fmt(key, metrics[key])))
    width = max(len(label) for label, v in rows if v)
    vwidth = max(len(v) for _, v in rows)
    lines = head + [""] + [f"{label.ljust(width)}  {v.rjust(vwidth)}" if v else label for label, v in rows]
    if metrics.get("top1_note"):
        lines.append(f"top-1 metrics n/a: {metrics['top1_note']}")
    return "\n".join(lines)


_COMPARE_COLUMNS = (
    ("load_max_over_mean_median", "load med", "{:.3f}"),
    ("load_max_over_mean_worst", "load worst", "{:.3f}"),
    ("other_ranks_per_token_layer", "other ranks", "{:.3f}"),
    ("inter_node_nodes_per_token_layer", "inter-node", "{:.3f}"),
    ("frac_top1_transitions_cross_gpu", "cc x-GPU", "{:.3f}"),
)


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """Methods side by side: one line per (method, data) with headline metrics, status and gap.

    ``rows``: dicts with ``method``, ``data`` ("fit" / "holdout"), ``status``, ``gap``,
    ``solve_seconds`` and ``metrics`` (an :func:`evaluate` output).
    """
    header = ["method", "data", "status", "gap", "solve s"] + [c[1] for c in _COMPARE_COLUMNS]
    table = [header]
    for row in rows:
        m = row["metrics"]
        gap = row.get("gap")
        line = [row["method"], row["data"] + (" (synthetic)" if m.get("data", {}).get("synthetic") else ""),
                row["status"], "-" if gap is None else f"{gap:.2%}", f"{row['solve_seconds']:.2f}"]
        for key, _, fmt in _COMPARE_COLUMNS:
            value = m.get(key)
            line.append("n/a" if value is None else fmt.format(value))
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    out = []
    for n, r in enumerate(table):
        out.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = ("load med/worst: max/mean GPU load over layers; other ranks and inter-node: DeepEP-style "
             "sends per token-layer; cc x-GPU: top-1 transitions that change GPU / tokens x (L-1)")
    top1 = list(dict.fromkeys(row["metrics"]["top1_note"] for row in rows if row["metrics"].get("top1_note")))
    return "\n".join(out + [notes] + [f"cc x-GPU n/a: {note}" for note in top1])
