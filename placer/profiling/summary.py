"""Per-layer summaries of routing statistics: expert-load skew and inter-layer affinity."""

from __future__ import annotations

import numpy as np

from placer.display import format_value, table
from placer.types import RoutingStats


def layer_skew(load: np.ndarray) -> dict[str, np.ndarray]:
    """Expert-load skew per layer. ``load``: [L, E]. Returns arrays of shape [L]."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean(axis=1)
    safe = np.where(mean > 0, mean, 1.0)
    return {
        "max_over_mean": np.where(mean > 0, load.max(axis=1) / safe, 1.0),
        "min_over_mean": np.where(mean > 0, load.min(axis=1) / safe, 1.0),
        "cv": np.where(mean > 0, load.std(axis=1) / safe, 0.0),
    }


def top1_affinity(transitions: np.ndarray, top: int = 2) -> dict[str, np.ndarray]:
    """How predictable the next layer's top-1 expert is from the current one.

    ``transitions``: [L-1, E, E] top-1 transition counts. Returns arrays of shape [L-1]:
    ``affinity`` = fraction of tokens whose next top-1 is among the ``top`` most likely
    successors of their current top-1 (in-sample), ``marginal`` = fraction whose next top-1 is
    among the ``top`` most loaded top-1 experts of the next layer, and ``mutual_information_bits``.
    """
    t = np.asarray(transitions, dtype=np.float64)
    total = t.sum(axis=(1, 2))
    safe = np.where(total > 0, total, 1.0)
    best = np.sort(t, axis=2)[:, :, ::-1][:, :, :top].sum(axis=(1, 2))
    nxt = t.sum(axis=1)
    marginal = np.sort(nxt, axis=1)[:, ::-1][:, :top].sum(axis=1)
    p = t / safe[:, None, None]
    pi = p.sum(axis=2, keepdims=True)
    pj = p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / (pi * pj)), 0.0)
    return {"affinity": best / safe, "marginal": marginal / safe,
            "mutual_information_bits": terms.sum(axis=(1, 2))}


def summarize(stats: RoutingStats) -> dict:
    """Per-layer skew (and top-1 affinity when known), plus medians, as plain lists and floats."""
    skew = layer_skew(stats.load)
    out: dict = {
        "tokens": int(stats.num_tokens), "layers": stats.num_layers, "experts": stats.num_experts,
        "top_k": stats.top_k, "phase": stats.phase,
        "per_layer": {k: v.round(6).tolist() for k, v in skew.items()},
        "median": {k: float(np.median(v)) for k, v in skew.items()},
        "worst_max_over_mean": float(skew["max_over_mean"].max()),
    }
    if stats.top1_transitions is not None and stats.num_layers > 1:
        aff = top1_affinity(stats.top1_transitions)
        out["per_transition"] = {k: v.round(6).tolist() for k, v in aff.items()}
        out["median"].update({k: float(np.median(v)) for k, v in aff.items()})
        out["mean"] = {k: float(np.mean(v)) for k, v in aff.items()}
    return out


def format_summary(summary: dict, counts_only: bool = False) -> str:
    """A plain-text table of :func:`summarize`'s output. ``counts_only``: the input held expert
    counts and named no model, so top-k (and so the token count) is unknown."""
    if counts_only:
        lines = [f"counts only: {summary['tokens']:,} expert selections in the busiest layer, {summary['layers']} MoE layers, "
                 f"E={summary['experts']} (top-k and tokens unknown: give --model), phase={summary['phase']}"]
    else:
        lines = [f"{summary['tokens']:,} tokens, {summary['layers']} MoE layers, E={summary['experts']}, "
                 f"top_k={summary['top_k']}, phase={summary['phase']}"]
    has_aff = "per_transition" in summary
    header = ["layer", "max/mean", "min/mean", "cv"]
    if has_aff:
        header += ["next top-1 in top-2 succ.", "marginal top-2", "MI bits"]
    pl, pt = summary["per_layer"], summary.get("per_transition", {})
    rows = []
    for i in range(summary["layers"]):
        row = [str(i)] + [format_value(k, pl[k][i]) for k in ("max_over_mean", "min_over_mean", "cv")]
        if has_aff and i < summary["layers"] - 1:
            row += [format_value(k, pt[k][i]) for k in ("affinity", "marginal", "mutual_information_bits")]
        rows.append(row)
    lines.append(table(rows, header=header, align="r" * len(header)))
    med = summary["median"]
    tail = (f"median expert load max/mean {format_value('', med['max_over_mean'])} (worst layer "
            f"{format_value('', summary['worst_max_over_mean'])})")
    if has_aff:
        tail += (f"; next-layer top-1 among the 2 most likely successors {format_value('', summary['mean']['affinity'])}"
                 f" vs {format_value('', summary['mean']['marginal'])} for the 2 most loaded (means over transitions)")
    elif summary.get("top1_note"):
        tail += f"; top-1 affinity not computed: {summary['top1_note']}"
    else:
        tail += "; affinity unavailable (top-1 order unknown or counts only)"
    lines.append(tail)
    return "\n".join(lines)
