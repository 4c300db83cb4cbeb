"""``placer simulate run | a2a | sweep``: parse, one library call, print."""

from __future__ import annotations

import contextlib

import click

from placer import display
from placer.cli.options import (
    CONTEXT,
    FiniteFloat,
    cluster_options,
    echo_json,
    model_option,
    renamed_option,
    resolve_model,
    resolve_stack,
    resolve_topology,
    stack_option,
    with_speed,
)
from placer.cli.progress import Progress, quiet_option
from placer.display import key_value_table
from placer.errors import InvalidInputError
from placer.presets import CLUSTERS
from placer.stacks import resolve_dispatch
from placer.types import DISPATCH_RULES, EXECUTION_MODES

KERNEL_CHOICES = ("nccl", "deepep-normal", "deepep-ll", "deepep-v2")  # placer.simulator.KERNELS, without importing it (a test checks)


def _numbers(text: str | None, flag: str, kind: type, what: str, valid, rule: str) -> list:
    """The comma-separated ``kind`` values of ``text`` (none when it is None); each must be ``valid``."""
    if text is None:
        return []
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidInputError(f"expected comma-separated {what}, got {text!r}", source=flag) from None
    if not all(valid(v) for v in values):
        raise InvalidInputError(f"must be {rule}, got {text!r}", source=flag)
    return values


def _floats(text: str | None, flag: str) -> list[float]:
    return _numbers(text, flag, float, "numbers", lambda v: 0 < v < float("inf"), "positive finite numbers")


def _ints(text: str | None, flag: str) -> list[int]:
    return _numbers(text, flag, int, "whole numbers", lambda v: v >= 1, "at least 1")


def workload_options(func):
    for deco in reversed([
        click.option("--workload", type=click.Choice(["serving", "replay"]), default="serving", show_default=True,
                     help="serving: Poisson arrivals and continuous batching; replay: fixed decode batches "
                          "(a trace's tokens in order, else routing sampled from the input)."),
        click.option("--rate", type=FiniteFloat(min=0, min_open=True), default=20.0, show_default=True,
                     help="Requests per second (serving)."),
        click.option("--duration", "duration_s", type=FiniteFloat(min=0, min_open=True), default=60.0,
                     show_default=True,
                     help="Seconds of arrivals (serving); the run drains for as long again at most."),
        click.option("--prompt-len", type=int, default=1024, show_default=True, help="Mean prompt tokens."),
        click.option("--output-len", type=int, default=256, show_default=True, help="Mean output tokens."),
        click.option("--length-dist", type=click.Choice(["exponential", "fixed"]), default="exponential",
                     show_default=True, help="Distribution of prompt and output lengths."),
        click.option("--token-budget", type=int, default=2048, show_default=True,
                     help="Tokens per rank per step, decode first then chunked prefill (serving)."),
        click.option("--max-running", type=int, default=256, show_default=True, help="Requests per rank (serving)."),
        click.option("--iterations", type=int, default=None,
                     help="Steps to run (replay: default the whole trace or 100; serving: a cap)."),
        click.option("--tokens-per-rank", type=int, default=128, show_default=True,
                     help="Decode tokens per rank per step (replay)."),
        click.option("--context-len", type=int, default=1024, show_default=True,
                     help="Context tokens of each replayed decode token."),
    ]):
        func = deco(func)
    return func


def engine_options(func):
    for deco in reversed([
        click.option("--execution", type=click.Choice(EXECUTION_MODES), default="standard", show_default=True,
                     help="standard EP, or ExFlow's context-coherent execution (KV replicated, per-step all-gather)."),
        click.option("--kernel", type=click.Choice(KERNEL_CHOICES), default="deepep-normal", show_default=True,
                     help="All-to-all kernel: byte accounting and latency constants."),
        click.option("--congestion", type=click.Choice(["none", "fifo"]), default="none", show_default=True,
                     help="fifo: serialise messages per port (congestion-aware) instead of the closed form."),
        click.option("--overlap", type=click.Choice(["none", "two-batch"]), default="none", show_default=True,
                     help="two-batch: split each step in two micro-batches per rank and run one's dispatch and "
                          "combine under the other's compute (SGLang two-batch overlap, standard execution)."),
        click.option("--dispatch", type=click.Choice(DISPATCH_RULES), default=None,
                     help="Replica dispatch rule (default: the placement file's, else nearest)."),
        click.option("--level", type=click.Choice(["count", "token"]), default="count", show_default=True,
                     help="Route by per-token rates (fast) or token by token (cross-check)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of arrivals and routing draws."),
    ]):
        func = deco(func)
    return func


