"""Two-batch overlap on a DeepSeek-V3 decode step: the step with and without ``--overlap two-batch``.

    python benchmarks/overlap_decode.py [--cluster h800] [--placement eplb] [--redundant 64]
                                        [--tokens-per-rank 128] [--iterations 20] [--kernel deepep-ll]

The case: DeepSeek-V3 (61 layers, 58 MoE, E=256, top-8) decoding on 64 GPUs in 8 nodes of 8,
replay of ``--tokens-per-rank`` decode tokens per rank per step with ``--context-len`` tokens of
context each, routing sampled at count level from the model's synthetic preset (seed 0), the
kernel's preset constants, nearest dispatch. The placement is solved on the statistics of a
20,000-token synthetic trace (seed 1, as ``placer simulate run --method`` does). Each overlap mode
runs the same steps (``SimConfig(seed=0)``). The same through the CLI:

    placer simulate run --model deepseek-v3 --cluster h800 --gpus 64 --nodes 8 --method eplb \\
        --redundant 64 --workload replay --tokens-per-rank 128 --iterations 20 --kernel deepep-ll \\
        --overlap two-batch

Prints a markdown table, one row per overlap mode: the mean step time; per step, the compute
resource's time (attention, expert GEMMs, dense; both micro-batches with overlap) and the
exposed all-to-all (dispatch + combine not under compute); per MoE layer, the all-to-all time
(dispatch + combine; with overlap, both micro-batches' summed); and the share of it hidden.
"""

from __future__ import annotations

import argparse
import time

from placer.app.comparison import synthetic_stats
from placer.ilp import PlacementProblem, solve
from placer.presets import get_model, make_topology
from placer.simulator.config import OVERLAP_MODES, ReplayWorkload, SimConfig, kernel_preset
from placer.simulator.results import RunOutput
from placer.simulator.simulate import simulate


def row(mode: str, out: RunOutput, base_step_s: float | None) -> str:
    """One markdown row of ``out`` (a replay run)."""
    it, layers = out.tables["iterations"], out.tables["layers"]
    step_s = float(it["duration_s"].mean())
    compute_s = float((it["attention_s"] + it["compute_s"] + it["other_s"]).mean())
    exposed_s = float((it["dispatch_s"] + it["combine_s"]).mean())
    a2a_layer_s = float((layers["dispatch_s"] + layers["combine_s"]).mean())
    hidden = out.summary.get("a2a_hidden_fraction") or 0.0
    speedup = "1.000" if base_step_s is None else f"{base_step_s / step_s:.3f}"
    return (f"| {mode} | {step_s * 1e3:.3f} | {compute_s * 1e3:.3f} | {exposed_s * 1e3:.3f} | "
            f"{a2a_layer_s * 1e6:.1f} | {hidden:.1%} | {speedup} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default="h800")
    parser.add_argument("--gpus", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--placement", default="eplb", help="a placer solve method (eplb, contiguous, ...)")
    parser.add_argument("--redundant", type=int, default=64)
    parser.add_argument("--tokens-per-rank", type=int, default=128)
    parser.add_argument("--context-len", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--kernel", default="deepep-ll")
    args = parser.parse_args()

    model = get_model("deepseek-v3")
    topology = make_topology(args.cluster, gpus=args.gpus, nodes=args.nodes)
    problem = PlacementProblem(synthetic_stats(model, 0), model, topology, num_redundant=args.redundant)
    placement = solve(problem, args.placement).placement
    workload = ReplayWorkload(tokens_per_rank=args.tokens_per_rank, iterations=args.iterations,
                              context_len=args.context_len)
    network = kernel_preset(args.kernel)
    print(f"DeepSeek-V3 decode on {args.gpus} x {args.cluster} ({args.nodes} nodes), {args.placement} "
          f"({args.redundant} redundant, {placement.slots_per_gpu} slots per GPU), {args.kernel} "
          f"(launch {network.launch_s * 1e6:.2f} us), replay {args.tokens_per_rank} tokens per rank, "
          f"context {args.context_len}, {args.iterations} steps, count-level synthetic routing, seed 0\n")
    print("| overlap | step (ms) | compute per step (ms) | exposed a2a per step (ms) | a2a per MoE layer (us) "
          "| a2a hidden | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base, walls = None, []
    for mode in OVERLAP_MODES:
        start = time.perf_counter()
        out = simulate(placement, topology, model, workload=workload,
                       config=SimConfig(network=network, overlap=mode, seed=0), label=mode)
        walls.append(f"{mode} {time.perf_counter() - start:.1f} s")
        print(row(mode, out, base), flush=True)
        base = base if base is not None else float(out.tables["iterations"]["duration_s"].mean())
    print(f"\nsimulated in {', '.join(walls)}")


if __name__ == "__main__":
    main()
