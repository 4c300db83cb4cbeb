"""The ``placer`` command line: parse, one library call with the same parameter names, write.

Bad input exits 2 with one line naming the input and the problem; unexpected errors exit 1.
Neither prints a traceback unless ``--debug`` is given. SIGINT exits 130 and SIGTERM 143, both
after removing temp files and stopping worker processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable

import click

from placer.errors import InfeasibleError, InvalidInputError, MissingDependencyError, PlacerError
from placer.types import DISPATCH_RULES, EXECUTION_MODES

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class FiniteFloat(click.FloatRange):
    """A float option that must be a finite number (click's FLOAT and FloatRange let NaN and inf through)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


# ---------------------------------------------------------------------------------------------
# Shared options: every command uses the same names for the same things.
# ---------------------------------------------------------------------------------------------

def model_option(func: Callable) -> Callable:
    from placer.presets import MODELS
    return click.option("--model", "model", metavar="PRESET",
                        help=f"Model preset ({', '.join(MODELS)}). Optional when an input names its model.")(func)


def cluster_options(func: Callable) -> Callable:
    from placer.presets import CLUSTERS, DEFAULT_CLUSTER
    for deco in reversed([
        click.option("--cluster", default=None, metavar="PRESET",
                     help=f"GPU kind ({', '.join(CLUSTERS)}; default {DEFAULT_CLUSTER}, nodes of 8)."),
        click.option("--gpus", type=int, default=None, help="Number of GPUs (EP ranks)."),
        click.option("--nodes", type=int, default=None, help="Number of nodes."),
        click.option("--gpus-per-node", type=int, default=None,
                     help="GPUs per node (any two of gpus, nodes, gpus-per-node give the third)."),
    ]):
        func = deco(func)
    return func


def stack_option(func: Callable) -> Callable:
    from placer.stacks import STACKS, stack_help
    return click.option("--stack", type=click.Choice(list(STACKS)), default=None, help=stack_help())(func)


def _stack(name: str | None):
    from placer.stacks import get_stack
    return None if name is None else get_stack(name)


def routing_options(func: Callable) -> Callable:
    for deco in reversed([
        click.option("--dispatch", type=click.Choice(DISPATCH_RULES), default=None,
                     help="Replica dispatch rule; overrides --stack's (default: the stack's, else nearest, "
                          "placer's idealised same GPU / same node / coordinated spread)."),
        click.option("--execution", type=click.Choice(EXECUTION_MODES), default="standard", show_default=True,
                     help="standard expert parallelism, or ExFlow's context-coherent execution."),
        click.option("--phase", type=click.Choice(["prefill", "decode", "all"]), default="all", show_default=True,
                     help="Use only tokens of this phase."),
    ]):
        func = deco(func)
    return func


def _model(name: str | None):
    from placer.presets import get_model
    return get_model(name) if name else None


def _topology(cluster, gpus, nodes, gpus_per_node):
    from placer.presets import DEFAULT_CLUSTER, make_topology
    return make_topology(cluster or DEFAULT_CLUSTER, gpus=gpus, nodes=nodes, gpus_per_node=gpus_per_node)


def _check_against_file(pf, path: str, model, cluster, gpus, nodes, gpus_per_node) -> None:
    """A placement file's model and topology are authoritative: a contradicting flag exits 2."""
    if model is not None and model != pf.model.name:
        raise InvalidInputError(f"--model {model} contradicts the placement's model {pf.model.name}", source=path)
    topo = pf.topology
    for flag, given, actual in (("--cluster", cluster, topo.name), ("--gpus", gpus, topo.num_gpus),
                                ("--nodes", nodes, topo.num_nodes), ("--gpus-per-node", gpus_per_node, topo.gpus_per_node)):
        if given is not None and given != actual:
            raise InvalidInputError(f"{flag} {given} contradicts the placement's cluster "
                                    f"({topo.name}, {topo.num_nodes} x {topo.gpus_per_node} GPUs)", source=path)


def _read_placement(path: str, model, cluster, gpus, nodes, gpus_per_node, stack=None):
    """Any placement file (placer's, SGLang's, vllm-ascend's, TRT-LLM's, EPLB arrays).

    A native file is authoritative (contradicting flags exit 2); a stack's file holds only the
    map and takes the model and cluster from the flags.
    """
    from placer.io.placements import detect_placement_format, read_placement_file
    if detect_placement_format(path) == "native":
        pf = read_placement_file(path)
        _check_against_file(pf, path, model, cluster, gpus, nodes, gpus_per_node)
        return pf
    topology = _topology(cluster, gpus, nodes, gpus_per_node) if (cluster or gpus) else None
    return read_placement_file(path, model=_model(model), topology=topology, stack=stack)


def _placement_stack(pf, target):
    """The stack whose rule scores ``pf``: ``--stack``, else a stack file's own (not a native file's)."""
    return target if target is not None or not pf.method.startswith("file:") else pf.stack


def _parse_exports(exports: tuple[str, ...], flag: str = "--export") -> list[tuple[str, str]]:
    from placer.io.placements import FORMATS
    out = []
    for item in exports:
        fmt, sep, path = item.partition("=")
        if not sep or not path:
            raise InvalidInputError(f"expected FORMAT=PATH, got {item!r}", source=flag)
        if fmt not in FORMATS:
            raise InvalidInputError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}", source=flag)
        out.append((fmt, path))
    return out


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

