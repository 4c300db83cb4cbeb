"""Simulator speed: placer's discrete-event simulator vs the same model written with SimPy.

    python benchmarks/bench_simulator.py [--iterations 1000] [--simpy-iterations 30] [--repeats 3]
                                         [--placement eplb|contiguous] [--profile]

The case (issue 4, item 9): DeepSeek-V3 (61 layers, 58 MoE, E=256, top-8) decoding on 64 H200
GPUs in 8 nodes of 8, 128 tokens per rank per step, default SimConfig (deepep-normal kernel,
closed-form network, standard execution, nearest dispatch, seed 0). The placement is EPLB with
64 redundant slots (5 slots per GPU) solved on the statistics of a 20,000-token synthetic trace
(``--placement contiguous``: the contiguous map with the same slots); the same statistics are
the routing (their reservoir sample is the routing pool). Building all this is not timed.

Ours: ``simulate(..., workload=ReplayWorkload(tokens_per_rank=128, iterations=N))``, wall and
CPU time of the whole call (building the routing rates and dispatch table included), median of
``--repeats`` runs after one short warm-up call (numba cache load, printed). A ``progress``
callback timestamps the end of every step, which splits the call into set-up (everything up
to the first step's end, less one step) and steady-state time per step; the callees that
``simulate`` uses (routing rates, dispatch table, ``sample_traffic``, ``CostModel.step_cost``,
the collector) are wrapped with timers during every run (a few calls per step), which gives
where the time goes and, as the rest, the event handling alone. Events are the engine's
(``summary["events"]``: StepStart + one PhaseEnd per phase + StepEnd = 241 a step).

SimPy: the same steps, routing draws and cost model, with SimPy's event structure. Per step a
driver process draws the step's traffic exactly as ``simulate`` does (``sample_traffic`` on the
same ``routing_rates``, the same seeded generator, so the draws are identical) and evaluates the
cost model's pieces (``NetworkModel.evaluate``, ``ComputeModel.expert_times`` /
``attention_times`` / ``dense_times``, combined as ``CostModel.step_cost`` combines them) per
GPU, giving each GPU's duration of each of the step's 239 phases. Then, phase by phase, it
starts one SimPy process per GPU that does ``yield env.timeout(its own duration)`` and waits for
all 64 at a barrier (``env.all_of``) before the next phase. That is the issue's "one process per
GPU and phase"; ``lean`` is a cheaper SimPy variant (the driver yields ``all_of`` of 64 bare
timeouts, no processes), printed too. The per-GPU durations are checked against
``CostModel.step_cost`` (their per-phase maxima must equal its ``durations_s``) and SimPy's
clock against ours after the same steps. SimPy events counted: each timeout and each all_of
(64 + 1 a phase); the kernel's own count (every event it scheduled, including the processes'
start and end events) is printed beside it. Set-up (rates, cost model) is built and timed
once; time per step is ``env.run`` over ``--simpy-iterations`` steps, median of ``--repeats``
runs. The runs of ours and SimPy alternate, so that the machine's load weighs on both alike.

Both run one step's numpy work (routing draw + cost model, ~5 ms) per step; "events/s" is
printed two ways: per second of step time (numpy included), and per second of event handling
alone (step time less the routing draw and cost model, timed around those calls). Our events
are phase-level (one PhaseEnd stands for 64 GPUs finishing a phase); SimPy's are per GPU, so
SimPy handles 65x as many events per step by construction. Both simulate the same model events
(one per GPU per phase and one barrier per phase, 15,535 a step): ours handles them in bulk as
241 heap events, SimPy one at a time, so "model events per second" (the check) is the
like-for-like rate, and its ratio equals the ratio of time per simulated step. ``--profile`` prints cProfile's
top functions of one run of ours.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import os
import pstats
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from placer.ilp import solve
from placer.ilp.base import PlacementProblem
from placer.presets import get_model, make_topology
from placer.simulator.collector import Collector
from placer.simulator.config import ReplayWorkload, SimConfig
from placer.simulator.cost import BatchShape, CostModel, PhaseKind
from placer.simulator.routing import Traffic, routing_rates, sample_traffic
from placer.simulator.scheduler import ReplayScheduler
from placer.simulator.workload import routing_pool
from placer.stats import compute_stats
from placer.synthetic import synthesize_trace
from placer.types import ModelSpec, Placement, RoutingStats, Topology

# The module, not the function of the same name that placer.simulator re-exports.
sim_mod = importlib.import_module("placer.simulator.simulate")


@dataclass
class Case:
    model: ModelSpec
    topology: Topology
    placement: Placement
    stats: RoutingStats
    label: str
    config: SimConfig
    tokens_per_rank: int


def build_case(placement_kind: str, gpus: int, redundant: int, trace_tokens: int, tokens_per_rank: int) -> Case:
    model = get_model("deepseek-v3")
    topology = make_topology("h200", gpus=gpus)
    stats = compute_stats(synthesize_trace(model, trace_tokens, seed=0))
    problem = PlacementProblem(stats, model, topology, num_redundant=redundant)
    placement = solve(problem, placement_kind).placement
    label = (f"{placement_kind}, {redundant} redundant slots ({placement.slots_per_gpu} per GPU), "
             f"stats of a {trace_tokens}-token synthetic trace (seed 0)")
    return Case(model, topology, placement, stats, label, SimConfig(), tokens_per_rank)


# -- ours ---------------------------------------------------------------------------------------

REST = "event loop, scheduler, events (the rest)"
# The callees of simulate() timed in every run of ours: (object, attribute, label).
PARTS = [(sim_mod, "_check", "set-up: input checks"),
         (sim_mod, "routing_pool", "set-up: routing pool"),
         (sim_mod, "routing_rates", "set-up: routing rates"),
         (sim_mod, "dispatch_table", "set-up: dispatch table"),
         (sim_mod, "CostModel", "set-up: cost model init"),
         (sim_mod, "sample_traffic", "per step: routing draw (sample_traffic)"),
         (CostModel, "step_cost", "per step: cost model (step_cost)"),
         (Collector, "on_step_start", "per step: collector"),
         (Collector, "output", "end: collector output")]


@dataclass
class OursRun:
    wall_s: float
    cpu_s: float
    events: int
    setup_s: float       # start of the call to the end of step 0, less one step
    per_step_s: float    # steady state, steps 1..N-1
    per_step_cpu_s: float
    clock: list[float]   # simulated time at the end of each step
    parts: dict[str, float]


def run_ours(case: Case, iterations: int) -> OursRun:
    """One ``simulate`` call, timed as a whole, per step (``progress`` callback) and per part:
    the callees in :data:`PARTS` are wrapped with timers for the call (module and class
    attributes swapped back afterwards; no file is changed). The wrappers add ~3 calls per step."""
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    clock: list[float] = []
    spent = {label: 0.0 for _, _, label in PARTS}

    def progress(_index: int, now_s: float) -> None:
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())
        clock.append(now_s)

    def timed(label: str, fn: Callable) -> Callable:
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t
        return wrapper

    workload = ReplayWorkload(tokens_per_rank=case.tokens_per_rank, iterations=iterations)
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in PARTS]
    try:
        for obj, attr, label in PARTS:
            setattr(obj, attr, timed(label, getattr(obj, attr)))
        t0, c0 = time.perf_counter(), time.process_time()
        out = sim_mod.simulate(case.placement, case.topology, case.model, routing=case.stats, workload=workload,
                               config=case.config, progress=progress)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)
    spent[REST] = wall - sum(spent.values())
    steps = max(len(stamps) - 1, 1)
    per_step, per_step_cpu = (stamps[-1] - stamps[0]) / steps, (cpu_stamps[-1] - cpu_stamps[0]) / steps
    return OursRun(wall, cpu, int(out.summary["events"]), stamps[0] - t0 - per_step, per_step, per_step_cpu,
                   clock, spent)


def profile_ours(case: Case, iterations: int, top: int) -> str:
    prof = cProfile.Profile()
    workload = ReplayWorkload(tokens_per_rank=case.tokens_per_rank, iterations=iterations)
    prof.enable()
    sim_mod.simulate(case.placement, case.topology, case.model, routing=case.stats, workload=workload,
                     config=case.config)
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


# -- SimPy --------------------------------------------------------------------------------------

def rank_durations(cost: CostModel, traffic: Traffic, batch: BatchShape) -> np.ndarray:
    """Each GPU's duration of each phase of the step, float [phases, G].

    The same pieces, combined the same way, as :meth:`CostModel.step_cost` (standard
    execution): the phase durations there are the maxima over GPUs of these rows.
    """
    if traffic.moves is not None:
        raise NotImplementedError("context-coherent execution is not mirrored here")
    comp, kinds = cost.compute, cost.kinds
    step_net = cost.network.evaluate(traffic)
    tokens = batch.tokens
    expert = comp.expert_times(traffic.slots, np.broadcast_to(tokens, traffic.src.shape))  # [L, G]
    attention = comp.attention_times(tokens, batch.decode_context, batch.prefill_positions)  # [G]
    out = np.empty((len(kinds), len(tokens)))
    out[kinds == PhaseKind.ATTENTION] = attention
    out[kinds == PhaseKind.DENSE] = comp.dense_times(tokens)
    out[kinds == PhaseKind.DISPATCH] = step_net.dispatch.rank_s
    out[kinds == PhaseKind.COMPUTE] = expert
    out[kinds == PhaseKind.COMBINE] = step_net.combine.rank_s
    out[kinds == PhaseKind.OTHER] = cost.config.compute.step_overhead_s
    return out


@dataclass
class SimpySetup:
    rates: object
    cost: CostModel
    seconds: float


def simpy_setup(case: Case) -> SimpySetup:
    """What simulate() builds before its first step (replay without a trace, count level,
    standard execution): the routing rates on the same pool, and the cost model."""
    config = case.config
    t0 = time.perf_counter()
    pool = routing_pool(case.stats, case.model, size=config.pool_size, seed=config.seed)
    rates = routing_rates(case.placement, case.topology, pool.ids, execution=config.execution,
                          dispatch=config.dispatch)
    cost = CostModel(case.model, case.topology, case.placement, config)
    return SimpySetup(rates, cost, time.perf_counter() - t0)


@dataclass
class SimpyRun:
    loop_s: float        # env.run: the steps, numpy work included
    cpu_s: float         # the same, CPU seconds of this process
    numpy_s: float       # routing draw + per-GPU cost model, inside the loop
    events: int          # timeouts + all_of
    kernel_events: int   # everything SimPy scheduled
    now_s: float
    matches_step_cost: bool


def run_simpy(case: Case, setup: SimpySetup, iterations: int, style: str) -> SimpyRun:
    import simpy

    topo, placement, config = case.topology, case.placement, case.config
    rates, cost = setup.rates, setup.cost
    rng = np.random.default_rng([config.seed, 1])  # as simulate(): the same draws step by step
    need_pairs = config.network.kernel == "deepep-ll"
    scheduler = ReplayScheduler(None, ReplayWorkload(tokens_per_rank=case.tokens_per_rank, iterations=iterations),
                                topo.num_gpus)
    env = simpy.Environment()
    counts = {"timeouts": 0, "all_of": 0, "numpy_s": 0.0, "checked": None}

    def gpu_phase(env: simpy.Environment, duration: float):
        yield env.timeout(duration)

    def driver(env: simpy.Environment):
        while (step := scheduler.next_step()) is not None:
            t = time.perf_counter()
            traffic = sample_traffic(rates, placement, topo, step.shape.tokens, rng, with_pairs=need_pairs)
            durations = rank_durations(cost, traffic, step.shape)
            if counts["checked"] is None:  # once: the per-GPU rows reproduce step_cost's phases
                ref = cost.step_cost(traffic, step.shape).durations_s
                counts["checked"] = bool(np.array_equal(durations.max(axis=1), ref))
            rows = durations.tolist()
            counts["numpy_s"] += time.perf_counter() - t
            for row in rows:
                if style == "process":
                    yield env.all_of([env.process(gpu_phase(env, d)) for d in row])
                else:
                    yield env.all_of([env.timeout(d) for d in row])
                counts["timeouts"] += len(row)
                counts["all_of"] += 1
            scheduler.finish_step(step, env.now)

    env.process(driver(env))
    t0, c0 = time.perf_counter(), time.process_time()
    env.run()
    loop, cpu = time.perf_counter() - t0, time.process_time() - c0
    kernel = next(env._eid)  # SimPy's event-id counter: one per scheduled event
    return SimpyRun(loop, cpu, counts["numpy_s"], counts["timeouts"] + counts["all_of"], kernel, env.now,
                    bool(counts["checked"]))


# -- report -------------------------------------------------------------------------------------

def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=1000, help="decode steps of our simulator")
    ap.add_argument("--simpy-iterations", type=int, default=30, help="decode steps of the SimPy model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--placement", choices=("eplb", "contiguous"), default="eplb")
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--redundant", type=int, default=64)
    ap.add_argument("--trace-tokens", type=int, default=20_000)
    ap.add_argument("--tokens-per-rank", type=int, default=128)
    ap.add_argument("--target-s", type=float, default=10.0)
    ap.add_argument("--target-ratio", type=float, default=10.0)
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions of one run of ours")
    args = ap.parse_args()

    t0 = time.perf_counter()
    case = build_case(args.placement, args.gpus, args.redundant, args.trace_tokens, args.tokens_per_rank)
    g = case.topology.num_gpus
    print(f"model {case.model.name} ({case.model.num_hidden_layers} layers, {case.model.num_moe_layers} MoE, "
          f"E={case.model.num_experts}, top-{case.model.top_k}) on {g} GPUs ({case.topology.num_nodes} nodes of "
          f"{case.topology.gpus_per_node}), {args.tokens_per_rank} tokens per rank per step")
    print(f"placement: {case.label}; kernel {case.config.network.kernel}, {case.config.execution} execution, "
          f"{case.config.dispatch} dispatch")
    print(f"case built in {time.perf_counter() - t0:.1f} s (not timed below); load average {_load()}")
    t0 = time.perf_counter()
    run_ours(case, 2)
    print(f"warm-up call of ours (2 steps; numba cache load, first-call costs): {time.perf_counter() - t0:.2f} s\n")

    setup = simpy_setup(case)
    print(f"simpy  set-up (routing pool + rates + cost model; once, reused by every SimPy run): "
          f"{setup.seconds:.2f} s\n")
    # Interleaved, so that the load of the moment weighs on both alike.
    ours: list[OursRun] = []
    simpy_runs: dict[str, list[SimpyRun]] = {"process": [], "lean": []}
    for i in range(args.repeats):
        ours.append(run_ours(case, args.iterations))
        r = ours[-1]
        print(f"ours   run {i + 1}: {r.wall_s:6.2f} s wall ({r.cpu_s:5.2f} s CPU), set-up {r.setup_s:5.2f} s, "
              f"{1e3 * r.per_step_s:6.2f} ms/step, {r.events} events; load {_load()}")
        for style, runs in simpy_runs.items():
            runs.append(run_simpy(case, setup, args.simpy_iterations, style))
            r = runs[-1]
            print(f"simpy  run {i + 1} ({style:>7}): {r.loop_s:6.2f} s wall ({r.cpu_s:5.2f} s CPU) for "
                  f"{args.simpy_iterations} steps, {1e3 * r.loop_s / args.simpy_iterations:7.2f} ms/step (routing + "
                  f"cost {1e3 * r.numpy_s / args.simpy_iterations:5.2f}), {r.events} events; load {_load()}")

    med = statistics.median
    n, ns = args.iterations, args.simpy_iterations
    o_wall, o_cpu = med(r.wall_s for r in ours), med(r.cpu_s for r in ours)
    o_setup, o_step = med(r.setup_s for r in ours), med(r.per_step_s for r in ours)
    o_step_cpu = med(r.per_step_cpu_s for r in ours)
    o_events = ours[0].events
    o_ev_step = o_events / n
    ref_clock = ours[0].clock[ns - 1] if ns <= n else float("nan")
    o_evs = o_ev_step / o_step
    o_evs_events = med(o_events / r.parts[REST] for r in ours)
    phases = len(setup.cost.kinds)

    print(f"\nmedians of {args.repeats} runs; a step is one decode iteration: {g} GPUs x {phases} phases")
    hdr = (f"{'engine':<31} {'steps':>5} {'wall s':>7} {'CPU s':>6} {'1000 steps s':>12} {'events':>9} "
           f"{'ev/step':>7} {'ms/step':>8} {'CPU ms':>7} {'ev/s (step)':>12} {'ev/s (events)':>14}")
    print(hdr)
    print("-" * len(hdr))
    print(f"{'ours (placer.simulator)':<31} {n:>5} {o_wall:>7.2f} {o_cpu:>6.2f} {o_setup + 1000 * o_step:>12.2f} "
          f"{o_events:>9} {o_ev_step:>7.0f} {1e3 * o_step:>8.2f} {1e3 * o_step_cpu:>7.2f} {o_evs:>12,.0f} "
          f"{o_evs_events:>14,.0f}")
    rows = {}
    for style, runs in simpy_runs.items():
        loop, cpu = med(r.loop_s for r in runs), med(r.cpu_s for r in runs)
        ev = runs[0].events
        step = loop / ns
        evs, evs_events = ev / loop, med(ev / (r.loop_s - r.numpy_s) for r in runs)
        rows[style] = (step, cpu / ns, evs, evs_events, runs[0])
        name = f"SimPy, {'process per GPU+phase' if style == 'process' else 'lean (bare timeouts)'}"
        print(f"{name:<31} {ns:>5} {loop:>7.2f} {cpu:>6.2f} {setup.seconds + 1000 * step:>12.2f} {ev:>9} "
              f"{ev / ns:>7.0f} {1e3 * step:>8.2f} {1e3 * cpu / ns:>7.2f} {evs:>12,.0f} {evs_events:>14,.0f}")
    print("'wall s', 'CPU s': ours the whole simulate() call, SimPy env.run (set-up apart); '1000 steps s': "
          "set-up + 1000 x ms/step (ours: measured set-up and steady-state steps, SimPy: its set-up and "
          "steps, projected); 'ms/step', 'CPU ms': per step, steady state; 'ev/s (step)': events per "
          "second of step time (routing draw and cost model included); 'ev/s (events)': events per second "
          "of event handling alone (ours: the time outside set-up, routing draw, cost model and collector; "
          "SimPy: step time less routing draw and cost model)")
    for style, (*_, r) in rows.items():
        same = np.isclose(r.now_s, ref_clock, rtol=1e-12, atol=0)
        print(f"SimPy {style}: kernel-scheduled events {r.kernel_events} ({r.kernel_events / ns:.0f}/step; "
              f"counted above: {r.events / ns:.0f} timeouts + all_of); per-GPU rows reproduce step_cost: "
              f"{'yes' if r.matches_step_cost else 'NO'}; clock after {ns} steps {r.now_s:.9f} s, ours "
              f"{ref_clock:.9f} s: {'same' if same else 'DIFFERENT'}")

    print("\nratios, SimPy vs ours (> 1: SimPy slower):")
    for style, (step, step_cpu, evs, evs_events, _) in rows.items():
        print(f"  {style:>7}: time per step {step / o_step:5.1f}x wall, {step_cpu / o_step_cpu:5.1f}x CPU;  "
              f"events/s incl. routing + cost {o_evs / evs:5.2f}x;  events/s of event handling alone "
              f"{o_evs_events / evs_events:5.2f}x")
    p_step, _, p_evs, p_evs_e, _ = rows["process"]
    print(f"\ncheck: ours {n} iterations in {o_wall:.2f} s wall (median; {o_cpu:.2f} s CPU) <= {args.target_s:g} s? "
          f"{'yes' if o_wall <= args.target_s else 'NO'}")
    model_events = rows["process"][4].events / ns  # one per GPU per phase + a barrier, the same model
    print(f"model events per step (one per GPU per phase and one barrier per phase, the same in both): "
          f"{model_events:.0f}; per second: ours {model_events / o_step:,.0f}, SimPy {model_events / p_step:,.0f}")
    print(f"check: SimPy (process per GPU and phase) >= {args.target_ratio:g}x slower in model events/s? "
          f"{'yes' if p_step / o_step >= args.target_ratio else 'NO'} ({p_step / o_step:.1f}x; our engine "
          f"handles them as {o_ev_step:.0f} heap events a step, SimPy as one event each)")
    print(f"       heap events/s, not like for like: "
          f"incl. routing + cost: {'yes' if o_evs / p_evs >= args.target_ratio else 'NO'} "
          f"({o_evs / p_evs:.2f}x); events/s of event handling: "
          f"{'yes' if o_evs_events / p_evs_e >= args.target_ratio else 'NO'} ({o_evs_events / p_evs_e:.2f}x); "
          f"time per simulated step: {'yes' if p_step / o_step >= args.target_ratio else 'NO'} "
          f"({p_step / o_step:.1f}x)")
    print(f"\nwhere our time goes ({n} iterations; median over the runs of each part, timed in every run):")
    for label in ours[0].parts:
        v = med(r.parts[label] for r in ours)
        print(f"  {label:<48} {v:7.2f} s  {100 * v / o_wall:5.1f} %")
    print(f"  {'total (median wall)':<48} {o_wall:7.2f} s")
    if args.profile:
        print(f"\ncProfile of one run of ours ({n} iterations):")
        print(profile_ours(case, n, 25))


if __name__ == "__main__":
    main()
