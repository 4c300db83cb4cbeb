"""Benchmark: periodic expert rebalancing in the public EPLB protocol, on drifting routing histories.

A routing history is cut into windows W0..Wn. Each method places on window i (from its previous
placement where it has one) and is scored on window i+1, the traffic it will actually serve.
Per history one table, one row per method:

- ``bal next``: max/mean GPU load on the next window (``placer.ilp.movement.gpu_balance``: an
  expert's load split evenly over its replicas), median over layers, mean over scored windows;
- ``GB/move`` and ``GB total``: bytes moved per re-placement (mean) and in all, by the live planner
  (``placer.runtime.plan_migration(prev, new, ...).bytes_moved``, which relabels GPUs to move the
  fewest bytes); the first placement (window 0) is not a move; static methods move 0;
- ``solve s``: median wall seconds of the library call per placement (``solve`` / ``solve_from``);
- ``payback s``: median over re-placements of ``move_s / gain``, ``move_s`` =
  ``move_seconds(prev, new)[0]`` (slowest GPU's receive time, ``new`` as the live planner
  relabels it), ``gain = 1 - step_load(new, next) / step_load(prev, next)`` on the next window's
  load; ``inf`` when gain <= 0 and something moved, 0 when nothing moved;
- per-token histories only: inter-node dispatches per token-layer on the next window
  (``evaluate(...)["inter_node_nodes_per_token_layer"]``, the CLI's "inter-node") under the
  ``nearest`` and ``sglang-static`` dispatch rules, mean over scored windows.

Methods: static contiguous (placed once); static eplb (fitted on W0); eplb every window (what
SGLang and vLLM do); placer every window; placer --from every window (``solve_from``, horizon
600 s); eplb --from every window. placer needs per-token statistics: skipped on load-only histories.

Histories (real data from ``../shared/data``; a history is skipped with one line when absent):

- ``mixtral``: Mixtral-8x7B, the 5 MT-Bench categories of hdmoe-mixtral-mtbench in sequence
  (coding, math, reasoning, roleplay, writing; one window each), 8 H100 GPUs in 2 nodes, R = 8;
- ``qwen3``: Qwen3-30B-A3B load fractions of qwen3-30b-a3b-load, one window per (dataset file,
  language) in sorted order (12 windows, load only), 16 GPUs in 2 nodes, R = 16;
- ``deepseek``: synthetic DeepSeek-V3 drift (labelled synthetic): 5 windows of 4000 tokens, each
  ``synthesize_trace`` with its own token seed and ``perturbed(profile, 0.3, seed)`` popularities,
  64 GPUs in 8 nodes, R = 64; placer runs with its default annealing budget (20 000 steps per
  layer) unless ``--deepseek-iterations`` lowers it (printed in the header).

``gain>0`` counts the re-placements whose next-window bottleneck load fell (gain > 0).

Run: ``.venv/bin/python benchmarks/bench_rebalance.py [--history mixtral qwen3 deepseek] [--seed 0]``
(about 4-6 minutes on 2 shared cores; deterministic given the seed). While iterating,
``--history mixtral --methods 'eplb every window' 'placer --from'`` runs two rows of one history
(about 25 s); ``--move-floor`` / ``--min-gain`` override ``solve_from``'s defaults.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from placer.ilp import PlacementProblem, solve
from placer.ilp.movement import gpu_balance, move_seconds, solve_from, step_load
from placer.metrics import evaluate
from placer.presets import get_model, make_topology
from placer.runtime import plan_migration
from placer.stats import compute_stats, load_only_stats
from placer.types import ModelSpec, Placement, RoutingStats, RoutingTrace, Topology

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HISTORIES = ("mixtral", "qwen3", "deepseek")
CATEGORIES = ("coding", "math", "reasoning", "roleplay", "writing")
RULES = ("nearest", "sglang-static")
HORIZON_S = 600.0
INTER_NODE = "inter_node_nodes_per_token_layer"  # the CLI comparison's "inter-node" column
# (label, schedule, method): schedule "static" places on W0 only, "every" re-solves from scratch,
# "from" re-solves with solve_from from the running placement.
METHODS = (("static contiguous", "static", "contiguous"),
           ("static eplb (W0)", "static", "eplb"),
           ("eplb every window", "every", "eplb"),
           ("placer every window", "every", "placer"),
           ("placer --from", "from", "placer"),
           ("eplb --from", "from", "eplb"))


@dataclass
class Window:
    label: str
    stats: RoutingStats
    trace: RoutingTrace | None  # per-token routing, None for load-only windows

    @property
    def load(self) -> np.ndarray:
        return np.asarray(self.stats.load, dtype=np.float64)


@dataclass
class History:
    name: str
    title: str
    model: ModelSpec
    topology: Topology
    redundant: int
    windows: list[Window]
    placer_options: dict = field(default_factory=dict)

    @property
    def per_token(self) -> bool:
        return all(w.trace is not None for w in self.windows)


@dataclass
class Row:
    label: str
    balance: list[float] = field(default_factory=list)
    bytes_moved: list[float] = field(default_factory=list)
    solve_s: list[float] = field(default_factory=list)
    payback_s: list[float] = field(default_factory=list)
    gains: list[float] = field(default_factory=list)
    inter_node: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in RULES})
    note: str = ""


# ---------------------------------------------------------------------------- histories


def mixtral_history(data: Path) -> History | str:
    folder = data / "hdmoe-mixtral-mtbench"
    files = [folder / f"experts_{c}_mixtral.json" for c in CATEGORIES]
    if not all(f.exists() for f in files):
        return f"mixtral: skipped, {folder} or one of its 5 category files is absent"
    model = get_model("mixtral-8x7b")
    windows = []
    for cat, f in zip(CATEGORIES, files, strict=True):
        raw = json.loads(f.read_text())
        ids = np.stack([np.asarray(raw[str(layer)], dtype=np.int16) for layer in range(len(raw))], axis=1)
        trace = RoutingTrace(ids, model.num_experts, model=model)  # column 0 = top-1 (SOURCE.txt)
        windows.append(Window(f"{cat} ({ids.shape[0]} tok)", compute_stats(trace), trace))
    topo = make_topology("h100", gpus=8, nodes=2)
    return History("mixtral", "Mixtral-8x7B, 5 MT-Bench categories in sequence (real, per-token)",
                   model, topo, 8, windows)


def qwen_history(data: Path) -> History | str:
    folder = data / "qwen3-30b-a3b-load"
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not files:
        return f"qwen3: skipped, {folder} is absent or holds no CSV"
    model = get_model("qwen3-30b-a3b")
    windows = []
    for f in files:
        with open(f, newline="") as fh:
            rows = list(csv.DictReader(fh))
        cols = [f"Expert_{e}" for e in range(model.num_experts)]
        for lang in sorted({r["Language"] for r in rows}):
            sel = sorted((r for r in rows if r["Language"] == lang), key=lambda r: int(r["Layer"]))
            load = np.array([[float(r[c]) for c in cols] for r in sel])  # fractions, rows sum to 8
            stats = load_only_stats(load, model.top_k, model=model)
            windows.append(Window(f"{f.stem.split('_')[4]}:{lang}", stats, None))
    topo = make_topology("h100", gpus=16, nodes=2)
    return History("qwen3", "Qwen3-30B-A3B, per-(dataset, language) load in sorted order (real, load only)",
                   model, topo, 16, windows)


def deepseek_history(seed: int, tokens: int, perturb: float, iterations: int | None) -> History:
    from placer.synthetic import perturbed, profile_for, synthesize_trace

    model = get_model("deepseek-v3")
    base = profile_for(model)
    windows = []
    for k in range(5):
        s = 1000 * seed + k
        trace = synthesize_trace(model, tokens, seed=s, profile=perturbed(base, perturb, s + 1))
        windows.append(Window(f"synth seed {s}", compute_stats(trace), trace))
    topo = make_topology("h100", gpus=64, nodes=8)
    budget = ("placer at its default iterations (20000)" if iterations is None else
              f"placer iterations={iterations} (default 20000; reduced for run time)")
    return History("deepseek", f"DeepSeek-V3 drift, synthetic: 5 windows x {tokens} tokens, perturb {perturb} "
                   f"per window (new seed each); {budget}", model, topo, 64, windows,
                   {} if iterations is None else {"iterations": iterations})


# ---------------------------------------------------------------------------- protocol


def run_method(hist: History, label: str, schedule: str, method: str, seed: int, workers: int,
               from_options: dict | None = None) -> Row:
    """Place on W0..W(n-2) per ``schedule``, score each placement on the next window."""
    row = Row(label)
    model, topo = hist.model, hist.topology
    expert_bytes = float(model.expert_weight_bytes)
    options = {**hist.placer_options, "num_workers": workers} if method == "placer" else {}
    prev: Placement | None = None
    for i in range(len(hist.windows) - 1):
        nxt = hist.windows[i + 1]
        if prev is None or schedule != "static":
            problem = PlacementProblem(hist.windows[i].stats, model, topo, num_redundant=hist.redundant)
            start = time.perf_counter()
            if schedule == "from" and prev is not None:
                result = solve_from(problem, method, prev, horizon_s=HORIZON_S, seed=seed, **options,
                                    **(from_options or {}))
            else:
                result = solve(problem, method, seed=seed, **options)
            row.solve_s.append(time.perf_counter() - start)
            new = result.placement
            if prev is None:
                live = new
            else:  # a re-placement: what the live planner would move, and its payback
                plan = plan_migration(prev, new, topo, expert_bytes=expert_bytes)
                live = plan.new
                row.bytes_moved.append(float(plan.bytes_moved))
                move_s = move_seconds(prev, live, topo, expert_bytes)[0]
                gain = 1.0 - step_load(live, nxt.load) / step_load(prev, nxt.load)
                row.gains.append(gain)
                row.payback_s.append(0.0 if move_s == 0 else (move_s / gain if gain > 0 else math.inf))
            prev = live
        elif i > 0:
            row.bytes_moved.append(0.0)
        row.balance.append(float(np.median(gpu_balance(prev, nxt.load))))
        if nxt.trace is not None:
            for rule in RULES:
                row.inter_node[rule].append(float(evaluate(prev, topo, model, nxt.trace, dispatch=rule)[INTER_NODE]))
    return row


# ---------------------------------------------------------------------------- output


def _f(v: float | None, fmt: str) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else fmt.format(v)


def print_table(hist: History, rows: list[Row], skipped: list[str]) -> None:
    topo = hist.topology
    print(f"\n== {hist.title}")
    print(f"   {topo.num_gpus} GPUs in {topo.num_nodes} nodes ({topo.name}), {hist.redundant} redundant slots, "
          f"{hist.model.expert_weight_bytes / 1e6:.1f} MB per expert; {len(hist.windows)} windows: "
          + ", ".join(w.label for w in hist.windows))
    cols = [("method", 20, "<"), ("bal next", 8, ">"), ("GB/move", 8, ">"), ("GB total", 9, ">"),
            ("solve s", 8, ">"), ("payback s", 9, ">"), ("gain>0", 6, ">")]
    if hist.per_token:
        cols += [("inter-node nearest", 18, ">"), ("inter-node sglang-st", 20, ">")]
    header = " ".join(f"{name:{align}{width}}" for name, width, align in cols)
    print(header)
    print("-" * len(header))
    for r in rows:
        moves = r.bytes_moved
        cells = [r.label, _f(float(np.mean(r.balance)), "{:.4f}"),
                 _f(float(np.mean(moves)) / 1e9 if moves else None, "{:.2f}"),
                 _f(float(np.sum(moves)) / 1e9 if moves else None, "{:.2f}"),
                 _f(statistics.median(r.solve_s), "{:.2f}"),
                 _f(statistics.median(r.payback_s) if r.payback_s else None, "{:.2f}"),
                 f"{sum(g > 0 for g in r.gains)}/{len(r.gains)}" if r.gains else "-"]
        if hist.per_token:
            cells += [_f(float(np.mean(r.inter_node[rule])), "{:.4f}") for rule in RULES]
        print(" ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, cols, strict=True)))
    for line in skipped:
        print(line)
    print("legend: bal next = next-window max/mean GPU load (median layer, mean over windows); GB/move, "
          "GB total = live-planner bytes per re-placement / in all; solve s = median per placement; payback s "
          "= median move_s/gain (- static); gain>0 = re-placements that cut the next window's step load; inter-node = RDMA sends per token-layer on the next window")


def run_history(hist: History, seed: int, workers: int, only: list[str] | None = None,
                from_options: dict | None = None) -> None:
    rows, skipped = [], []
    for label, schedule, method in METHODS:
        if only and label not in only:
            continue
        if method == "placer" and not hist.per_token:
            skipped.append(f"{label}: skipped, placer needs per-token statistics and {hist.name} is load only")
            continue
        rows.append(run_method(hist, label, schedule, method, seed, workers, from_options))
    print_table(hist, rows, skipped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", nargs="+", choices=HISTORIES, default=list(HISTORIES))
    parser.add_argument("--seed", type=int, default=0, help="solver seed and synthetic-window seeds")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--workers", type=int, default=1, help="placer search workers (result unchanged)")
    parser.add_argument("--deepseek-tokens", type=int, default=4000)
    parser.add_argument("--deepseek-perturb", type=float, default=0.3)
    parser.add_argument("--deepseek-iterations", type=int, default=None,
                        help="placer annealing steps per layer on DeepSeek-V3 (default: the library's 20000)")
    parser.add_argument("--methods", nargs="+", choices=[m[0] for m in METHODS], default=None,
                        metavar="LABEL", help="only these rows (labels as printed, quoted), e.g. "
                        "'eplb every window' 'placer --from'")
    parser.add_argument("--move-floor", type=float, default=None,
                        help="solve_from's move_floor (default: the library's MOVE_FLOOR)")
    parser.add_argument("--min-gain", type=float, default=None,
                        help="solve_from's min_gain (default: the library's MIN_GAIN)")
    args = parser.parse_args()
    from_options = {k: v for k, v in (("move_floor", args.move_floor), ("min_gain", args.min_gain)) if v is not None}
    t0 = time.perf_counter()
    print(f"Rebalancing benchmark (EPLB protocol: place on window i, score on window i+1), seed {args.seed}, "
          f"solve_from horizon {HORIZON_S:.0f} s")
    for name in args.history:
        if name == "deepseek":
            hist: History | str = deepseek_history(args.seed, args.deepseek_tokens, args.deepseek_perturb,
                                                   args.deepseek_iterations)
        elif not args.data.is_dir():
            hist = f"{name}: skipped, {args.data} is absent"
        else:
            hist = mixtral_history(args.data) if name == "mixtral" else qwen_history(args.data)
        if isinstance(hist, str):
            print(hist)
            continue
        t = time.perf_counter()
        run_history(hist, args.seed, args.workers, args.methods, from_options)
        print(f"({hist.name}: {time.perf_counter() - t:.1f} s)", flush=True)
    print(f"\ntotal wall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
