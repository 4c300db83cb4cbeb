"""Evaluate context-coherent placement on the real Mixtral traces (HD-MoE, MT-Bench).

Leave-one-category-out: fit on four categories merged, score the placement on the fifth with
``placer.metrics.evaluate(..., execution="context-coherent")`` on the held-out *trace* (exact per
token). Reports, per split and GPU count, the held-out fraction of top-1 transitions that change
GPU and the median per-layer max/mean GPU load, for:

- ``contiguous`` (Megatron / vLLM default),
- ``exact-aff``: ``exact`` with no load term (``problem.weights = {"balance": 0}``),
- ``exact``: ``exact`` with the default load term (:func:`placer.ilp.coherent.make_objective`),
- ``local``, ``cpsat``, ``cbc``, ``highs``: :func:`placer.ilp.coherent.solve_coherent` backends
  with the default objective (MIPs warm-started from the local search where the backend allows).

``--full`` adds :func:`placer.ilp.coherent.compare_backends` on all five categories merged
(objective vs the exact optimum, status, bound, gap, wall time).

Run: ``.venv/bin/python benchmarks/eval_coherent.py [--gpus 4 8] [--mip-time 30] [--full]``.
Data: ``../shared/data/hdmoe-mixtral-mtbench`` relative to the repository (or ``--data``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from placer.ilp import PlacementProblem, solve
from placer.ilp import coherent as cc
from placer.ilp import exact as _exact  # noqa: F401  (registers "exact")
from placer.metrics import evaluate
from placer.presets import get_model, make_topology
from placer.stats import compute_stats
from placer.types import RoutingTrace

CATEGORIES = ("coding", "math", "reasoning", "roleplay", "writing")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hdmoe-mixtral-mtbench"
METHODS = ("contiguous", "exact-aff", "exact", "local", "cpsat", "cbc", "highs")


def load_trace(path: Path) -> np.ndarray:
    """HD-MoE JSON ``{"0".."31": [[top1, top2], ...]}`` -> int16 [T, 32, 2]."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return np.stack([np.asarray(data[str(layer)], dtype=np.int16) for layer in range(len(data))], axis=1)


def run_method(name: str, problem: PlacementProblem, mip_time: float, workers: int):
    base = dict(seed=0, num_workers=workers)
    if name == "contiguous":
        return solve(problem, "contiguous")
    if name == "exact-aff":
        return solve(PlacementProblem(problem.stats, problem.model, problem.topology,
                                      weights={"balance": 0.0}), "exact")
    if name == "exact":
        return solve(problem, "exact")
    if name == "local":
        return cc.solve_coherent(problem, backend="local", **base)
    if name == "cpsat":
        return cc.solve_coherent(problem, backend="cpsat", time_limit_s=mip_time, **base)
    if name in ("cbc", "highs"):
        return cc.solve_coherent(problem, backend="pulp", pulp_backend=name, time_limit_s=mip_time, **base)
    raise ValueError(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--gpus", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--mip-time", type=float, default=30.0, help="seconds per CP-SAT / PuLP solve")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="also compare backends on all data merged")
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"no data at {args.data}; nothing to evaluate")
        return 0
    model = get_model("mixtral-8x7b")
    traces = {c: RoutingTrace(load_trace(args.data / f"experts_{c}_mixtral.json"), 8, model=model)
              for c in CATEGORIES}
    rows = []
    for gpus in args.gpus:
        topo = make_topology("h100", gpus=gpus)
        print(f"\n=== {gpus} GPUs: held-out frac_top1_transitions_cross_gpu / median max-mean load "
              f"[solve status, gap, seconds] ===")
        print("split      " + "".join(f"{m:>28}" for m in args.methods))
        for held in CATEGORIES:
            fit_ids = np.concatenate([traces[c].expert_ids for c in CATEGORIES if c != held])
            fit = compute_stats(RoutingTrace(fit_ids, 8, model=model), sample_size=4096)
            problem = PlacementProblem(fit, model, topo, execution="context-coherent")
            cells = []
            for name in args.methods:
                t0 = time.perf_counter()
                try:
                    res = run_method(name, problem, args.mip_time, args.workers)
                except Exception as exc:  # noqa: BLE001 - report and continue
                    cells.append(f"{'error: ' + type(exc).__name__:>28}")
                    rows.append(dict(gpus=gpus, split=held, method=name, error=str(exc)))
                    continue
                wall = time.perf_counter() - t0
                ev = evaluate(res.placement, topo, model, traces[held], execution="context-coherent")
                tr, lb = ev["frac_top1_transitions_cross_gpu"], ev["load_max_over_mean_median"]
                gap = "-" if res.gap is None else f"{res.gap:.3f}"
                cells.append(f"{tr:.3f}/{lb:.3f} [{res.status[:4]},{gap},{wall:.1f}s]".rjust(28))
                rows.append(dict(gpus=gpus, split=held, method=name, transitions=tr, load=lb,
                                 status=res.status, gap=res.gap, wall_s=wall, objective=res.objective))
            print(f"{held:<11}" + "".join(cells), flush=True)
        for name in args.methods:
            sel = [r for r in rows if r["gpus"] == gpus and r["method"] == name and "error" not in r]
            if sel:
                ok = sum(r["transitions"] <= 0.60 and r["load"] <= 1.10 for r in sel)
                target = (f"  splits with transitions<=0.60 and load<=1.10: {ok}/{len(sel)}" if gpus == 4
                          else "")
                print(f"  {name:<11} mean transitions {statistics.mean(r['transitions'] for r in sel):.3f}  "
                      f"mean load {statistics.mean(r['load'] for r in sel):.3f}  median wall "
                      f"{statistics.median(r['wall_s'] for r in sel):.1f}s" + target)
    if args.full:
        all_ids = np.concatenate([traces[c].expert_ids for c in CATEGORIES])
        stats = compute_stats(RoutingTrace(all_ids, 8, model=model), sample_size=4096)
        for gpus in args.gpus:
            problem = PlacementProblem(stats, model, make_topology("h100", gpus=gpus),
                                       execution="context-coherent")
            print(f"\n=== compare_backends, all categories, {gpus} GPUs, {args.mip_time:.0f} s per MIP ===")
            out = cc.compare_backends(problem, time_limit_s=args.mip_time, num_workers=args.workers)
            for name, r in out.items():
                if "error" in r:
                    print(f"  {name:<6} error: {r['error']}")
                    continue
                bound = "None" if r["bound"] is None else f"{r['bound']:.6g}"
                gap = "None" if r["gap"] is None else f"{r['gap']:.4f}"
                mip = ""
                if r.get("mip_objective") is not None and out.get("exact", {}).get("objective"):
                    ex = out["exact"]["objective"]
                    mb = r.get("mip_bound")
                    mip = (f"  [MIP alone: incumbent {r['mip_objective'] / ex - 1:+.4%}, bound "
                           + ("None" if mb is None else f"{mb / ex - 1:+.4%}") + " vs exact]")
                print(f"  {name:<6} {r['status']:<9} objective {r['objective']:.6g}  bound {bound}  gap {gap}  "
                      f"vs exact {r.get('rel_to_exact', float('nan')):+.4%}  "
                      f"transitions {r['frac_top1_transitions_cross_gpu']:.4f}  "
                      f"load {r['load_max_over_mean_median']:.3f}  {r['wall_time_s']:.1f}s" + mip)
    return 0


if __name__ == "__main__":
    sys.exit(main())
