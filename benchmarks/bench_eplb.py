"""Benchmark: numpy ``placer.ilp.eplb.rebalance_experts`` vs a torch port of deepseek-ai/EPLB.

DeepSeek-V3 shapes (58 MoE layers x 256 experts, 8 groups), seeded lognormal loads. For each
configuration: median wall time over ``--reps`` calls of ours and of the torch port (with
``torch.set_num_threads(1)`` and with torch's default thread count), the speed-ups, and whether
the outputs agree:

- ``p2l``/``cnt``: phy2log and logcnt identical to the port as published;
- ``l2p~``: log2phy identical up to the order of each expert's slots (the published port sorts
  with an unstable ``torch.sort``; replicas of one expert have equal loads);
- ``all==stable``: all three outputs identical to the port with ties sorted lowest index first.

Run: ``.venv/bin/python benchmarks/bench_eplb.py [--reps 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "ilp"))
import eplb_port as port  # noqa: E402  (the reference port the tests compare against)

from placer.ilp.eplb import rebalance_experts  # noqa: E402

LAYERS, EXPERTS, GROUPS = 58, 256, 8
# (replicas, nodes, gpus): the four asked-for combinations (hierarchical: 8 % nodes == 0), plus
# two with 16 nodes, where 8 % 16 != 0 selects the global policy (the slow case of the port).
CONFIGS = [(288, 4, 32), (288, 8, 32), (320, 4, 64), (320, 8, 64), (288, 16, 32), (320, 16, 64)]


def _median_time(fn, args: tuple, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed calls per measurement (>= 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reps = max(5, args.reps)
    default_threads = torch.get_num_threads()
    rng = np.random.default_rng(args.seed)

    print(f"torch {torch.__version__}, numpy {np.__version__}, torch default threads "
          f"{default_threads}; {LAYERS} layers x {EXPERTS} experts, {GROUPS} groups; "
          f"median of {reps} calls")
    header = (f"{'P':>4} {'N':>3} {'G':>3} {'policy':>6} | {'numpy ms':>8} | {'torch1 ms':>9} "
              f"{'x':>6} | {f'torch{default_threads} ms':>9} {'x':>6} | "
              f"{'p2l':>3} {'cnt':>3} {'l2p~':>4} {'all==stable':>11}")
    print(header)
    print("-" * len(header))
    speedups = []
    all_ok = True
    for replicas, nodes, gpus in CONFIGS:
        weight = (rng.lognormal(0.0, 1.0, (LAYERS, EXPERTS)) * 1e4).astype(np.float32)
        wt = torch.from_numpy(weight)
        call_args = (replicas, GROUPS, nodes, gpus)

        ours = rebalance_experts(weight, *call_args)  # warm-up and the outputs compared
        t_np = _median_time(rebalance_experts, (weight, *call_args), max(reps, 20))

        torch.set_num_threads(1)
        ref = [t.numpy() for t in port.rebalance_experts(wt, *call_args)]
        t_t1 = _median_time(port.rebalance_experts, (wt, *call_args), reps)
        torch.set_num_threads(default_threads)
        t_td = _median_time(port.rebalance_experts, (wt, *call_args), reps)

        port.STABLE_SORT = True
        try:
            ref_stable = [t.numpy() for t in port.rebalance_experts(wt, *call_args)]
        finally:
            port.STABLE_SORT = False

        same_p2l = np.array_equal(ours[0], ref[0])
        same_cnt = np.array_equal(ours[2], ref[2])
        same_l2p_sets = np.array_equal(np.sort(ours[1], -1), np.sort(ref[1], -1))
        same_stable = all(np.array_equal(a, b) for a, b in zip(ours, ref_stable, strict=True))
        all_ok &= same_p2l and same_cnt and same_l2p_sets and same_stable
        policy = "hier" if GROUPS % nodes == 0 else "global"
        speedups += [t_t1 / t_np, t_td / t_np]

        def yn(flag: bool) -> str:
            return "yes" if flag else "NO"
        print(f"{replicas:>4} {nodes:>3} {gpus:>3} {policy:>6} | {t_np * 1e3:8.2f} | "
              f"{t_t1 * 1e3:9.1f} {t_t1 / t_np:5.0f}x | {t_td * 1e3:9.1f} {t_td / t_np:5.0f}x | "
              f"{yn(same_p2l):>3} {yn(same_cnt):>3} {yn(same_l2p_sets):>4} {yn(same_stable):>11}")
    print("-" * len(header))
    print(f"min speed-up {min(speedups):.0f}x (target >= 10x); outputs "
          f"{'agree' if all_ok else 'DIFFER'} on every configuration")
    if not all_ok or min(speedups) < 10:
        sys.exit(1)


if __name__ == "__main__":
    main()
