"""Direction check against MoETuner: contiguous vs balanced placements of Mixtral-8x7B, 4 x H100.

MoETuner (arXiv 2502.06643) reports its placement cutting the all-to-all tail of Mixtral-8x7B by
about 30-36% against the default contiguous placement, in a 4-way EP x 2-way TP setting whose
tensor parallelism placer does not model. Here: placements solved on the math and writing traces
of ../shared/data/hdmoe-mixtral-mtbench, the coding and roleplay traces replayed through the
simulator (never fitted on), 4-way EP on one H100 node, the a2a tail = p99 over (step, layer)
of dispatch + combine time.

    .venv/bin/python benchmarks/fidelity_moetuner.py
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "hdmoe-mixtral-mtbench")
FIT = ("experts_math_mixtral.json", "experts_writing_mixtral.json")
HELD_OUT = ("experts_coding_mixtral.json", "experts_roleplay_mixtral.json")
METHODS = ("contiguous", "eplb", "moetuner", "placer")


def main() -> int:
    if not os.path.isdir(DATA):
        print(f"skipped: {DATA} not found")
        return 0
    from placer.ilp import PlacementProblem, solve
    from placer.io.routing import gather_routing
    from placer.presets import get_model, make_topology
    from placer.simulator.config import ReplayWorkload, SimConfig
    from placer.simulator.simulate import simulate

    model = get_model("mixtral-8x7b")
    topology = make_topology("h100", gpus=4)
    fit = gather_routing([os.path.join(DATA, f) for f in FIT], model=model)
    rows = []
    for execution in ("standard", "context-coherent"):
        problem = PlacementProblem(fit.stats, model, topology, execution=execution)
        placements = {m: solve(problem, m, seed=0).placement for m in METHODS}
        for held in HELD_OUT:
            trace = gather_routing([os.path.join(DATA, held)], model=model).trace
            for tpr in (128, 2048):
                base = None
                for method, placement in placements.items():
                    out = simulate(placement, topology, model, routing=trace,
                                   workload=ReplayWorkload(tokens_per_rank=tpr, iterations=100),
                                   config=SimConfig(execution=execution), label=method)
                    p99 = out.summary["a2a_p99_s"]
                    base = base if base is not None else p99
                    rows.append((execution, held.split("_")[1], tpr, method, out.summary["a2a_p50_s"] * 1e6,
                                 p99 * 1e6, (p99 / base - 1) * 100))
    print("| execution | held-out trace | tokens/rank | placement | a2a p50 us | a2a p99 us | p99 vs contiguous |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:+.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
