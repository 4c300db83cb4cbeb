"""Benchmark: replication + placement on real Mixtral traces, leave one category out.

Setting: Mixtral-8x7B, 4 GPUs in 2 nodes (2 GPUs per node), 4 redundant slots (3 slots per
GPU), standard execution, H100 cluster numbers, one dispatch rule (``--dispatch``, default
``nearest``; ``sglang-static`` and ``vllm`` apply those stacks' exact rules to the Mixtral
traces: rule only, SGLang 0.5.23 cannot load a Mixtral placement). Every method is solved and
scored under that rule. For each MT-Bench
category of ``shared/data/hdmoe-mixtral-mtbench`` the methods are fitted on the other
categories merged (stats with a ``--sample-size`` reservoir sample) and scored on the held-out
category with :func:`placer.metrics.evaluate` (exact, per token): the median over layers of the
per-layer max/mean GPU load, and inter-node dispatches per token-layer
(``inter_node_nodes_per_token_layer``). The table gives every split, then the mean and the
worst split per method, and the placer-vs-EPLB differences (targets: load within 0.02 of EPLB,
>= 40 % fewer inter-node dispatches).

``--synthetic-model deepseek-v2-lite`` runs the same table on synthetic routing of that preset
(a model SGLang 0.5.23 does load): fit on one synthetic trace, score on five perturbed held-out
traces (one per "split"); labelled synthetic.

``--deepseek-v3`` also times the ``placer`` method on the DeepSeek-V3 shape (256 experts x 58
MoE layers, 64 GPUs in 8 nodes, 64 redundant slots) from a synthetic trace with a 16k-token
sample (median of ``--reps`` solves).

Run: ``.venv/bin/python benchmarks/eval_replication.py [--deepseek-v3]``.
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
from placer.metrics import evaluate
from placer.presets import get_model, make_topology
from placer.stats import compute_stats
from placer.types import RoutingTrace

ROOT = Path(__file__).resolve().parents[1]
DATA_CANDIDATES = [ROOT.parent / "shared" / "data" / "hdmoe-mixtral-mtbench",
                   ROOT / "shared" / "data" / "hdmoe-mixtral-mtbench"]
CATEGORIES = ("coding", "math", "reasoning", "roleplay", "writing")
METHODS = ("contiguous", "eplb", "placer")


def load_category(folder: Path, name: str) -> np.ndarray:
    """Expert ids int16 [T, 32, 2] of one category file (top-1 first)."""
    data = json.loads((folder / f"experts_{name}_mixtral.json").read_text())
    return np.stack([np.asarray(data[str(layer)], dtype=np.int16) for layer in range(len(data))], axis=1)


def synthetic_splits(preset: str, tokens: int = 12000) -> tuple[object, list[tuple[str, np.ndarray, np.ndarray]]]:
    """(model, [(label, fit ids, held-out ids)]): one fitting trace, five perturbed held-out traces."""
    from placer.synthetic import SCORING_PERTURBATION, perturbed, profile_for, synthesize_trace

    model = get_model(preset)
    fit = synthesize_trace(model, tokens, seed=0).expert_ids
    splits = []
    for seed in range(1, 6):
        held = synthesize_trace(model, tokens, seed=seed,
                                profile=perturbed(profile_for(model), SCORING_PERTURBATION, seed)).expert_ids
        splits.append((f"synth-{seed}", fit, held))
    return model, splits


def mixtral_table(folder: Path | None, args: argparse.Namespace) -> None:
    topo = make_topology("h100", gpus=4, nodes=2)
    if args.synthetic_model:
        model, splits = synthetic_splits(args.synthetic_model)
    else:
        model = get_model("mixtral-8x7b")
        ids = {c: load_category(folder, c) for c in CATEGORIES if (folder / f"experts_{c}_mixtral.json").exists()}
        if len(ids) < 2:
            print(f"need at least two categories in {folder}; found {sorted(ids)}")
            return
        splits = [(held, np.concatenate([v for c, v in ids.items() if c != held]), ids[held]) for held in ids]
    e = model.num_experts
    weights = json.loads(args.weights) if args.weights else {}
    options = {"num_workers": args.workers}
    if args.iterations is not None:
        options["iterations"] = args.iterations
    what = (f"{model.name} (synthetic)" if args.synthetic_model else "Mixtral-8x7B") + \
        (" [rule only: SGLang 0.5.23 cannot load Mixtral]" if args.dispatch == "sglang-static"
         and not args.synthetic_model else "")
    print(f"{what}, {topo.num_gpus} GPUs in {topo.num_nodes} nodes, {args.redundant} redundant "
          f"slots, dispatch {args.dispatch}; fit on the other categories (sample {args.sample_size}), score on "
          f"the held-out one. placer weights: {weights or 'default'}")
    header = (f"{'held out':<10} {'method':<11} {'load max/mean median':>21} {'inter-node / tok-layer':>23} "
              f"{'solve s':>8}")
    print(header)
    print("-" * len(header))
    rows: dict[str, list[tuple[float, float, float]]] = {m: [] for m in METHODS}
    for held, fit, held_ids in splits:
        stats = compute_stats(RoutingTrace(fit, e, model=model), sample_size=args.sample_size)
        test = RoutingTrace(held_ids, e, model=model)
        problem = PlacementProblem(stats, model, topo, num_redundant=args.redundant, dispatch=args.dispatch,
                                   weights=weights)
        for method in METHODS:
            start = time.perf_counter()
            result = solve(problem, method, seed=args.seed, **(options if method == "placer" else {}))
            elapsed = time.perf_counter() - start
            ev = evaluate(result.placement, topo, model, test, dispatch=args.dispatch)
            row = (ev["load_max_over_mean_median"], ev["inter_node_nodes_per_token_layer"], elapsed)
            rows[method].append(row)
            print(f"{held:<10} {method:<11} {row[0]:>21.4f} {row[1]:>23.4f} {row[2]:>8.2f}")
    print("-" * len(header))
    for method in METHODS:
        a = np.array(rows[method])
        print(f"{'mean':<10} {method:<11} {a[:, 0].mean():>21.4f} {a[:, 1].mean():>23.4f} "
              f"{np.median(a[:, 2]):>8.2f}")
        print(f"{'worst':<10} {method:<11} {a[:, 0].max():>21.4f} {a[:, 1].max():>23.4f} {a[:, 2].max():>8.2f}")
    e, p = np.array(rows["eplb"]), np.array(rows["placer"])
    dload = p[:, 0] - e[:, 0]
    cut = 1 - p[:, 1] / e[:, 1]
    print(f"placer vs eplb: load max/mean median diff mean {dload.mean():+.4f}, worst {dload.max():+.4f} "
          f"(target <= +0.02); inter-node dispatches cut mean {cut.mean():.1%}, worst {cut.min():.1%} "
          f"(target >= 40%); solve time median {np.median(p[:, 2]):.2f} s")


def deepseek_timing(args: argparse.Namespace) -> None:
    from placer.synthetic import synthesize_trace

    model = get_model("deepseek-v3")
    topo = make_topology("h100", gpus=64, nodes=8)
    stats = compute_stats(synthesize_trace(model, 16384, seed=0), sample_size=16384)
    problem = PlacementProblem(stats, model, topo, num_redundant=64, dispatch="nearest")
    eplb = solve(problem, "eplb")
    times = []
    result = None
    for _ in range(args.reps):
        start = time.perf_counter()
        result = solve(problem, "placer", seed=args.seed, num_workers=args.workers)
        times.append(time.perf_counter() - start)
    assert result is not None
    ev_p = evaluate(result.placement, topo, model, stats)
    ev_e = evaluate(eplb.placement, topo, model, stats)
    print(f"\nDeepSeek-V3 shape (58 x 256, 64 GPUs in 8 nodes, 64 redundant, 16k-token sample): placer "
          f"solve median {statistics.median(times):.1f} s over {len(times)} (workers {args.workers}), "
          f"status {result.status}; objective {result.objective:.4e} vs EPLB start "
          f"{result.terms['start_eplb']:.4e}; in-sample load max/mean median "
          f"{ev_p['load_max_over_mean_median']:.3f} (eplb {ev_e['load_max_over_mean_median']:.3f}), "
          f"inter-node / token-layer {ev_p['inter_node_nodes_per_token_layer']:.3f} "
          f"(eplb {ev_e['inter_node_nodes_per_token_layer']:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="folder of experts_*_mixtral.json")
    parser.add_argument("--sample-size", type=int, default=20000)
    parser.add_argument("--redundant", type=int, default=4)
    parser.add_argument("--dispatch", default="nearest", help="dispatch rule solved and scored under")
    parser.add_argument("--synthetic-model", default=None, help="a preset: synthetic routing instead of Mixtral's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--weights", default="", help="JSON dict of objective weights for placer")
    parser.add_argument("--deepseek-v3", action="store_true", help="also time the DeepSeek-V3 shape")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    folder = args.data or next((d for d in DATA_CANDIDATES if d.is_dir()), None)
    if args.synthetic_model:
        mixtral_table(None, args)
    elif folder is None:
        print("no Mixtral traces found (looked in " + ", ".join(map(str, DATA_CANDIDATES)) + ")",
              file=sys.stderr)
    else:
        mixtral_table(folder, args)
    if args.deepseek_v3:
        deepseek_timing(args)


if __name__ == "__main__":
    main()
