"""Reporting helpers of :mod:`placer.metrics`: metric descriptions and the text tables (values
through :mod:`placer.display`)."""

from __future__ import annotations

from typing import Any

from placer.display import format_value, table

METRIC_DESCRIPTIONS: dict[str, str] = {
    "load_max_over_mean_median": "GPU load max/mean per layer (token-slots served per GPU; with GPU speeds, the "
                                 "busiest GPU's load as time: load x mean speed / its speed), median over layers",
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
    "link_time_per_token_layer_s": "standard EP: bandwidth-weighted traffic, every send's bytes over its rank pair's "
                                   "bandwidth (seconds of link time), per token-layer, dispatch only",
    "frac_top1_transitions_cross_gpu": "top-1 expert GPU changes between consecutive layers / (tokens x (layers-1))",
    "frac_top1_transitions_cross_node": "top-1 expert node changes between consecutive layers / (tokens x (layers-1))",
    "cc_state_moves_per_token_layer": "context-coherent: token state moved to another GPU, per token-layer",
    "cc_other_gpus_per_token_layer": "context-coherent: GPUs other than the top-1 GPU serving the other experts, per token-layer",
    "cc_bytes_per_token_layer": "context-coherent: bytes per token-layer (state move + dispatch + combine of the other experts)",
    "expert_memory_bytes_per_gpu": "bytes of routed-expert weights per GPU",
    "expert_memory_frac_of_gpu_memory": "routed-expert weight bytes per GPU / GPU memory bytes",
}


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
        ("link_time_per_token_layer_s", "link time (bytes / pair bandwidth) per token-layer"),
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


def format_table(metrics: dict[str, Any]) -> str:
    """A readable aligned plain-text table of :func:`evaluate`'s output."""
    data = metrics.get("data") or {}
    head = [f"dispatch={metrics.get('dispatch')}  execution={metrics.get('execution')}  "
            f"seed={metrics.get('seed')}",
            f"model={metrics.get('model')}  cluster={metrics.get('cluster')}  "
            f"{metrics.get('num_nodes')} node(s) x {metrics.get('gpus_per_node')} GPUs  "
            f"slots/GPU={metrics.get('slots_per_gpu')}  redundant={metrics.get('num_redundant')}",
            f"data: {data.get('source')}, {format_value('tokens', data.get('tokens'))} tokens (of "
            f"{format_value('tokens', data.get('total_tokens'))})"
            + ("" if data.get("synthetic") is None else f", synthetic={data.get('synthetic')}")
            + f"; load from {metrics.get('load_source')}"
            + ("; load as time (GPU speeds)" if metrics.get("load_as_time") else "")]
    if data.get("inputs"):
        head.append("inputs: " + ", ".join(str(x) for x in data["inputs"]))
    rows: list[list[str] | str] = []
    for title, items in _TABLE_SECTIONS:
        if title.startswith(str(metrics.get("execution"))):
            title += "  [selected]"
        rows.append(f"[{title}]")
        rows += [["  " + label, format_value(key, metrics[key])] for key, label in items if key in metrics]
    lines = head + ["", table(rows)]
    if metrics.get("top1_note"):
        lines.append(f"top-1 metrics not computed: {metrics['top1_note']}")
    return "\n".join(lines)


_COMPARE_COLUMNS = (
    ("load_max_over_mean_median", "load med"),
    ("load_max_over_mean_worst", "load worst"),
    ("other_ranks_per_token_layer", "other ranks"),
    ("inter_node_nodes_per_token_layer", "inter-node"),
    ("frac_top1_transitions_cross_gpu", "cc x-GPU"),
)


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """Methods side by side: one line per (method, data) with headline metrics, status and gap.

    ``rows``: dicts with ``method``, ``data`` ("fit" / "holdout"), ``status``, ``gap``,
    ``solve_seconds`` and ``metrics`` (an :func:`evaluate` output).
    """
    header = ["method", "data", "status", "gap", "solve"] + [c[1] for c in _COMPARE_COLUMNS]
    body = []
    for row in rows:
        m = row["metrics"]
        body.append([row["method"], row["data"] + (" (synthetic)" if m.get("data", {}).get("synthetic") else ""),
                     row["status"], format_value("gap", row.get("gap")),
                     format_value("solve_seconds", row["solve_seconds"])]
                    + [format_value(key, m.get(key)) for key, _ in _COMPARE_COLUMNS])
    notes = ("load med/worst: max/mean GPU load over layers; other ranks and inter-node: DeepEP-style "
             "sends per token-layer; cc x-GPU: top-1 transitions that change GPU / tokens x (L-1)")
    top1 = list(dict.fromkeys(row["metrics"]["top1_note"] for row in rows if row["metrics"].get("top1_note")))
    return "\n".join([table(body, header=header, align="lll" + "r" * (len(header) - 3)), notes]
                     + [f"cc x-GPU not computed: {note}" for note in top1])
