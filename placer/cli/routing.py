"""``placer synth`` and ``placer stats``: synthetic routing and routing statistics."""

from __future__ import annotations

import click

from placer._progress import reporting
from placer.cli.options import (
    CONTEXT,
    FiniteFloat,
    echo_json,
    model_option,
    resolve_model,
)
from placer.cli.progress import Progress, quiet_option
from placer.errors import InvalidInputError
from placer.profiling.summary import format_summary


@click.command(context_settings=CONTEXT)
@model_option
@click.option("--tokens", type=click.IntRange(min=1), required=True, help="Number of tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--perturb", type=FiniteFloat(min=0.0), default=0.0, show_default=True,
              help="Perturb the preset's expert popularity (lognormal sigma), for held-out scoring.")
@click.option("--phase", type=click.Choice(["prefill", "decode"]), default=None, help="Tag tokens with a phase.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Trace file (.npz or .parquet).")
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the tokens, model and file written as JSON.")
def synth(model, tokens, seed, perturb, phase, output, quiet, as_json):
    """Write a deterministic synthetic routing trace for a model preset (labelled synthetic).

    \b
    Example:
        placer synth --model deepseek-v3 --tokens 100000 --seed 1 --perturb 0.3 -o trace.npz
        placer synth --model deepseek-v3 --tokens 5000000 -o big.npz --json
    """
    from placer.app.workflow import write_synthetic  # deferred: keeps numba off placer --help
    spec = resolve_model(model)
    if spec is None:
        raise InvalidInputError("synth needs --model PRESET", source="--model")
    with Progress("synth", total=tokens, unit="tokens", quiet=quiet) as bar:
        written = write_synthetic(spec, tokens, seed=seed, perturb=perturb, phase=phase, output=output,
                                  progress=lambda n: bar.update(n))
    if as_json:
        echo_json({"tokens": written, "model": spec.name, "output": output, "seed": seed, "perturb": perturb,
                   "phase": phase, "synthetic": True})
        return
    click.echo(f"wrote {written:,} synthetic tokens of {spec.name} routing to {output}")


@click.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@model_option
@click.option("--phase", type=click.Choice(["prefill", "decode", "all"]), default="all", show_default=True,
              help="Use only tokens of this phase.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the statistics (.npz).")
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def stats(inputs, model, phase, output, quiet, as_json):
    """Merge routing inputs of any supported format and print per-layer skew and affinity.

    \b
    Example:
        placer stats experts_coding_mixtral.json --model mixtral-8x7b -o stats.npz
    """
    from placer.app.workflow import summarize_routing  # deferred: keeps numba off placer --help
    with Progress("stats", unit="tokens", quiet=quiet) as bar, reporting(bar.report):
        routing, summary = summarize_routing(inputs, model=resolve_model(model), phase=phase, output=output)
    if as_json:
        echo_json(summary)
    else:
        label = " (synthetic)" if routing.synthetic else ""
        # A load matrix without --model: its shape is all placer knows (top-k counted as 1).
        counts_only = routing.stream is None and model is None and routing.model.name == "custom"
        click.echo(f"{routing.model.name}{label}: " + format_summary(summary, counts_only=counts_only))
        if output:
            click.echo(f"wrote statistics to {output}")
