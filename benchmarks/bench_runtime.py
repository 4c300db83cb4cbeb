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

Part ``live`` (``--part live``): a local 4-rank CPU deployment on Ray (gloo), EPLB placement ->
EPLB re-solve after a synthetic load shift, migrated live by ``execute_plan`` (one round per
served step, one expert per rank pair per round) while serving batches, every output checked
against the single-process reference. Reports the plan, the per-layer serving pause (the commit
at the step boundary: staged experts written, local copies, map switch; max over ranks), step
latency before / during / after, and the transfer wait after the forward. Two expert sizes: the
embedded model's (hidden 128, FFN 128) and a larger one (hidden 512, FFN 1024).

Part ``throughput`` (``--part throughput``): forward tokens/s of the 4-rank deployment vs the
single-process reference forward (:func:`placer.runtime.model.reference_forward`, one thread) on
the same batches, embedded shapes, EPLB placement with 4 redundant slots.

Part ``sticky`` (``--part sticky``): the planner's pairs again, with a movement-aware re-solve
(:func:`placer.ilp.movement.keep_in_place`: the EPLB re-solve's replica counts, packed keeping
experts on their old GPUs within a load tolerance). Saving is against the naive bytes of the
EPLB re-solve (the planner part's baseline); balance is max/mean GPU load on the new load with
each expert's load split evenly over its replicas (median and worst layer).

Both live parts start ``ray.init(num_cpus=2)`` (4 ranks at 0.5 CPU each, one torch thread each).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from placer.ilp import PlacementProblem, solve
from placer.presets import get_model, make_topology
from placer.runtime import apply_plan, plan_migration
from placer.stats import compute_stats
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


# --------------------------------------------------------------------------------------------
# Live parts (torch + Ray)
# --------------------------------------------------------------------------------------------


def _live_setup(hidden: int, ffn: int, seed: int = 0):
    """Embedded routing shape (4 layers x 8 experts, top-2) with the given expert sizes, 4 ranks,
    4 redundant slots; EPLB before and after a synthetic load shift."""
    from dataclasses import replace

    from placer.runtime.apply import embedded_model

    model = replace(embedded_model(), hidden_size=hidden, expert_ffn_size=ffn)
    topology = make_topology("h100", gpus=4, nodes=1)
    before, after = shifted_stats(model, seed, 0.3, 4000)
    old, new = eplb_pair(model, topology, 4, before, after)
    return model, topology, old, new


def _start_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def bench_live(tokens: int, seed: int) -> None:
    import torch

    from placer.runtime import Deployment, execute_plan, reference_forward

    _start_ray()
    print("live migration on a local 4-rank CPU deployment (Ray actors, gloo), EPLB -> EPLB re-solve "
          f"after a synthetic load shift; {tokens} tokens per batch; one round per step, 1 expert per "
          "rank pair per round; pause = commit at the step boundary (max over ranks)")
    header = (f"{'hidden':>6} {'ffn':>5} {'MB/exp':>6} | {'naive MB':>8} {'sent MB':>7} {'rounds':>6} | "
              f"{'step ms before':>14} {'during med':>10} {'during max':>10} {'after':>6} | "
              f"{'wait ms max':>11} | {'pause ms per layer':>24} | {'verified':>8}")
    print(header)
    print("-" * len(header))
    for hidden, ffn in ((128, 128), (512, 1024)):
        model, topology, old, new = _live_setup(hidden, ffn, seed)
        rng = np.random.default_rng(seed)

        def batch(rng=rng, hidden=hidden):
            return rng.standard_normal((tokens, hidden)).astype(np.float32)
        with Deployment(model, old, topology, seed=seed) as dep:
            ref = lambda x: reference_forward(dep.weights, torch.from_numpy(x)).numpy()  # noqa: E731
            plan = plan_migration(old, new, topology, expert_bytes=dep.weights.expert_bytes,
                                  max_experts_per_round=1)
            def timed_steps(count=8, dep=dep, ref=ref):
                """Seconds of ``count`` verified forwards."""
                seconds = []
                for _ in range(count):
                    x = batch()
                    t0 = time.perf_counter()
                    y = dep.forward(x)
                    seconds.append(time.perf_counter() - t0)
                    assert np.allclose(y, ref(x), rtol=1e-4, atol=1e-4)
                return seconds

            dep.forward(batch())  # warm-up
            before = timed_steps()
            report = execute_plan(dep, plan, (batch() for _ in iter(int, 1)), reference=ref)
            after = timed_steps()
            assert not dep.verify_all() and not report.mismatches
        mb = 1e6
        pauses = " ".join(f"{p * 1e3:.2f}" for p in report.pause_s)
        print(f"{hidden:>6} {ffn:>5} {dep.weights.expert_bytes / mb:>6.2f} | {plan.naive_bytes / mb:>8.1f} "
              f"{plan.bytes_moved / mb:>7.1f} {plan.num_rounds:>6} | {statistics.median(before) * 1e3:>14.1f} "
              f"{statistics.median(report.step_s) * 1e3:>10.1f} {max(report.step_s) * 1e3:>10.1f} "
              f"{statistics.median(after) * 1e3:>6.1f} | {max(report.wait_s) * 1e3:>11.2f} | {pauses:>24} | "
              f"{report.verified:>3}/{report.batches:<4}")


def bench_throughput(seed: int, repeats: int) -> None:
    import torch

    from placer.runtime import Deployment, reference_forward

    torch.set_num_threads(1)
    _start_ray()
    model, topology, old, _ = _live_setup(128, 128, seed)
    print("forward throughput: 4-rank local CPU deployment (Ray, gloo, 1 torch thread per rank, 2 cores) "
          "vs the single-process reference (1 torch thread); embedded shapes (4 MoE layers x 8 experts, "
          f"top-2, hidden 128, FFN 128), EPLB placement, 12 slots; median of {repeats} batches")
    header = f"{'tokens':>6} | {'deployment ms':>13} {'tok/s':>8} | {'reference ms':>12} {'tok/s':>8} | {'ratio':>5}"
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(seed)
    with Deployment(model, old, topology, seed=seed) as dep:
        for tokens in (64, 256, 1024, 4096):
            xs = [rng.standard_normal((tokens, 128)).astype(np.float32) for _ in range(repeats)]
            dep.forward(xs[0])
            d, r = [], []
            for x in xs:
                t0 = time.perf_counter()
                y = dep.forward(x)
                d.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ref = reference_forward(dep.weights, torch.from_numpy(x)).numpy()
                r.append(time.perf_counter() - t0)
                assert np.allclose(y, ref, rtol=1e-4, atol=1e-4)
            dm, rm = statistics.median(d), statistics.median(r)
            print(f"{tokens:>6} | {dm * 1e3:>13.1f} {tokens / dm:>8.0f} | {rm * 1e3:>12.1f} {tokens / rm:>8.0f} | "
                  f"{rm / dm:>5.2f}")


def bench_sticky(seeds: list[int], amount: float, tokens: int, tolerance: float) -> None:
    from placer.ilp.movement import gpu_balance, keep_in_place

    model = get_model(MODEL)
    print(f"{MODEL}: movement-aware re-solve (keep_in_place, tolerance {tolerance}) vs the EPLB re-solve; "
          f"shift sigma {amount}, {tokens} tokens per trace; synthetic")
    header = (f"{'GPUs':>4} {'seed':>4} | {'naive GB':>8} {'eplb sent':>9} {'saving':>6} | {'sticky sent':>11} "
              f"{'saving':>6} | {'balance eplb':>12} {'sticky':>11} {'old':>11}")
    print(header)
    print("-" * len(header))
    stats = {seed: shifted_stats(model, seed, amount, tokens) for seed in seeds}
    for gpus, nodes, redundant in CONFIGS:
        topology = make_topology("h100", gpus=gpus, nodes=nodes)
        for seed in seeds:
            before, after = stats[seed]
            old, new = eplb_pair(model, topology, redundant, before, after)
            sticky = keep_in_place(old, new, after.load, tolerance=tolerance)
            pe = plan_migration(old, new, topology, expert_bytes=model.expert_weight_bytes)
            ps = plan_migration(old, sticky, topology, expert_bytes=model.expert_weight_bytes)
            if not np.array_equal(apply_plan(old, ps).physical_to_logical, ps.new.physical_to_logical):
                raise AssertionError("replaying the sticky plan does not give its placement")
            bal = [gpu_balance(p, after.load) for p in (new, sticky, old)]
            cols = " ".join(f"{np.median(b):>5.3f}/{b.max():<5.3f}" for b in bal)
            print(f"{gpus:>4} {seed:>4} | {pe.naive_bytes / 1e9:>8.1f} {pe.bytes_moved / 1e9:>9.1f} "
                  f"{1 - pe.bytes_moved / pe.naive_bytes:>6.3f} | {ps.bytes_moved / 1e9:>11.1f} "
                  f"{1 - ps.bytes_moved / pe.naive_bytes:>6.3f} | {cols}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["planner", "live", "throughput", "sticky", "all"], default="planner")
    parser.add_argument("--batch-tokens", type=int, default=64, help="tokens per batch (part live)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="keep_in_place tolerance (part sticky)")
    parser.add_argument("--repeats", type=int, default=9, help="batches per size (part throughput)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--amount", type=float, default=0.3, help="sigma of the lognormal load shift")
    parser.add_argument("--tokens", type=int, default=20000, help="tokens per synthetic trace")
    args = parser.parse_args()
    if args.part in ("planner", "all"):
        bench_planner(args.seeds, args.amount, args.tokens)
    if args.part in ("sticky", "all"):
        bench_sticky(args.seeds, args.amount, args.tokens, args.tolerance)
    if args.part in ("live", "all"):
        bench_live(args.batch_tokens, args.seeds[0])
    if args.part in ("throughput", "all"):
        bench_throughput(args.seeds[0], args.repeats)


if __name__ == "__main__":
    main()