@click.group(context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="placer")
def cli(debug: bool) -> None:
    """placer: expert placement for Mixture-of-Experts serving.

    \b
    Example:
        placer synth --model mixtral-8x7b --tokens 20000 -o trace.npz
        placer stats trace.npz
        placer solve trace.npz --gpus 4 --method contiguous -o p.json --export sglang=s.json
        placer evaluate p.json trace.npz
    """


@cli.command(context_settings=CONTEXT)
@model_option
@click.option("--tokens", type=click.IntRange(min=1), required=True, help="Number of tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--perturb", type=FiniteFloat(min=0.0), default=0.0, show_default=True,
              help="Perturb the preset's expert popularity (lognormal sigma), for held-out scoring.")
@click.option("--phase", type=click.Choice(["prefill", "decode"]), default=None, help="Tag tokens with a phase.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Trace file (.npz or .parquet).")
def synth(model, tokens, seed, perturb, phase, output):
    """Write a deterministic synthetic routing trace for a model preset (labelled synthetic).

    \b
    Example:
        placer synth --model deepseek-v3 --tokens 100000 --seed 1 --perturb 0.3 -o trace.npz
    """
    from placer.workflow import write_synthetic
    spec = _model(model)
    if spec is None:
        raise InvalidInputError("synth needs --model PRESET", source="--model")
    written = write_synthetic(spec, tokens, seed=seed, perturb=perturb, phase=phase, output=output)
    click.echo(f"wrote {written:,} synthetic tokens of {spec.name} routing to {output}")


