"""``placer solve``, ``placer evaluate`` and ``placer export``: placements, their scores, the
serving stacks' files."""

from __future__ import annotations

import click

from placer._clock import process_start_time
from placer._progress import reporting
from placer.cli.options import (
    CONTEXT,
    FiniteFloat,
    cluster_options,
    echo_json,
    model_option,
    parse_exports,
    parse_weights,
    placement_stack,
    read_placement,
    resolve_model,
    resolve_stack,
    resolve_topology,
    routing_options,
    stack_option,
)
from placer.cli.progress import Progress, quiet_option
from placer.display import format_value, table
from placer.errors import InvalidInputError
from placer.stacks import STACKS, resolve_dispatch


@click.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, type=click.Path())
@model_option
@cluster_options
@routing_options
@stack_option
@click.option("--redundant", type=click.IntRange(min=0), default=0, show_default=True,
              help="Redundant expert slots per layer (R); (E + R) must divide evenly over the GPUs.")
@click.option("--groups", type=click.IntRange(min=1), default=None,
              help="Expert groups (group-limited routing; EPLB's hierarchical policy packs groups onto nodes).")
@click.option("--method", default="placer", show_default=True,
              help="placer (joint objective), exact, eplb, moetuner, exflow, contiguous, round-robin.")
@click.option("--objective", type=click.Choice(["balance", "traffic", "affinity", "joint"]), default=None,
              help="Terms of the placer objective (default joint).")
@click.option("--weights", default=None, metavar="K=V,...", help="Objective weights, e.g. balance=1,traffic=0.5.")
@click.option("--backend", type=click.Choice(["cpsat", "pulp", "pulp-cbc", "pulp-highs", "local", "exact"]),
              default=None, help="Solver backend of ILP methods (pulp = CBC).")
