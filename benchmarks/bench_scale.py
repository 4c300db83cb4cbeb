"""Solve at scale, side by side with ``eplb`` in the same run (issue 16, part 1).

    python benchmarks/bench_scale.py [--tokens 20000] [--skip-kimi] [--repeats 5]

Inputs, made once and not timed: ``placer synth`` traces of 20,000 tokens (seed 0; seed 1 with
``--perturb 0.3`` as the next window for the incremental case), labelled synthetic.

1. DeepSeek-V3 shape, 64 GPUs in 8 nodes, 64 redundant: ``placer solve TRACE --method eplb`` and
   ``--method placer --time-limit 10``, each a fresh process, wall from process start; ``placer``
   warm (the numba cache ``make install`` fills) and cold (an empty ``NUMBA_CACHE_DIR``, as
   benchmarks/cold_start.py defines it; the background compilation a cold solve leaves is waited
   for before the next case). Target: <= 10 s wall cold, inter-node dispatches per token-layer
   <= 2.18 (+0.01) at eplb's median max/mean load (+-0.01).
2. Kimi-K2 shape (384 experts, 60 MoE layers), 128 GPUs in 16 nodes, 128 redundant: ``eplb``,
   ``placer --time-limit 30`` and the same with ``--weights balance=3`` (30 times the default
   balance multiplier). Target: <= 30 s, inter-node >= 20% below eplb at eplb's load.
3. Incremental re-solve: ``placer.ilp.movement.solve_from(problem, "eplb", running, horizon_s=600)``
   in this process, the running placement eplb's on window 0 and the problem window 1; median of
   ``--repeats`` calls after one warm-up, each with the dispatch-table cache emptied (a live
   re-solve's candidates are new placements, so their tables are never cached). Beside it the
   command line's wall: ``placer solve WINDOW1 --from RUNNING --horizon-s 600 --method eplb``.
   Target: <= 1 s for the library call.

Figures are from each run's ``--json`` (``comparison[0].metrics``: the placement scored on the
trace it was fitted on, under the ``nearest`` rule), and the load again as the mean over 8
dispatch seeds (:func:`_seed_load`; the load targets are read on it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cold_start import _wait_warmers  # noqa: E402  (the same waiting as the cold-start benchmark)

PLACER = [sys.executable, "-m", "placer"]
SEEDS = range(8)
SHAPES = {"deepseek-v3": dict(gpus=64, nodes=8, redundant=64, limit=10.0),
          "kimi-k2": dict(gpus=128, nodes=16, redundant=128, limit=30.0)}


def _synth(model: str, tokens: int, seed: int, out: Path, perturb: float = 0.0) -> None:
    if not out.exists():
        subprocess.run([*PLACER, "synth", "--model", model, "--tokens", str(tokens), "--seed", str(seed),
                        "--perturb", str(perturb), "-o", str(out)], check=True, capture_output=True)


def _solve(trace: Path, shape: dict, method: str, *, limit: float | None, cache: str | None,
           extra: tuple[str, ...] = ()) -> dict:
    out_path = trace.with_name(f"{trace.stem}-{method}.json")
    cmd = [*PLACER, "solve", str(trace), "--gpus", str(shape["gpus"]), "--nodes", str(shape["nodes"]),
           "--redundant", str(shape["redundant"]), "--method", method, "--json",
           "-o", str(out_path), *extra]
    if limit is not None:
        cmd += ["--time-limit", str(limit)]
    env = dict(os.environ)
    if cache is not None:
        env["NUMBA_CACHE_DIR"] = cache
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    out = json.loads(done.stdout)
    m = out["comparison"][0]["metrics"]
    return {"wall_s": wall, "solve_s": out["solve_seconds"], "status": out["status"],
            "load": m["load_max_over_mean_median"], "inter_node": m["inter_node_nodes_per_token_layer"],
            "load_seeds": _seed_load(trace, out_path, shape),
            "compiled": "compiling" in done.stderr}


def _seed_load(trace: Path, placement: Path, shape: dict) -> float:
    """Median-layer max/mean load of ``placement`` on ``trace`` under ``nearest``, the mean over
    :data:`SEEDS` dispatch seeds: the rule deals whole ranks to an expert's copies at random, and a
    serving stack draws its own deal, so one seed's figure is one draw (it moves by up to 0.01)."""
    import numpy as np

    from placer.io import read_placement_json
    from placer.metrics import gpu_load, load_balance
    from placer.presets import make_topology

    topo = make_topology("h100", gpus=shape["gpus"], nodes=shape["nodes"])
    data, placed = _trace(trace), read_placement_json(str(placement)).placement
    return float(np.mean([np.median(load_balance(gpu_load(placed, topo, data, seed=s))["per_layer"])
                          for s in SEEDS]))


@functools.lru_cache(maxsize=1)
def _trace(path: Path):
    """The trace at ``path``, read once for the rows scored on it one after the other."""
    from placer.io import read_trace

    return read_trace(str(path))


