"""Live migration under CPU load: ``placer apply``'s migration, run N times beside two busy processes.

Each run starts a local 4-rank CPU deployment of the embedded model on EPLB's placement for one
load, serves, migrates live to EPLB's placement for another load while serving, serves again,
and compares every output with the single-process reference (``placer.runtime.apply_live``, the
code behind ``placer apply``). A run is correct when every batch matches and every slot's
checksum matches the authoritative copy. The two busy processes (``while True: pass``) are
started here, stop by themselves after ``--busy-limit`` seconds, and are killed by pid at the end.

Run: ``.venv/bin/python benchmarks/stress_apply.py --runs 20`` (CI: ``--runs 3``). Exit 1 when
any run is wrong.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

BUSY = "import time\nend = time.time() + {limit}\nwhile time.time() < end:\n    pass\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--busy", type=int, default=2, help="busy processes beside the runs")
    ap.add_argument("--busy-limit", type=float, default=1800.0, help="seconds after which they stop by themselves")
    args = ap.parse_args()

    import ray

    from placer.ilp import PlacementProblem, solve
    from placer.presets import make_topology
    from placer.runtime.apply import apply_live, embedded_model
    from placer.stats import compute_stats
    from placer.synthetic import synthesize_trace

    model = embedded_model()
    topology = make_topology("h100", gpus=4, nodes=1)
    old, new = (solve(PlacementProblem(compute_stats(synthesize_trace(model, 2000, seed=s)), model, topology, 4),
                      "eplb").placement for s in (0, 7))
    busy = [subprocess.Popen([sys.executable, "-c", BUSY.format(limit=args.busy_limit)]) for _ in range(args.busy)]
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=4)
    rows, walls = [], []
    try:
        for run in range(args.runs):
            start = time.perf_counter()
            out = apply_live(new, old, model, topology, ranks=4, tokens=32, warmup=2, after=2, seed=run)
            walls.append(time.perf_counter() - start)
            ok = out.verified == out.batches and not out.weight_mismatches
            rows.append(ok)
            print(f"run {run + 1:>2}: {out.verified}/{out.batches} batches match (max abs err {out.max_abs_err:.1e}), "
                  f"{len(out.weight_mismatches)} wrong slots, {len(out.report.recoveries)} recoveries, "
                  f"{walls[-1]:.1f} s -> {'ok' if ok else 'WRONG'}", flush=True)
    finally:
        ray.shutdown()
        for p in busy:
            p.kill()
            p.wait()
    print(f"{sum(rows)}/{len(rows)} live migrations correct beside {args.busy} busy processes "
          f"(median {statistics.median(walls):.1f} s per run)")
    return 0 if all(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
