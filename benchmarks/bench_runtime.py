"""Benchmark of the live re-placement runtime. Part ``planner``: bytes moved vs the naive plan.

DeepSeek-V3 shapes (58 MoE layers x 256 experts, 8 groups, 44 MB per FP8 expert). For each
seed: EPLB on a synthetic trace (the placement that runs), then EPLB again on a trace whose
expert popularities were shifted by seeded lognormal noise (``placer.synthetic.perturbed``,
sigma ``--amount``; new tokens too): the re-solve. ``placer.runtime.plan_migration`` plans the
move with the default staging headroom (one layer of a rank's slots); ``apply_plan`` replays it
and must land on the relabelled placement. Columns:

- ``naive GB``: every slot whose content changes is transferred, no relabel (the baseline);
- ``moved GB``: bytes the plan sends between GPUs (``inter GB`` of them across nodes), and
  ``saving = 1 - moved / naive``; local copies (on-GPU, ``local GB``) are not counted as moved;
- ``rounds``: rounds in which every rank exchanges with at most one peer;
- ``keep-slots``: the saving of vLLM's ``preserve_intragpu_slots`` alone (no relabel, no
  local copies: an expert the GPU already holds is not sent again);
- ``layer-relabel``: a diagnostic bound, not a plan: the saving if the relabel could differ per
  layer. That changes which experts share a GPU across layers, which a placement may rely on.

Run: ``.venv/bin/python benchmarks/bench_runtime.py [--seeds 0 1 2 3 4] [--amount 0.3]``.
Parts: only ``planner`` so far; the live-migration pause and forward throughput are separate
parts to add next to :func:`bench_planner`, selected with ``--part``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from placer.ilp import PlacementProblem, solve
from placer.presets import get_model, make_topology
from placer.profiling.stats import compute_stats
from placer.runtime import apply_plan, plan_migration
from placer.synthetic import perturbed, profile_for, synthesize_trace
from placer.types import ModelSpec, Placement, RoutingStats, Topology

MODEL = "deepseek-v3"
# (GPUs, nodes, redundant slots): EP32 with DeepSeek's 32 redundant experts (9 slots per GPU) and
# EP64 with 64 (5 slots per GPU); 8 groups % nodes == 0, so EPLB runs its hierarchical policy.
CONFIGS = [(32, 4, 32), (64, 8, 64)]


def shifted_stats(model: ModelSpec, seed: int, amount: float, tokens: int) -> tuple[RoutingStats, RoutingStats]:
    """Statistics before and after a seeded synthetic load shift (different tokens as well)."""
    profile = profile_for(model)
    before = compute_stats(synthesize_trace(model, tokens, seed=seed, profile=profile))
    after = compute_stats(synthesize_trace(model, tokens, seed=seed + 500,
                                           profile=perturbed(profile, amount, 1000 + seed)))
    return before, after


def eplb_pair(model: ModelSpec, topology: Topology, redundant: int, before: RoutingStats,
              after: RoutingStats) -> tuple[Placement, Placement]:
    """The running EPLB placement and the EPLB re-solve after the shift."""
    old = solve(PlacementProblem(before, model, topology, redundant), "eplb").placement
    new = solve(PlacementProblem(after, model, topology, redundant), "eplb").placement
    return old, new


def keep_slots_saving(old: Placement, new: Placement, naive: float, expert_bytes: float) -> float:
    """Saving of keeping experts in place per GPU without any relabel (vLLM's intra-GPU pass)."""
    def present(p: Placement) -> np.ndarray:  # bool [L, G, E]
        out = np.zeros((p.num_layers, p.num_gpus, p.num_experts), bool)
        layer = np.arange(p.num_layers)[:, None]
        out[layer, p.gpu_of_slot()[None, :], p.physical_to_logical] = True
        return out
    return 1.0 - float(np.count_nonzero(present(new) & ~present(old))) * expert_bytes / naive


def layer_relabel_saving(old: Placement, new: Placement, topology: Topology, expert_bytes: float,
                         naive: float) -> float:
    """Saving if every layer could be relabelled on its own (a bound, not a valid plan)."""
    moved = sum(plan_migration(old.layers(i, i + 1), new.layers(i, i + 1), topology,
                               expert_bytes=expert_bytes).bytes_moved for i in range(old.num_layers))
    return 1.0 - moved / naive


def planner_case(model: ModelSpec, topology: Topology, old: Placement, new: Placement) -> dict[str, float]:
    """Plan, replay and measure one move; every byte figure in GB."""
    start = time.perf_counter()
    plan = plan_migration(old, new, topology, expert_bytes=model.expert_weight_bytes)
    plan_s = time.perf_counter() - start
    if not np.array_equal(apply_plan(old, plan).physical_to_logical, plan.new.physical_to_logical):
        raise AssertionError("replaying the plan does not give the relabelled placement")
    s = plan.summary()
    return {"naive": s["naive_bytes"] / 1e9, "moved": s["bytes_moved"] / 1e9,
            "inter": s["bytes_inter_node"] / 1e9, "local": s["local_copy_bytes"] / 1e9,
            "saving": s["saving"], "rounds": s["rounds"], "plan_s": plan_s,
            "keep_slots": keep_slots_saving(old, new, plan.naive_bytes, model.expert_weight_bytes),
            "layer_relabel": layer_relabel_saving(old, new, topology, model.expert_weight_bytes,
                                                  plan.naive_bytes)}


def bench_planner(seeds: list[int], amount: float, tokens: int) -> None:
    model = get_model(MODEL)
    print(f"{MODEL}: {model.num_moe_layers} MoE layers x {model.num_experts} experts, "
          f"{model.expert_weight_bytes / 1e6:.1f} MB per expert; EPLB -> EPLB re-solve after a "
          f"synthetic load shift (lognormal sigma {amount}), {tokens} tokens per trace; synthetic")
    header = (f"{'GPUs':>4} {'nodes':>5} {'slots':>5} {'seed':>4} | {'naive GB':>8} {'moved GB':>8} "
              f"{'inter GB':>8} {'local GB':>8} {'saving':>6} {'rounds':>6} {'plan s':>6} | "
              f"{'keep-slots':>10} {'layer-relabel':>13}")
    stats = {seed: shifted_stats(model, seed, amount, tokens) for seed in seeds}
    print(header)
    print("-" * len(header))
    for gpus, nodes, redundant in CONFIGS:
        topology = make_topology("h100", gpus=gpus, nodes=nodes)
        rows = []
        for seed in seeds:
            old, new = eplb_pair(model, topology, redundant, *stats[seed])
            r = planner_case(model, topology, old, new)
            rows.append(r)
            print(f"{gpus:>4} {nodes:>5} {old.num_slots:>5} {seed:>4} | {r['naive']:>8.1f} "
                  f"{r['moved']:>8.1f} {r['inter']:>8.1f} {r['local']:>8.1f} {r['saving']:>6.3f} "
                  f"{r['rounds']:>6.0f} {r['plan_s']:>6.2f} | {r['keep_slots']:>10.3f} {r['layer_relabel']:>13.3f}")
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"{gpus:>4} {nodes:>5} {old.num_slots:>5} {'med':>4} | {med['naive']:>8.1f} "
              f"{med['moved']:>8.1f} {med['inter']:>8.1f} {med['local']:>8.1f} {med['saving']:>6.3f} "
              f"{med['rounds']:>6.0f} {med['plan_s']:>6.2f} | {med['keep_slots']:>10.3f} "
              f"{med['layer_relabel']:>13.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["planner"], default="planner")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--amount", type=float, default=0.3, help="sigma of the lognormal load shift")
    parser.add_argument("--tokens", type=int, default=20000, help="tokens per synthetic trace")
    args = parser.parse_args()
    if args.part == "planner":
        bench_planner(args.seeds, args.amount, args.tokens)


if __name__ == "__main__":
    main()