def _workload_and_config(workload, rate, duration_s, prompt_len, output_len, length_dist, token_budget,
                         max_running, iterations, tokens_per_rank, context_len, execution, kernel, congestion,
                         overlap, dispatch, seed):
    """The simulator's workload and configuration from the flags."""
    from placer.simulator import config as sim  # deferred: keeps pandas off placer --help
    if workload == "replay":
        wl = sim.ReplayWorkload(tokens_per_rank=tokens_per_rank, iterations=iterations, context_len=context_len)
    else:
        wl = sim.ServingWorkload(rate=rate, duration_s=duration_s, prompt_len=prompt_len, output_len=output_len,
                                 length_dist=length_dist, token_budget=token_budget, max_running=max_running,
                                 max_steps=iterations)
    config = sim.SimConfig(network=sim.kernel_preset(kernel, congestion=congestion), execution=execution,
                           dispatch=dispatch, seed=seed, overlap=overlap)
    return wl, config


def _replay_steps(data, tokens_per_step: int, iterations: int | None) -> int:
    """Steps a replay runs: a trace once through (at most ``iterations``), else ``iterations`` or 100."""
    from placer.metrics import TraceStream  # deferred: keeps numpy off placer --help
    from placer.types import RoutingTrace  # deferred: keeps numpy off placer --help

    if isinstance(data, RoutingTrace | TraceStream) and data.num_tokens is not None:
        steps = -(-data.num_tokens // max(1, tokens_per_step))
        return min(steps, iterations) if iterations is not None else steps
    return iterations or 100


def _run_ticker(bar: Progress, labels: list[str], per_run: float, unit: str):
    """The simulator's ``progress(label, step, now)`` callback as steps (or simulated seconds) of all runs."""
    index = {label: i for i, label in enumerate(labels)}

    def tick(label: str, step: int, now: float) -> None:
        done = min(now if unit == "s" else step + 1, per_run)  # serving drains past its duration
        bar.update(index.get(label, 0) * per_run + done, note=label)

    return tick


@click.group(context_settings=CONTEXT)
def simulate() -> None:
    """Discrete-event simulation of expert-parallel serving: all-to-all, stragglers, tail latency.

    \b
    Example:
        placer simulate run trace.npz --placement a.json --placement b.json -o sim/
        placer simulate a2a --cluster h800 --gpus 16 --kernel deepep-normal --routing group-limited
        placer simulate sweep --model mixtral-8x7b --gpus 4,8 --method contiguous --method eplb -o sweep/
    """


@simulate.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("--placement", "placements", multiple=True, type=click.Path(), metavar="FILE",
              help="A native placement JSON (repeat to compare).")
@click.option("--method", "methods", multiple=True, metavar="NAME",
              help="Solve a placement with this method on the routing input (repeatable).")
@click.option("--redundant", type=click.IntRange(min=0), default=0, show_default=True,
              help="Redundant slots for --method placements.")
@model_option
@cluster_options
@workload_options
@engine_options
@stack_option
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Write the results layout (metrics.json, CSV tables) and report.html here.")
@click.option("--json", "as_json", is_flag=True, help="Print the summaries as JSON.")
@quiet_option
def run(inputs, placements, methods, redundant, model, cluster, gpus, nodes, gpus_per_node, topology_file, gpu_speed,
        workload, rate, duration_s, prompt_len, output_len, length_dist, token_budget, max_running, iterations, tokens_per_rank,
        context_len, execution, kernel, congestion, overlap, dispatch, level, seed, stack, output, as_json, quiet):
    """Simulate placements side by side with the same seeds; without INPUTS routing is synthetic.

    \b
    Example:
        placer simulate run experts_coding_mixtral.json --placement contiguous.json \\
            --placement balanced.json --workload replay --tokens-per-rank 128 -o sim/
        placer simulate run --model deepseek-v3 --cluster h200 --gpus 64 --method eplb \\
            --redundant 64 --rate 20 --duration 30 -o sim/
    """
    from placer.app import comparison  # deferred: keeps the simulator off placer --help
    from placer.io.atomic import output_directory  # deferred: keeps numba off placer --help

    # The output is checked before any work; on a failure or Ctrl-C nothing of this run is left.
    with output_directory(output) if output is not None else contextlib.nullcontext():
        routing, model_spec, sources, synthetic = _routing(inputs, model, placements, execution, methods)
        target = resolve_stack(stack)
        if target is not None:  # the stack's exact rule for every placement (--dispatch still overrides)
            dispatch = resolve_dispatch(dispatch, target, model_spec)
            if not as_json:
                click.echo(f"dispatch {dispatch} ({target.label})")
        topology = _maybe_topology(cluster, gpus, nodes, gpus_per_node, topology_file, gpu_speed)
        if topology is None and cluster is not None and not placements:
            raise InvalidInputError("give the cluster size: --gpus N (and --nodes K)", source="--gpus")
        candidates, model_spec, topology = comparison.placement_candidates(
            placements, methods, model=model_spec, topology=topology,
            stats=None if routing is None else routing.stats, redundant=redundant, dispatch=dispatch or "nearest",
            execution=execution, seed=seed)
        if gpu_speed is not None and topology.gpu_speed is None:  # the cluster came from a placement file
            topology = with_speed(topology, gpu_speed)
        wl, config = _workload_and_config(workload, rate, duration_s, prompt_len, output_len, length_dist,
                                          token_budget, max_running, iterations, tokens_per_rank, context_len,
                                          execution, kernel, congestion, overlap, dispatch, seed)
        if cluster is not None and topology.gpu_preset != cluster.lower():
            raise InvalidInputError(f"--cluster {cluster} contradicts the placement's cluster ({topology.name})",
                                    source="--cluster")
        # A replay streams a trace too large to keep (every token, chunk by chunk); serving samples the statistics.
        data = None if routing is None else (routing.exact_data if workload == "replay" else routing.data)
        # serving: simulated seconds of arrivals; replay: steps (the whole trace, else 100, unless --iterations)
        unit = "s" if workload == "serving" else "steps"
        per_run = duration_s if workload == "serving" else _replay_steps(data, tokens_per_rank * topology.num_gpus,
                                                                          iterations)
        with Progress("simulate run", total=per_run * len(candidates), unit=unit, quiet=quiet) as bar:
            runs = comparison.run_comparison(
                candidates, topology, model_spec, routing=data,
                routing_info=comparison.routing_identity(sources, data, model_spec, synthetic), workload=wl,
                config=config, level=level, output=output,
                progress=_run_ticker(bar, [c.label for c in candidates], per_run, unit))
        if output is not None:
            from placer.app.report import render_full_report  # deferred: plotly, only for -o
            render_full_report(output, f"{output}/report.html")
        if as_json:
            echo_json({r.label: r.summary for r in runs})
            return
        click.echo(f"{model_spec.name} on {topology.num_gpus} x {topology.name} ({topology.num_nodes} node(s)), "
                   f"{execution}, {kernel}, {workload}" + (f", {overlap} overlap" if overlap != "none" else ""))
        if routing is not None and routing.trace_note and data is routing.stats:
            click.echo(f"note: {routing.trace_note}")
        click.echo(comparison.comparison_table(runs))
        if overlap != "none":
            click.echo("all-to-all hidden under compute: " + ", ".join(
                f"{r.label} {r.summary['a2a_hidden_fraction']:.1%}" for r in runs
                if r.summary.get("a2a_hidden_fraction") is not None))
        if output is not None:
            click.echo(f"results in {output}/ (report: {output}/report.html)")


def _routing(inputs, model_name, placements, execution, methods):
    """(routing, model, sources, synthetic); refuses routing that lacks the top-1 experts ``execution``
    or ``methods`` need."""
    from placer.io.routing import (  # deferred: keeps numba off placer --help
        check_top1,
        gather_routing,
    )
    model = resolve_model(model_name)
    if not inputs:
        if model is None and not placements:
            raise InvalidInputError("give a routing input, --model PRESET (synthetic routing) or a --placement "
                                    "file", source="--model")
        return None, model, (), True
    routing = gather_routing(inputs, model=model)
    check_top1(routing, execution=execution, methods=methods)
    return routing, routing.model if model is None else model, tuple(routing.sources), routing.synthetic


def _maybe_topology(cluster, gpus, nodes, gpus_per_node, topology_file=None, gpu_speed=None):
    """The cluster of the flags, or None when no size is given (placement files then give it)."""
    if gpus is None and nodes is None and gpus_per_node is None and topology_file is None:
        if cluster is not None:
            if cluster.lower() not in CLUSTERS:
                raise InvalidInputError(f"unknown cluster preset {cluster!r}; known: {', '.join(CLUSTERS)}",
                                        source="--cluster")
        return None
    return resolve_topology(cluster, gpus, nodes, gpus_per_node, topology_file, gpu_speed)


@simulate.command(context_settings=CONTEXT)
@click.option("--cluster", default="h800", show_default=True,
              help="GPU kind preset; h800 is the hardware DeepEP's published tables were measured on.")
@click.option("--gpus", "ep", type=click.IntRange(min=1), required=True,
              help="Expert-parallel ranks, nodes of 8 (DeepEP's EP).")
@renamed_option("--ep", "--gpus")
@click.option("--tokens-per-rank", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens each rank dispatches (DeepEP's num_tokens).")
@click.option("--top-k", type=click.IntRange(min=1), default=8, show_default=True, help="Experts per token.")
@click.option("--hidden", type=click.IntRange(min=1), default=7168, show_default=True, help="Hidden size.")
@click.option("--experts", type=click.IntRange(min=1), default=256, show_default=True,
              help="Routed experts, contiguous over the ranks (must divide evenly).")
@click.option("--kernel", type=click.Choice(KERNEL_CHOICES), default="deepep-normal", show_default=True,
              help="All-to-all kernel model (docs/simulator.md).")
@click.option("--routing", default="uniform", show_default=True, metavar="uniform|group-limited|deepep|TRACE",
              help="Random routing, DeepSeek-style group-limited routing (--groups, --topk-groups), "
                   "DeepEP's test routing (uniform in one node, else the top min(nodes, 4) of one group "
                   "per node), or a routing file.")
@click.option("--groups", type=click.IntRange(min=1), default=8, show_default=True,
              help="Expert groups for --routing group-limited.")
@click.option("--topk-groups", type=click.IntRange(min=1), default=4, show_default=True,
              help="Groups each token may use, for --routing group-limited.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random routing.")
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def a2a(cluster, ep, tokens_per_rank, top_k, hidden, experts, kernel, routing, groups, topk_groups, seed, quiet,
        as_json):
    """One dispatch and one combine: the time of each kernel call (us), the bottleneck link's
    bandwidth, and the bandwidth in DeepEP's own byte count (deepep_*_gbps), so each row of
    DeepEP's published tables can be checked with one command (benchmarks/fidelity.md).

    \b
    Examples:
        placer simulate a2a --cluster h800 --gpus 16 --tokens-per-rank 4096 --kernel deepep-normal --routing deepep
        placer simulate a2a --cluster h800 --gpus 16 --tokens-per-rank 128 --experts 288 --kernel deepep-ll
        placer simulate a2a --cluster h100 --gpus 32 --tokens-per-rank 8192 --kernel deepep-v2 --json
    """
    from placer.simulator.a2a import a2a_benchmark  # deferred: keeps pandas off placer --help
    # One kernel call has no steps to count: a clock (large EP sizes take tens of seconds).
    with Progress("simulate a2a", ticker=True, quiet=quiet) as bar:
        bar.update(note=f"{kernel}, {ep} GPUs x {tokens_per_rank:,} tokens")
        out = a2a_benchmark(cluster=cluster, ep=ep, tokens_per_rank=tokens_per_rank, top_k=top_k, hidden=hidden,
                            experts=experts, kernel=kernel, routing=routing, groups=groups, topk_groups=topk_groups,
                            seed=seed)
    if as_json:
        echo_json(out)
        return
    click.echo(key_value_table(out))


@simulate.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("--gpus", "gpus_list", default=None, metavar="N,N,...", help="GPU counts to sweep.")
@click.option("--rates", default=None, metavar="R,R,...", help="Request rates to sweep (serving).")
@click.option("--placement", "placements", multiple=True, type=click.Path(), metavar="FILE",
              help="Placement files (only at their own GPU count).")
@click.option("--method", "methods", multiple=True, metavar="NAME", help="Solve with this method at every point.")
@click.option("--redundant", type=click.IntRange(min=0), default=0, show_default=True,
              help="Redundant expert slots of each --method placement (placement files carry their own).")
@model_option
@click.option("--cluster", default=None, metavar="PRESET", help="GPU kind (default h100).")
@workload_options
@engine_options
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Local processes (default: CPUs).")
@click.option("--ray-address", envvar="RAY_ADDRESS", default=None,
              help="Run the points as Ray tasks on this cluster (host:port, or auto; default RAY_ADDRESS when set; "
                   "the output directory must be one every node writes to).")
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True, help="Sweep directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the sweep table as JSON.")
@quiet_option
def sweep(inputs, gpus_list, rates, placements, methods, redundant, model, cluster, workload, rate, duration_s,
          prompt_len, output_len, length_dist, token_budget, max_running, iterations, tokens_per_rank, context_len,
          execution, kernel, congestion, overlap, dispatch, level, seed, workers, ray_address, output, as_json,
          quiet):
    """A grid over GPU counts and request rates, each point a full `simulate run` of every placement.

    \b
    Example:
        placer simulate sweep --model mixtral-8x7b --gpus 4,8 --rates 5,10 --method contiguous \\
            --method eplb --duration 10 -o sweep/
    """
    from placer.app.sweep import SweepSpec, run_sweep  # deferred: keeps pandas off placer --help
    from placer.io.atomic import output_directory  # deferred: keeps numba off placer --help

    # The output is checked before any work; on a failure or Ctrl-C nothing of this run is left.
    with output_directory(output):
        gpu_counts = _ints(gpus_list, "--gpus") or [None]
        rate_list = _floats(rates, "--rates") or [rate]
        wl, config = _workload_and_config(workload, rate_list[0], duration_s, prompt_len, output_len, length_dist,
                                          token_budget, max_running, iterations, tokens_per_rank, context_len,
                                          execution, kernel, congestion, overlap, dispatch, seed)
        spec = SweepSpec(inputs=tuple(inputs), placements=tuple(placements), methods=tuple(methods), redundant=redundant,
                         model=model, cluster=cluster, workload=wl, config=config, level=level)
        points = len(gpu_counts) * (len(rate_list) if workload == "serving" else 1)
        with Progress("simulate sweep", total=points, unit="points", quiet=quiet) as bar:
            table = run_sweep(spec, gpu_counts, rate_list, output=output, workers=workers, ray_address=ray_address,
                              progress=lambda done, total: bar.update(done, total=total))
        if as_json:
            echo_json(table.to_dict(orient="records"))
            return
        records = table.to_dict(orient="records")
        click.echo(display.table([[display.format_value(c, r[c]) for c in table.columns] for r in records],
                                 header=list(table.columns)))
        on_ray = f"; points ran on {table.attrs['ray_nodes']} Ray node(s)" if "ray_nodes" in table.attrs else ""
        click.echo(f"sweep in {output}/ (sweep.csv, one results directory per point, report.html){on_ray}")