def _row(case: str, method: str, r: dict, ref: dict | None) -> str:
    cut = "" if ref is None else f"{(1 - r['inter_node'] / ref['inter_node']) * 100:+.1f}%"
    dload = "" if ref is None else f"{r['load'] - ref['load']:+.4f}"
    dseeds = "" if ref is None else f"{r['load_seeds'] - ref['load_seeds']:+.4f}"
    return (f"| {case} | {method} | {r['wall_s']:.1f} | {r['solve_s']:.1f} | {r['status']} | {r['load']:.4f} | "
            f"{dload} | {r['load_seeds']:.4f} | {dseeds} | {r['inter_node']:.3f} | {cut} |")


def incremental(w0: Path, w1: Path, repeats: int, tmp: Path) -> tuple[list[float], float, dict]:
    from placer.ilp import PlacementProblem, solve
    from placer.ilp.movement import solve_from
    from placer.io.routing import gather_routing
    from placer.metrics.dispatch import _TABLE_CACHE
    from placer.presets import make_topology

    shape = SHAPES["deepseek-v3"]
    topo = make_topology("h100", gpus=shape["gpus"], nodes=shape["nodes"])
    r0, r1 = gather_routing([str(w0)]), gather_routing([str(w1)])
    running = solve(PlacementProblem(r0.stats, r0.model, topo, num_redundant=shape["redundant"]), "eplb").placement
    problem = PlacementProblem(r1.stats, r1.model, topo, num_redundant=shape["redundant"])
    solve_from(problem, "eplb", running, horizon_s=600.0)  # warm-up
    times = []
    for _ in range(repeats):
        _TABLE_CACHE.clear()
        t0 = time.perf_counter()
        result = solve_from(problem, "eplb", running, horizon_s=600.0)
        times.append(time.perf_counter() - t0)
    path = tmp / "running.json"  # the same eplb placement, written by the command line (not timed)
    subprocess.run([*PLACER, "solve", str(w0), "--gpus", str(shape["gpus"]), "--nodes", str(shape["nodes"]),
                    "--redundant", str(shape["redundant"]), "--method", "eplb", "-o", str(path), "--quiet"],
                   check=True, capture_output=True, timeout=600)
    t0 = time.perf_counter()
    done = subprocess.run([*PLACER, "solve", str(w1), "--gpus", str(shape["gpus"]), "--nodes", str(shape["nodes"]),
                           "--redundant", str(shape["redundant"]), "--method", "eplb", "--from", str(path),
                           "--horizon-s", "600", "--json", "-o", str(tmp / "next.json")], capture_output=True, text=True, timeout=600)
    cli = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"solve --from failed: {done.stderr.strip()[-400:]}")
    return times, cli, result.terms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-kimi", action="store_true")
    ap.add_argument("--workdir", default=None, help="Keep the traces here (default: a temporary folder).")
    args = ap.parse_args()
    from placer.metrics.dispatch import DEFAULT_DISPATCH_SEED

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    ds0, ds1, kimi = tmp / "ds-w0.npz", tmp / "ds-w1.npz", tmp / "kimi.npz"
    _synth("deepseek-v3", args.tokens, 0, ds0)
    _synth("deepseek-v3", args.tokens, 1, ds1, perturb=0.3)
    print(f"| case | method | wall s | solve s | status | load max/mean (median layer), seed {DEFAULT_DISPATCH_SEED} | "
          f"vs eplb | the same, mean of {len(SEEDS)} seeds | vs eplb | inter-node per token-layer | cut vs eplb |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ds = SHAPES["deepseek-v3"]
    ref = _solve(ds0, ds, "eplb", limit=None, cache=None)
    print(_row("DeepSeek-V3 64 GPUs", "eplb", ref, None), flush=True)
    warm = _solve(ds0, ds, "placer", limit=ds["limit"], cache=None)
    print(_row("DeepSeek-V3 64 GPUs", "placer --time-limit 10 (warm)", warm, ref), flush=True)
    with tempfile.TemporaryDirectory(prefix="numba-cold-") as cache:
        cold = _solve(ds0, ds, "placer", limit=ds["limit"], cache=cache)
        _wait_warmers(cache)
    print(_row("DeepSeek-V3 64 GPUs", "placer --time-limit 10 (cold)", cold, ref), flush=True)
    if not args.skip_kimi:
        _synth("kimi-k2", args.tokens, 0, kimi)
        km = SHAPES["kimi-k2"]
        kref = _solve(kimi, km, "eplb", limit=None, cache=None)
        print(_row("Kimi-K2 128 GPUs", "eplb", kref, None), flush=True)
        kpl = _solve(kimi, km, "placer", limit=km["limit"], cache=None)
        print(_row("Kimi-K2 128 GPUs", "placer --time-limit 30 (warm)", kpl, kref), flush=True)
        kbal = _solve(kimi, km, "placer", limit=km["limit"], cache=None, extra=("--weights", "balance=3"))
        print(_row("Kimi-K2 128 GPUs", "placer --time-limit 30 --weights balance=3 (warm)", kbal, kref), flush=True)
    times, cli, terms = incremental(ds0, ds1, args.repeats, tmp)
    print()
    print(f"incremental re-solve (DeepSeek-V3, solve_from eplb, horizon 600 s): library call median "
          f"{statistics.median(times):.3f} s of {len(times)} ({', '.join(f'{t:.3f}' for t in times)}); "
          f"the command line {cli:.1f} s wall; layers kept {terms['layers_kept']:.0f}, "
          f"re-solved {terms['layers_resolved']:.0f}, repacked {terms['layers_repacked']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