@click.option("--time-limit", "time_limit_s", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Wall-clock limit in seconds from process start (reading, numba compilation and scoring "
                   "included); the best valid placement found is returned.")
@click.option("--workers", "num_workers", type=click.IntRange(min=1), default=None,
              help="Local processes for layer subproblems.")
@click.option("--ray-address", default=None,
              help="Run layer subproblems on this Ray cluster (host:port, or auto; default RAY_ADDRESS when set; "
                   "methods that split into layer subproblems: placer).")
@click.option("--load-cap", "load_cap", type=FiniteFloat(min=1.0), default=None, metavar="X",
              help="With --method exact: the fewest inter-node dispatches at max/mean GPU load <= X in every layer "
                   "(context-coherent execution: its per-layer load cap).")
@click.option("--frontier", "show_frontier", is_flag=True,
              help="With --method exact (standard execution): print the whole frontier of inter-node dispatches "
                   "against max/mean GPU load.")
@click.option("--holdout", multiple=True, type=click.Path(), metavar="TRACE",
              help="Score on these inputs too (not used for fitting). Repeatable.")
@click.option("--from", "current", type=click.Path(dir_okay=False), default=None, metavar="PLACEMENT",
              help="The placement running now (placer's JSON or a stack's file): re-place movement-aware, "
                   "layer by layer, weighing the weights moved against the objective gained over --horizon-s.")
@click.option("--horizon-s", "horizon_s", type=FiniteFloat(min=0, min_open=True), default=600.0, show_default=True,
              help="With --from: seconds the new placement is expected to serve (as serve --horizon).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Placement JSON to write.")
@click.option("--export", "exports", multiple=True, metavar="FMT=PATH",
              help="Also write a serving-stack file (sglang, vllm, vllm-ascend, trtllm, eplb). Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the result and comparison as JSON.")
@quiet_option
def solve(inputs, model, cluster, gpus, nodes, gpus_per_node, topology_file, gpu_speed, dispatch, execution, phase, stack, redundant, groups,
          method, objective, weights, backend, time_limit_s, num_workers, ray_address, load_cap, show_frontier,
          holdout, current, horizon_s, seed, output, exports, as_json, quiet):
    """Compute an expert-to-GPU placement, compare it with contiguous and EPLB, and write it.

    \b
    Example:
        placer solve trace.npz --stack sglang --gpus 16 --nodes 2 --redundant 16 \\
            --holdout held.npz -o p.json --export sglang=s.json
        placer solve today.npz --gpus 16 --nodes 2 --redundant 16 --method eplb \\
            --from p.json --horizon-s 600 -o p2.json
        placer solve trace.npz --gpus 4 --nodes 2 --redundant 4 --method exact \\
            --frontier --load-cap 1.05 -o p.json
    """
    from placer.app.workflow import solve_placement  # deferred: keeps numba off placer --help
    from placer.metrics import format_comparison  # deferred: keeps metrics (8 ms) off placer --help

    if (load_cap is not None or show_frontier) and method != "exact":
        raise InvalidInputError(f"{'--load-cap' if load_cap is not None else '--frontier'} needs --method exact "
                                f"(got --method {method})", source="--method")
    problem_weights = parse_weights(weights)
    if load_cap is not None:
        problem_weights["load_cap"] = load_cap
    if show_frontier:
        problem_weights["frontier"] = 1.0

    started = process_start_time()
    # The phases (reading, solving, the layers searched, scoring) with the time elapsed, against
    # --time-limit when given.
    with Progress("solve", total=time_limit_s, unit="s", clock=True, start=started, quiet=quiet) as bar, \
            reporting(bar.report):
        outcome = solve_placement(
            inputs, model=resolve_model(model), topology=resolve_topology(cluster, gpus, nodes, gpus_per_node, topology_file, gpu_speed),
            dispatch=dispatch, stack=resolve_stack(stack), execution=execution, phase=phase, redundant=redundant,
            groups=groups, method=method, seed=seed, time_limit_s=time_limit_s, objective=objective,
            weights=problem_weights, backend=backend, ray_address=ray_address, num_workers=num_workers,
            holdout=holdout, output=output, exports=parse_exports(exports),
            progress=lambda message: bar.update(note=message), started_at=started, current=current,
            horizon_s=horizon_s)
    r = outcome.result
    curve = frontier_of(r.terms)
    terms = {k: v for k, v in r.terms.items() if not k.startswith("frontier_")}
    if as_json:
        out = {"method": r.method, "status": r.status, "objective": r.objective, "terms": terms,
               "bound": r.bound, "gap": r.gap, "solve_seconds": r.wall_time_s, "output": output,
               "comparison": [{k: v for k, v in row.items()} for row in outcome.rows],
               "movement": outcome.metrics.get("movement"), "notes": list(outcome.notes)}
        if show_frontier:
            out["frontier"] = curve
        echo_json(out)
        return
    gap = "" if r.gap is None else f", gap {format_value('gap', r.gap)}"
    target = f"for {outcome.stack.label}, " if outcome.stack is not None else ""
    on_ray = (f" ({int(r.terms['ray_tasks'])} Ray tasks on {int(r.terms['ray_nodes'])} node(s))"
              if "ray_nodes" in r.terms else "")
    took = format_value("solve_seconds", r.wall_time_s)
    click.echo(f"{r.method}: status {r.status}{gap}, {took}{on_ray}; {target}dispatch "
               f"{outcome.dispatch}; wrote {output}")
    for line in bound_lines(r, curve):
        click.echo(line)
    if outcome.rows:
        click.echo(format_comparison(outcome.rows))
    if show_frontier:
        click.echo(format_frontier(curve, int(r.terms.get("sample_tokens", 0))))
    for note in outcome.notes:
        click.echo(note)
    for fmt, path, flags in outcome.exported:
        click.echo(f"exported {fmt} to {path}; serve with:")
        for line in flags:
            click.echo(f"  {line}")


def frontier_of(terms: dict) -> list[dict]:
    """The exact frontier's points from a result's ``terms`` (empty for other methods)."""
    return [{"load_cap": terms[f"frontier_{i}_load_cap"], "load_median": terms[f"frontier_{i}_load_median"],
             "inter_node_per_token_layer": terms[f"frontier_{i}_inter_node"]}
            for i in range(int(terms.get("frontier_points", 0)))]


def bound_lines(result, curve: list[dict]) -> list[str]:
    """One line saying what the reported bound covers (joint objective) or which frontier point was taken."""
    terms = result.terms
    if curve:
        cap, first, last = terms["load_cap"], curve[0]["load_cap"], curve[-1]["load_cap"]
        return [f"exact: {terms['inter_node_per_token_layer']:.4f} inter-node dispatches per token-layer, the fewest "
                f"at max/mean GPU load <= {cap:.4f} in every layer (worst layer {terms['load_max_over_mean_worst']:.4f}"
                f", median {terms['load_max_over_mean_median']:.4f}; loads from the expert counts, dispatches on "
                f"{int(terms['sample_tokens']):,} sampled tokens); the frontier has {len(curve)} points from "
                f"{first:.4f} to {last:.4f} (--frontier prints them, --load-cap picks one)"]
    if "bound_traffic" in terms:
        from placer.ilp.bounds import BOUND_COVERS  # deferred: keeps the solvers off placer --help

        if not terms.get("bound_covers_traffic"):
            return ["bound covers balance (mean, heaviest expert) only, traffic >= 0: the time limit left no room "
                    "for the traffic bound"]
        alone = 1 - terms["bound_balance_only"] / result.objective if result.objective > 0 else 0.0
        return [f"bound covers {BOUND_COVERS} (balance bound alone: gap {format_value('gap', alone)})"]
    return []


def format_frontier(curve: list[dict], tokens: int) -> str:
    """The frontier as a fixed-width table, one row per point."""
    keys = ("load_cap", "load_median", "inter_node_per_token_layer")
    return (f"frontier (exact): inter-node dispatches per token-layer ({tokens:,} sample tokens) against the "
            "max/mean GPU load cap of every layer\n"
            + table([[format_value(k, p[k], digits=5) for k in keys] for p in curve], header=["load cap", "load med", "inter-node"],
                    align="rrr"))


@click.command(context_settings=CONTEXT)
@click.argument("placement", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@model_option
@cluster_options
@routing_options
@stack_option
@click.option("--chunk-mb", type=FiniteFloat(min=1), default=512, show_default=True,
              help="Memory for one chunk of a trace: traces are read and scored chunk by chunk.")
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(placement, inputs, model, cluster, gpus, nodes, gpus_per_node, topology_file, gpu_speed, dispatch, execution, phase, stack,
             chunk_mb, quiet, as_json):
    """Score a placement on any routing input: load balance, dispatch traffic, transitions.

    PLACEMENT is placer's JSON or the file a server loads (SGLang .json/.pt, vllm-ascend .json,
    TRT-LLM .yaml, EPLB .npz; those need --model and --gpus). The rule is --dispatch, else
    --stack's, else the stack file's, else the one the file was solved under.

    \b
    Example:
        placer evaluate p.json experts_math_mixtral.json --stack vllm
        placer evaluate sglang.json trace.npz --model deepseek-v2-lite --gpus 16 --nodes 2
    """
    from placer.app.workflow import evaluate_placement  # deferred: keeps numba off placer --help
    from placer.metrics import format_table  # deferred: keeps metrics (8 ms) off placer --help
    target = resolve_stack(stack)
    pf = read_placement(placement, model, cluster, gpus, nodes, gpus_per_node, target, topology_file, gpu_speed)
    target = placement_stack(pf, target)
    rule = resolve_dispatch(dispatch, target, pf.model, fallback=pf.dispatch, source=placement)
    # Progress: the tokens scored (read first for the statistics where counts or unknown top-1 need them).
    with Progress("evaluate", unit="tokens", quiet=quiet) as bar, reporting(bar.report):
        metrics = evaluate_placement(pf, inputs, dispatch=rule, execution=execution, phase=phase, chunk_mb=chunk_mb)
    metrics["stack"] = None if target is None else target.label
    if as_json:
        echo_json(metrics)
    else:
        click.echo(f"dispatch {rule}" + (f" ({target.label})" if target is not None else ""))
        click.echo(format_table(metrics))


@click.command(context_settings=CONTEXT)
@click.argument("placement", type=click.Path())
@model_option
@cluster_options
@stack_option
@click.option("--format", "fmt", default=None,
              help="sglang, vllm-ascend, trtllm or eplb (default: --stack's, else the file's stack's).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="File to write (SGLang: .json or .pt).")
@click.option("--json", "as_json", is_flag=True, help="Print the format, file, flags and notes as JSON.")
def export(placement, model, cluster, gpus, nodes, gpus_per_node, topology_file, gpu_speed, stack, fmt, output, as_json):
    """Convert a placement into the file a serving stack loads, and print its flags.

    PLACEMENT is placer's JSON or another stack's file (then give --model and --gpus). A
    placement solved for another stack's rule (or for none) is re-checked against the target's
    constraints, and the command says how to re-score it under the target's rule.

    \b
    Example:
        placer export p.json --stack sglang -o sglang.json
        placer export sglang.json --model deepseek-v2-lite --gpus 16 --stack trtllm -o lb.yaml --json
    """
    from placer.io.placements import export_placement  # deferred: keeps numba off placer --help
    pf = read_placement(placement, model, cluster, gpus, nodes, gpus_per_node, topology_file=topology_file,
                        gpu_speed=gpu_speed)
    target = resolve_stack(stack) or (STACKS.get(fmt) if fmt else pf.stack)
    if fmt is None and target is not None:
        # A stack that loads no file (vLLM) exports under its own name, which export_placement
        # refuses with the flags of the stack's own balancer (main() prints them).
        fmt = target.format or target.name
    if fmt is None:
        raise InvalidInputError("give --stack or --format: the placement names no serving stack", source=placement)
    (fmt, output), = parse_exports((f"{fmt}={output}",), "--format" if stack is None else "--stack")
    flags = export_placement(pf.placement, fmt, output, model=pf.model, topology=pf.topology)
    notes = []
    if target is not None and target.dispatch is not None and target.dispatch != pf.dispatch:
        notes.append(f"{placement} was solved and scored under dispatch {pf.dispatch}; {target.label} runs "
                     f"{target.dispatch}: re-score with 'placer evaluate {placement} TRACE --stack {target.name}' "
                     f"or re-solve with --stack {target.name}")
    if as_json:
        echo_json({"format": fmt, "output": output, "stack": None if target is None else target.label,
                   "flags": list(flags), "notes": notes})
        return
    click.echo(f"exported {fmt} to {output}" + (f" for {target.label}" if target is not None else "")
               + "; serve with:")
    for line in flags:
        click.echo(f"  {line}")
    for note in notes:
        click.echo(f"note: {note}")
