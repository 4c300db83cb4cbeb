"""``placer report``: parse, one library call (:func:`placer.app.report.render_full_report`), print."""

from __future__ import annotations

import os

import click

from placer._progress import reporting
from placer.cli.options import CONTEXT, echo_json
from placer.cli.progress import Progress, quiet_option


@click.command(context_settings=CONTEXT)
@click.argument("results_dir", type=click.Path())
@click.option("--placement", "placements", multiple=True, type=click.Path(), metavar="FILE",
              help="A native placement JSON (placer solve -o) to add (repeatable). Placement JSONs "
                   "in RESULTS_DIR and the files the simulation ran on are added by themselves.")
@click.option("--routing", "routing_inputs", multiple=True, type=click.Path(), metavar="TRACE",
              help="Routing input (any format placer reads; repeatable) on which placement files "
                   "get their per-GPU load.")
@click.option("--no-scan", is_flag=True,
              help="Do not pick up placement JSONs from RESULTS_DIR or the simulation's inputs.")
@click.option("--title", default=None, help="Page title.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="HTML file to write (default: RESULTS_DIR/report.html).")
@quiet_option
@click.option("--json", "as_json", is_flag=True,
              help="Print the file written, the simulated placements, the placement files and the plot count as JSON.")
def report(results_dir, placements, routing_inputs, no_scan, title, output, quiet, as_json):
    """One self-contained HTML report (opens offline) of simulator results and placement files.

    RESULTS_DIR is a `placer simulate run -o` directory or a `placer simulate sweep -o`
    directory. The page holds latency CDFs, per-layer phase times, per-GPU load heatmaps and
    bars, link traffic matrices, a heatmap of each placement (MoE layer x slot: expert) and a
    table of methods with every metric.

    \b
    Example:
        placer simulate run trace.npz --placement p.json --method contiguous -o sim/
        placer solve trace.npz --gpus 4 --method eplb -o sim/eplb.json
        placer report sim/ -o report.html
        placer report sim/ --placement other.json --routing trace.npz -o report.html --json
    """
    from placer.app.report import render_full_report  # deferred: keeps pandas off placer --help

    if output is None:
        output = os.path.join(results_dir, "report.html")
    # A clock while the page is drawn (no callbacks there), the tokens read when --routing is given.
    with Progress("report", ticker=True, quiet=quiet) as bar, reporting(bar.report):
        bar.update(note="rendering")
        info = render_full_report(results_dir, output, placements=placements,
                                  routing_inputs=routing_inputs, scan=not no_scan, title=title)
    if as_json:
        echo_json({"output": str(info.output), "simulated": list(info.sim_labels),
                   "placements": [{"label": e.label, "path": str(e.path), "simulated_as": e.sim_label}
                                  for e in info.placements],
                   "plots": len(info.plot_ids)})
        return
    click.echo(f"wrote {info.output}: {len(info.sim_labels)} simulated placement(s), "
               f"{len(info.placements)} placement file(s), {len(info.plot_ids)} plots")
