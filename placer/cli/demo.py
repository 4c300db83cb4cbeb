"""``placer demo``: the whole pipeline on the embedded default, in one command."""

from __future__ import annotations

import click

from placer.cli.options import CONTEXT, echo_json
from placer.cli.progress import Progress, quiet_option
from placer.display import format_value, table


@click.command(context_settings=CONTEXT)
@click.option("-o", "--output", type=click.Path(file_okay=False), default="demo-out", show_default=True,
              help="Directory for everything the demo writes.")
@click.option("--synthetic", is_flag=True, help="Use a synthetic Mixtral trace instead of profiling the embedded model.")
@click.option("--max-prompts", type=click.IntRange(min=2), default=96, show_default=True,
              help="Held-out prompts to profile (half to fit, half held out).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the methods table, the best method and the files written as JSON (instead of the "
                   "stage lines and the table).")
@quiet_option
def demo(output, synthetic, max_prompts, as_json, quiet):
    """Profile the embedded model, solve with every method, evaluate on held-out routing,
    simulate, export for SGLang and write one HTML report.

    \b
    Example:
        placer demo -o demo-out
        placer demo --synthetic -o demo-out --json
    """
    from placer.app.demo import run_demo  # deferred: keeps ortools, pandas off placer --help

    notes = []  # the stage lines, kept for --json
    with Progress("demo", unit="stages", quiet=quiet) as bar:
        out = run_demo(output, synthetic=synthetic, max_prompts=max_prompts,
                       progress=notes.append if as_json else click.echo,
                       on_stage=lambda done, total, name: bar.update(done, total=total, note=name))
    if as_json:
        echo_json({"output": out.output, "routing": out.routing, "methods": out.rows, "best": out.best,
                   "report": out.report, "sglang": out.sglang, "sglang_note": out.sglang_note,
                   "sglang_flags": [f for f in out.sglang_flags if not f.startswith("#")],
                   "stages": notes, "seconds": out.seconds})
        return
    cols = ["method", "status", "solve_s", "holdout_load_max_mean", "holdout_other_ranks",
            "holdout_cc_cross_gpu", "sim_step_p50_ms", "sim_a2a_p99_us"]
    click.echo(table([[format_value(c, r[c]) for c in cols] for r in out.rows], header=cols))
    click.echo(f"routing: {out.routing}; held-out metrics and simulation on the held-out half")
    click.echo(f"best (simulated p50 step time): {out.best}")
    click.echo(f"report: {out.report}")
    click.echo(f"SGLang placement: {out.sglang} ({out.sglang_note}); serve with: "
               + " ".join(f for f in out.sglang_flags if not f.startswith("#")))
    click.echo(f"done in {format_value('seconds', out.seconds)}")
