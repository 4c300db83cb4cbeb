"""Placement methods side by side, always scored on data they were not fitted on.

Real Mixtral-8x7B traces (../shared/data/hdmoe-mixtral-mtbench, 5 MT-Bench categories):
leave-one-category-out (fit on 4 merged, score on the 5th), mean and worst over the splits, in
three settings: 8 GPUs context-coherent, 4 GPUs context-coherent, and 4 GPUs in 2 nodes with 4
redundant slots under standard execution. Synthetic DeepSeek-V3 and Qwen3-235B shapes: fit on
seed 0, score on seed 1 with a perturbed load profile (labelled synthetic).

Every number comes from placer.metrics.evaluate. Run:

    .venv/bin/python benchmarks/bench_solvers.py [--quick] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from placer.ilp import PlacementProblem, solve
from placer.metrics import evaluate
from placer.presets import get_model, make_topology
from placer.stats import compute_stats
from placer.synthetic import SCORING_PERTURBATION, perturbed, profile_for, synthesize_trace
from placer.types import RoutingTrace

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hdmoe-mixtral-mtbench"
CATEGORIES = ("coding", "math", "reasoning", "roleplay", "writing")
COLUMNS = (("load_max_over_mean_median", "load med"), ("load_max_over_mean_worst", "load worst"),
           ("other_ranks_per_token_layer", "other ranks"), ("inter_node_nodes_per_token_layer", "inter-node"),
           ("frac_top1_transitions_cross_gpu", "cc x-GPU"))


def load_category(name: str) -> np.ndarray:
    data = json.loads((DATA / f"experts_{name}_mixtral.json").read_text())
    return np.stack([np.asarray(data[str(layer)], dtype=np.int16) for layer in range(len(data))], axis=1)


def mixtral_splits():
    model = get_model("mixtral-8x7b")
    traces = {c: load_category(c) for c in CATEGORIES}
    for held in CATEGORIES:
        fit_ids = np.concatenate([traces[c] for c in CATEGORIES if c != held])
        fit = compute_stats(RoutingTrace(fit_ids, 8, model=model), sample_size=20000, seed=0)
        yield held, fit, RoutingTrace(traces[held], 8, model=model)


def synthetic_split(model_name: str, tokens: int):
    model = get_model(model_name)
    fit = compute_stats(synthesize_trace(model, tokens, seed=0), sample_size=min(tokens, 16384), seed=0)
    profile = perturbed(profile_for(model), SCORING_PERTURBATION, 1)
    yield "seed1-perturbed", fit, synthesize_trace(model, tokens, seed=1, profile=profile)


SETTINGS = {
    "mixtral-8gpu-cc": dict(
        title="Mixtral-8x7B, 8 GPUs (1 node), context-coherent, no replicas",
        splits=mixtral_splits, gpus=8, nodes=1, redundant=0, execution="context-coherent",
        methods=[("contiguous", {}), ("eplb", {}), ("moetuner", {}), ("exflow", {}), ("exact", {}),
                 ("placer", {})]),
    "mixtral-4gpu-cc": dict(
        title="Mixtral-8x7B, 4 GPUs (1 node), context-coherent, no replicas",
        splits=mixtral_splits, gpus=4, nodes=1, redundant=0, execution="context-coherent",
        methods=[("contiguous", {}), ("eplb", {}), ("moetuner", {}), ("exflow", {}), ("exact", {}),
                 ("placer", {})]),
    "mixtral-4gpu-2node-replicas": dict(
        title="Mixtral-8x7B, 4 GPUs in 2 nodes, 4 redundant slots, standard execution, dispatch nearest",
        splits=mixtral_splits, gpus=4, nodes=2, redundant=4, execution="standard",
        methods=[("contiguous", {}), ("eplb", {}), ("placer", {})]),
    "deepseek-v3-64gpu": dict(
        title="DeepSeek-V3 shape (synthetic), 64 GPUs in 8 nodes, 64 redundant slots, standard execution",
        splits=lambda: synthetic_split("deepseek-v3", 20000), gpus=64, nodes=8, redundant=64,
        execution="standard", methods=[("contiguous", {}), ("eplb", {}), ("placer", {})]),
    "qwen3-235b-32gpu": dict(
        title="Qwen3-235B-A22B shape (synthetic), 32 GPUs in 4 nodes, 32 redundant slots, standard execution",
        splits=lambda: synthetic_split("qwen3-235b-a22b", 20000), gpus=32, nodes=4, redundant=32,
        execution="standard", methods=[("contiguous", {}), ("eplb", {}), ("placer", {})]),
}


def run_setting(name: str, spec: dict, time_limit_s: float | None) -> list[dict]:
    topology = make_topology("h100", gpus=spec["gpus"], nodes=spec["nodes"])
    rows = []
    for held, fit, test in spec["splits"]():
        model = fit.model
        problem = PlacementProblem(fit, model, topology, num_redundant=spec["redundant"],
                                   execution=spec["execution"])
        for method, options in spec["methods"]:
            start = time.perf_counter()
            result = solve(problem, method, time_limit_s=time_limit_s, seed=0, **options)
            seconds = time.perf_counter() - start
            held_out = evaluate(result.placement, topology, model, test, execution=spec["execution"])
            fitted = evaluate(result.placement, topology, model, fit, execution=spec["execution"])
            rows.append({"setting": name, "split": held, "method": method, "status": result.status,
                         "gap": result.gap, "seconds": seconds, "held": held_out, "fit": fitted})
            print(f"  {name} {held:>16} {method:>10}: {result.status:>8} {seconds:7.2f} s  "
                  f"held cc={held_out['frac_top1_transitions_cross_gpu']:.3f} "
                  f"load={held_out['load_max_over_mean_median']:.3f} "
                  f"inter={held_out['inter_node_nodes_per_token_layer']:.3f}", file=sys.stderr, flush=True)
    return rows


def summarize(rows: list[dict], spec: dict) -> str:
    methods = [m for m, _ in spec["methods"]]
    head = ["method", "status", "gap", "solve s"] + [f"{label} mean/worst" for _, label in COLUMNS] + ["cc x-GPU fit"]
    table = [head]
    worse_is_higher = True
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        statuses = sorted({r["status"] for r in mine})
        gaps = [r["gap"] for r in mine if r["gap"] is not None]
        line = [method, "/".join(statuses), f"{max(gaps):.2%}" if gaps else "-",
                f"{np.median([r['seconds'] for r in mine]):.2f}"]
        for key, _ in COLUMNS:
            values = [r["held"][key] for r in mine if r["held"].get(key) is not None]
            if not values:
                line.append("n/a")
                continue
            worst = max(values) if worse_is_higher else min(values)
            line.append(f"{np.mean(values):.3f} / {worst:.3f}")
        fit_cc = [r["fit"]["frac_top1_transitions_cross_gpu"] for r in mine
                  if r["fit"].get("frac_top1_transitions_cross_gpu") is not None]
        line.append(f"{np.mean(fit_cc):.3f}" if fit_cc else "n/a")
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(SETTINGS), help="Run only these settings.")
    parser.add_argument("--time-limit", type=float, default=None, help="Wall-clock limit per solve (s).")
    parser.add_argument("--json", type=Path, default=None, help="Also write all rows as JSON.")
    args = parser.parse_args()
    names = args.only or list(SETTINGS)
    if not DATA.exists():
        names = [n for n in names if not n.startswith("mixtral")]
        print(f"note: {DATA} not found; the real-trace settings are skipped", file=sys.stderr)
    all_rows = []
    for name in names:
        spec = SETTINGS[name]
        rows = run_setting(name, spec, args.time_limit)
        all_rows += rows
        splits = sorted({r["split"] for r in rows})
        print(f"\n### {spec['title']}\n")
        print(f"Scored held out ({', '.join(splits)}); mean / worst over {len(splits)} split(s); "
              "solve s is the median.\n")
        print(summarize(rows, spec))
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