@cli.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@model_option
@click.option("--phase", type=click.Choice(["prefill", "decode", "all"]), default="all", show_default=True,
              help="Use only tokens of this phase.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the statistics (.npz).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def stats(inputs, model, phase, output, as_json):
    """Merge routing inputs of any supported format and print per-layer skew and affinity.

    \b
    Example:
        placer stats experts_coding_mixtral.json --model mixtral-8x7b -o stats.npz
    """
    from placer.profiling.summary import format_summary, summarize
    from placer.workflow import gather_routing, write_stats
    if output:  # before any work
        from placer.io.atomic import check_writable
        check_writable(output)
    routing = gather_routing(inputs, model=_model(model), phase=phase, keep_trace=False)
    summary = summarize(routing.stats)
    summary["synthetic"] = routing.synthetic
    summary["top1_known"] = routing.stats.has_top1
    summary["top1_note"] = routing.top1_note
    if output:
        write_stats(routing, output)
    if as_json:
        _echo_json(summary)
    else:
        label = " (synthetic)" if routing.synthetic else ""
        click.echo(f"{routing.model.name}{label}: " + format_summary(summary))
        if output:
            click.echo(f"wrote statistics to {output}")


def _parse_weights(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in ("balance", "traffic", "affinity"):
            raise InvalidInputError(f"expected balance=X,traffic=Y,affinity=Z, got {item!r}", source="--weights")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise InvalidInputError(f"{value!r} is not a number", source="--weights") from None
        if not 0 <= out[key.strip()] < math.inf:
            raise InvalidInputError(f"weights must be non-negative finite numbers, got {value}", source="--weights")
    return out


@cli.command(context_settings=CONTEXT)
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
@click.option("--ray-address", default=None, help="Run layer subproblems on this Ray cluster (e.g. auto).")
@click.option("--holdout", multiple=True, type=click.Path(), metavar="TRACE",
              help="Score on these inputs too (not used for fitting). Repeatable.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Placement JSON to write.")
@click.option("--export", "exports", multiple=True, metavar="FMT=PATH",
              help="Also write a serving-stack file (sglang, vllm, vllm-ascend, trtllm, eplb). Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the result and comparison as JSON.")
@click.option("--quiet", is_flag=True, help="No progress lines (shown only on a terminal).")
def solve(inputs, model, cluster, gpus, nodes, gpus_per_node, dispatch, execution, phase, stack, redundant, groups,
          method, objective, weights, backend, time_limit_s, num_workers, ray_address, holdout, seed, output,
          exports, as_json, quiet):
    """Compute an expert-to-GPU placement, compare it with contiguous and EPLB, and write it.

    \b
    Example:
        placer solve trace.npz --stack sglang --gpus 16 --nodes 2 --redundant 16 \\
            --holdout held.npz -o p.json --export sglang=s.json
    """
    from placer._clock import process_start_time
    from placer.metrics import format_comparison
    from placer.workflow import solve_placement

    show = not quiet and not as_json and sys.stderr.isatty()

    def progress(message: str) -> None:
        if show:
            click.echo(f"... {message}", err=True)

    outcome = solve_placement(
        inputs, model=_model(model), topology=_topology(cluster, gpus, nodes, gpus_per_node),
        dispatch=dispatch, stack=_stack(stack), execution=execution, phase=phase, redundant=redundant, groups=groups,
        method=method, seed=seed, time_limit_s=time_limit_s, objective=objective, weights=_parse_weights(weights),
        backend=backend, ray_address=ray_address, num_workers=num_workers, holdout=holdout, output=output,
        exports=_parse_exports(exports), progress=progress, started_at=process_start_time())
    r = outcome.result
    if as_json:
        _echo_json({"method": r.method, "status": r.status, "objective": r.objective, "terms": r.terms,
                    "bound": r.bound, "gap": r.gap, "solve_seconds": r.wall_time_s, "output": output,
                    "comparison": [{k: v for k, v in row.items()} for row in outcome.rows],
                    "notes": list(outcome.notes)})
        return
    gap = "" if r.gap is None else f", gap {r.gap:.2%}"
    target = f"for {outcome.stack.label}, " if outcome.stack is not None else ""
    click.echo(f"{r.method}: status {r.status}{gap}, {r.wall_time_s:.2f} s; {target}dispatch {outcome.dispatch}; "
               f"wrote {output}")
    if outcome.rows:
        click.echo(format_comparison(outcome.rows))
    for note in outcome.notes:
        click.echo(note)
    for fmt, path, flags in outcome.exported:
        click.echo(f"exported {fmt} to {path}; serve with:")
        for line in flags:
            click.echo(f"  {line}")


@cli.command(context_settings=CONTEXT)
@click.argument("placement", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@model_option
@cluster_options
@routing_options
@stack_option
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(placement, inputs, model, cluster, gpus, nodes, gpus_per_node, dispatch, execution, phase, stack,
             as_json):
    """Score a placement on any routing input: load balance, dispatch traffic, transitions.

    PLACEMENT is placer's JSON or the file a server loads (SGLang .json/.pt, vllm-ascend .json,
    TRT-LLM .yaml, EPLB .npz; those need --model and --gpus). The rule is --dispatch, else
    --stack's, else the stack file's, else the one the file was solved under.

    \b
    Example:
        placer evaluate p.json experts_math_mixtral.json --stack vllm
        placer evaluate sglang.json trace.npz --model deepseek-v2-lite --gpus 16 --nodes 2
    """
    from placer.metrics import format_table
    from placer.workflow import evaluate_placement
    target = _stack(stack)
    pf = _read_placement(placement, model, cluster, gpus, nodes, gpus_per_node, target)
    from placer.stacks import resolve_dispatch
    target = _placement_stack(pf, target)
    rule = resolve_dispatch(dispatch, target, pf.model, fallback=pf.dispatch, source=placement)
    metrics = evaluate_placement(pf, inputs, dispatch=rule, execution=execution, phase=phase)
    metrics["stack"] = None if target is None else target.label
    if as_json:
        _echo_json(metrics)
    else:
        click.echo(f"dispatch {rule}" + (f" ({target.label})" if target is not None else ""))
        click.echo(format_table(metrics))


@cli.command(context_settings=CONTEXT)
@click.argument("placement", type=click.Path())
@model_option
@cluster_options
@stack_option
@click.option("--format", "fmt", default=None,
              help="sglang, vllm-ascend, trtllm or eplb (default: --stack's, else the file's stack's).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="File to write (SGLang: .json or .pt).")
def export(placement, model, cluster, gpus, nodes, gpus_per_node, stack, fmt, output):
    """Convert a placement into the file a serving stack loads, and print its flags.

    PLACEMENT is placer's JSON or another stack's file (then give --model and --gpus). A
    placement solved for another stack's rule (or for none) is re-checked against the target's
    constraints, and the command says how to re-score it under the target's rule.

    \b
    Example:
        placer export p.json --stack sglang -o sglang.json
        placer export sglang.json --model deepseek-v2-lite --gpus 16 --stack trtllm -o lb.yaml
    """
    from placer.io.placements import export_placement
    from placer.stacks import STACKS
    pf = _read_placement(placement, model, cluster, gpus, nodes, gpus_per_node)
    target = _stack(stack) or (STACKS.get(fmt) if fmt else pf.stack)
    if fmt is None and target is not None:
        # A stack that loads no file (vLLM) exports under its own name, which export_placement
        # refuses with the flags of the stack's own balancer (main() prints them).
        fmt = target.format or target.name
    if fmt is None:
        raise InvalidInputError("give --stack or --format: the placement names no serving stack", source=placement)
    (fmt, output), = _parse_exports((f"{fmt}={output}",), "--format" if stack is None else "--stack")
    flags = export_placement(pf.placement, fmt, output, model=pf.model, topology=pf.topology)
    click.echo(f"exported {fmt} to {output}" + (f" for {target.label}" if target is not None else "")
               + "; serve with:")
    for line in flags:
        click.echo(f"  {line}")
    if target is not None and target.dispatch is not None and target.dispatch != pf.dispatch:
        click.echo(f"note: {placement} was solved and scored under dispatch {pf.dispatch}; {target.label} runs "
                   f"{target.dispatch}: re-score with 'placer evaluate {placement} TRACE --stack {target.name}' "
                   f"or re-solve with --stack {target.name}")


from placer._cli_apply import apply as _apply  # noqa: E402
from placer._cli_demo import demo as _demo  # noqa: E402
from placer._cli_profile import profile as _profile  # noqa: E402
from placer._cli_report import report as _report  # noqa: E402
from placer._cli_serve import serve as _serve  # noqa: E402
from placer._cli_simulate import simulate as _simulate  # noqa: E402

cli.add_command(_apply)
cli.add_command(_demo)
cli.add_command(_profile)
cli.add_command(_report)
cli.add_command(_simulate)
cli.add_command(_serve)

# ---------------------------------------------------------------------------------------------
# Entry point: error triage
# ---------------------------------------------------------------------------------------------

_NUMBA_SERIALIZE = os.path.join("numba", "core", "serialize.py")
_NUMBA_PACKAGE = os.sep + "numba" + os.sep


def _signal_exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)


def _after_numba(frame):
    """The frame that called a numba kernel when ``frame`` runs in the Python helper the
    kernel calls to box its result or build an exception (``numba.core.serialize``); else None."""
    inside = False
    while frame is not None and _NUMBA_PACKAGE in frame.f_code.co_filename:
        inside = inside or frame.f_code.co_filename.endswith(_NUMBA_SERIALIZE)
        frame = frame.f_back
    return frame if inside else None


@contextlib.contextmanager
def _interrupts_as_exceptions():
    """SIGINT raises ``KeyboardInterrupt`` and SIGTERM ``SystemExit(143)`` (in the main thread),
    so that both unwind alike: temp files are removed and worker processes stopped. The previous
    handlers come back after.

    Neither is raised inside the Python helper a numba kernel calls while it boxes its result:
    an exception there crashes the process (SIGSEGV; numba 0.68). It is raised instead at the
    next line of the code that called the kernel, through a one-shot trace function (or, when
    a tracer such as coverage is active, by sending the signal again 5 ms later).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        caller = _after_numba(frame)
        if caller is None:
            raise _signal_exception(signum)
        if sys.gettrace() is not None:  # another tracer: do not replace it
            retry = threading.Timer(0.005, os.kill, (os.getpid(), signum))
            retry.daemon = True
            retry.start()
            return

        def at_next_line(traced, event, arg):
            sys.settrace(None)
            caller.f_trace = None
            raise _signal_exception(signum)

        caller.f_trace = at_next_line
        sys.settrace(lambda *args: None)  # turns tracing on; new frames stay untraced

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input exits 2 with one line, unexpected errors exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        with _interrupts_as_exceptions():
            cli.main(args=args, prog_name="placer", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt) or isinstance(exc.__cause__, KeyboardInterrupt):
            click.echo("placer: interrupted", err=True)  # temp files removed, workers stopped
            return 130
        click.echo("placer: aborted", err=True)
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        no_args = getattr(click.exceptions, "NoArgsIsHelpError", ())
        if no_args and isinstance(exc, no_args):
            exc.show()  # a bare group: its help
        else:
            click.echo(f"placer: error: {_one_line_text(exc.format_message())}", err=True)
        return exc.exit_code
    except (InvalidInputError, InfeasibleError, MissingDependencyError) as exc:
        if debug:
            traceback.print_exc()
        for line in getattr(exc, "flags", ()):  # e.g. vLLM's own EPLB flags when it loads no file
            click.echo(f"  {line}")
        click.echo(f"placer: error: {_one_line(exc)}", err=True)
        return 2
    except (PlacerError, Exception) as exc:  # unexpected: a bug, or the environment
        if debug:
            traceback.print_exc()
        click.echo(f"placer: unexpected error: {type(exc).__name__}: {_one_line(exc)} "
                   "(rerun with --debug for the traceback)", err=True)
        return 1
    return 0


def _one_line_text(text: str) -> str:
    return " ".join(text.split())


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())

