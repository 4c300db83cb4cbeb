"""``placer demo``: the whole pipeline on the embedded default, end to end.

1. Routing: the embedded model (``placer.profiling.embedded``) profiled on two disjoint halves
   of its held-out prompts, one to fit and one held out (torch and transformers needed); without
   them, a synthetic Mixtral-8x7B trace and a perturbed one, labelled synthetic.
2. Every placement method solved on the fitting half.
3. Every placement evaluated on the held-out half; native placement files carry those metrics.
4. The held-out half replayed through the simulator with every placement. The embedded model is
   tiny, so its all-to-all would be pure latency: the simulation keeps its routing (layers,
   experts, top-k) at Mixtral-8x7B's layer sizes and says so (model ``<name>@mixtral-8x7b-sizes``).
5. The best placement (lowest simulated p50 step time; ties to the best held-out balance)
   exported for SGLang; one HTML report of everything.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from placer.app.comparison import Candidate, routing_identity, run_comparison
from placer.app.report import render_full_report
from placer.display import format_value
from placer.errors import InvalidInputError, PlacerError
from placer.ilp import PlacementProblem, solve
from placer.io.atomic import atomic_write_text
from placer.io.native import write_trace_npz
from placer.io.placements import export_placement, write_placement_json
from placer.io.traces import read_trace
from placer.metrics import evaluate
from placer.presets import get_model, make_topology
from placer.profiling import embedded
from placer.profiling.profile import profile_hf
from placer.simulator.config import ReplayWorkload, SimConfig
from placer.stacks import STACKS
from placer.stats import compute_stats
from placer.synthetic import SCORING_PERTURBATION, perturbed, profile_for, synthesize_trace
from placer.types import ModelSpec, RoutingTrace

DEMO_METHODS = ("contiguous", "round-robin", "eplb", "moetuner", "exflow", "exact", "placer")
DEMO_GPUS = 4
DEMO_CLUSTER = "h100"


@dataclass(frozen=True)
class DemoOutcome:
    """Where everything went, and the methods table (one dict per method)."""

    output: str
    report: str
    sglang: str
    sglang_flags: list[str]
    sglang_note: str
    best: str
    routing: str
    rows: list[dict[str, Any]]
    seconds: float


def _embedded_available() -> bool:
    try:
        import torch  # noqa: F401  # deferred: torch is an optional extra
        import transformers  # noqa: F401  # deferred: transformers is an optional extra
    except ImportError:
        return False
    return embedded.WEIGHTS_FILE.exists() and embedded.CONFIG_FILE.exists()


def _profiled(output: str, max_prompts: int, say: Callable[[str], None],
              stage: Callable[[str], None]) -> tuple[RoutingTrace, RoutingTrace, str]:
    """Profile the embedded model on two halves of its held-out prompts; returns (fit, holdout)."""
    prompts = embedded.heldout_prompts(max_bytes=255, limit=max_prompts)
    if len(prompts) < 2:
        raise InvalidInputError("fewer than two held-out prompts found in the standard library",
                                source="embedded model")
    halves = {"fit": prompts[0::2], "holdout": prompts[1::2]}
    traces = {}
    for name, texts in halves.items():
        stage(f"profiling the {name} half")
        path = os.path.join(output, f"prompts-{name}.jsonl")
        atomic_write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
        out = profile_hf(None, path, output=os.path.join(output, f"{name}-stats.npz"),
                         trace=os.path.join(output, f"{name}-trace.parquet"), max_length=256)
        say(f"profiled the embedded model on {len(texts)} {name} prompts: {out.tokens:,} tokens "
            f"({format_value('tokens_tok_s', out.tokens_per_second)})")
        traces[name] = read_trace(os.path.join(output, f"{name}-trace.parquet"))
    return traces["fit"], traces["holdout"], "embedded model, profiled"


def _synthetic(output: str, say: Callable[[str], None]) -> tuple[RoutingTrace, RoutingTrace, str]:
    model = get_model("mixtral-8x7b")
    fit = synthesize_trace(model, 20000, seed=0)
    held = synthesize_trace(model, 20000, seed=1, profile=perturbed(profile_for(model), SCORING_PERTURBATION, 1))
    write_trace_npz(os.path.join(output, "fit-trace.npz"), fit, synthetic=True)
    write_trace_npz(os.path.join(output, "holdout-trace.npz"), held, synthetic=True)
    say("torch/transformers or the embedded weights are missing: using a synthetic Mixtral-8x7B trace")
    return fit, held, "synthetic mixtral-8x7b"


def _sglang_export(placement, model: ModelSpec, topology, path: str,
                   say: Callable[[str], None]) -> tuple[list[str], str]:
    """Export the demo's best placement for SGLang 0.5.23, or, for a model it cannot place (the
    demo's Mixtral), show why and export an ``eplb`` placement solved under SGLang's own rule for
    a model it places (DeepSeek-V2-Lite, synthetic routing) instead. Returns (flags, note)."""
    stack = STACKS["sglang"]
    try:
        stack.check_model(model)
    except InvalidInputError as exc:
        reason = str(exc).split(": ", 1)[-1].split("; ")[0]
        say(f"{reason}: no SGLang file for it")
        v2 = get_model("deepseek-v2-lite")
        assert stack.dispatch is not None  # SGLang's rule
        problem = PlacementProblem(compute_stats(synthesize_trace(v2, 4000, seed=0)), v2, topology,
                                   num_redundant=topology.num_gpus, dispatch=stack.dispatch)
        eplb = solve(problem, "eplb", seed=0).placement
        assert eplb is not None  # a posed problem is feasible (PlacementProblem checks it)
        flags = export_placement(eplb, "sglang", path, model=v2, topology=topology)
        return flags, (f"a {v2.name} placement, synthetic routing, eplb under {stack.dispatch}: "
                       f"{stack.label} cannot place {model.name}")
    flags = export_placement(placement, "sglang", path, model=model, topology=topology)
    return flags, f"the best placement, for {stack.label}"


def simulation_model(model: ModelSpec) -> ModelSpec:
    """``model``'s routing shape at Mixtral-8x7B's layer sizes when its own sizes are tiny."""
    mixtral = get_model("mixtral-8x7b")
    if model.hidden_size >= 1024:
        return model
    return replace(model, name=f"{model.name}@mixtral-8x7b-sizes", hidden_size=mixtral.hidden_size,
                   expert_ffn_size=mixtral.expert_ffn_size, activation_bytes=2.0, weight_bytes=2.0)


def run_demo(output: str = "demo-out", *, synthetic: bool = False, max_prompts: int = 96,
             time_limit_s: float = 10.0, progress: Callable[[str], None] | None = None,
             on_stage: Callable[[int, int, str], None] | None = None) -> DemoOutcome:
    """Run the demo into ``output`` (created); see the module docstring.

    ``progress(line)`` is told each stage's result; ``on_stage(done, total, next)`` each stage
    as it starts (profiling each half, each method's solve, the simulation, the files), and
    ``(total, total, "done")`` at the end.
    """
    say = progress or (lambda message: None)
    start = time.perf_counter()
    os.makedirs(output, exist_ok=True)
    if not synthetic and not _embedded_available():
        synthetic = True
    total = (1 if synthetic else 2) + len(DEMO_METHODS) + 2
    started = 0

    def stage(name: str) -> None:
        nonlocal started
        if on_stage is not None:
            on_stage(started, total, name)
        started += 1

    if synthetic:
        stage("synthesizing the traces")
    fit, held, routing_kind = _synthetic(output, say) if synthetic else _profiled(output, max_prompts, say, stage)
    model = fit.model
    if model is None:
        raise PlacerError("the profiled trace carries no model description")
    topology = make_topology(DEMO_CLUSTER, gpus=DEMO_GPUS)
    problem = PlacementProblem(compute_stats(fit), model, topology)
    placements_dir = os.path.join(output, "placements")
    os.makedirs(placements_dir, exist_ok=True)
    rows: list[dict[str, Any]] = []
    candidates: list[Candidate] = []
    for method in DEMO_METHODS:
        stage(f"solving {method}")
        result = solve(problem, method, seed=0, time_limit_s=time_limit_s if method in ("exact", "placer") else None)
        assert result.placement is not None  # a posed problem is feasible (PlacementProblem checks it)
        metrics = {k: v for k, v in evaluate(result.placement, topology, model, held).items() if k != "per_layer"}
        path = os.path.join(placements_dir, f"{method}.json")
        write_placement_json(path, result.placement, model=model, topology=topology, dispatch="nearest",
                             method=method, status=result.status if result.status != "infeasible" else "feasible",
                             solve_seconds=result.wall_time_s, metrics={"holdout": metrics})
        rows.append({"method": method, "status": result.status, "solve_s": result.wall_time_s,
                     "holdout_load_max_mean": metrics.get("load_max_over_mean_median"),
                     "holdout_other_ranks": metrics.get("other_ranks_per_token_layer"),
                     "holdout_cc_cross_gpu": metrics.get("frac_top1_transitions_cross_gpu")})
        candidates.append(Candidate(method, result.placement, path, method))
        say(f"solved {method}: {result.status} in {format_value('solve_s', result.wall_time_s)}")
    stage("simulating")
    sim_model = simulation_model(model)
    sim_dir = os.path.join(output, "sim")
    held_sim = RoutingTrace(held.expert_ids, held.num_experts, held.order, held.gate_weights, held.request_ids,
                            held.phase, held.home_rank, sim_model)
    runs = run_comparison(candidates, topology, sim_model, routing=held_sim,
                          routing_info=routing_identity([], held_sim, sim_model, synthetic) | {
                              "source": f"{routing_kind}, held-out half", "tokens": held.num_tokens},
                          workload=ReplayWorkload(tokens_per_rank=128, iterations=None, context_len=256),
                          config=SimConfig(), output=sim_dir)
    say(f"simulated {len(runs)} placements on the held-out half ({sim_model.name})")
    by_label = {r.label: r.summary for r in runs}
    for row in rows:
        s = by_label[row["method"]]
        row["sim_step_p50_ms"] = None if s["iteration_p50_s"] is None else round(s["iteration_p50_s"] * 1e3, 4)
        row["sim_a2a_p99_us"] = None if s["a2a_p99_s"] is None else round(s["a2a_p99_s"] * 1e6, 2)
    best = min(rows, key=lambda r: (r["sim_step_p50_ms"] or float("inf"), r["holdout_load_max_mean"] or 0.0))
    stage("writing the SGLang file and the report")
    sglang = os.path.join(output, "sglang.json")
    best_placement = next(c.placement for c in candidates if c.label == best["method"])
    flags, note = _sglang_export(best_placement, model, topology, sglang, say)
    report = os.path.join(output, "report.html")
    render_full_report(sim_dir, report, placements=[c.path for c in candidates if c.path],
                       routing_inputs=[], title=f"placer demo: {routing_kind}")
    if on_stage is not None:
        on_stage(total, total, "done")
    return DemoOutcome(output=output, report=report, sglang=sglang, sglang_flags=list(flags), sglang_note=note,
                       best=best["method"], routing=routing_kind,
                       rows=rows, seconds=time.perf_counter() - start)
