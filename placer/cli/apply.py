"""The ``placer apply`` command (registered in :mod:`placer.cli`)."""

from __future__ import annotations

import statistics

import click

from placer.cli.options import CONTEXT, FiniteFloat, echo_json, renamed_option
from placer.cli.progress import Progress, quiet_option
from placer.display import format_value, table
from placer.errors import InvalidInputError
from placer.presets import get_model, make_topology


@click.command(context_settings=CONTEXT)
@click.option("--placement", "placement_path", required=True, type=click.Path(dir_okay=False),
              help="The placement to apply: placer's JSON (e.g. from placer solve) or a serving stack's file "
                   "(SGLang .json/.pt, vllm-ascend .json, TRT-LLM .yaml, EPLB .npz; shaped by --model).")
@click.option("--from", "from_path", default=None, type=click.Path(dir_okay=False),
              help="The placement the deployment starts on, in any of those formats (same model and cluster); "
                   "default: experts in order, redundant slots round-robin.")
@click.option("--deployment", type=click.Choice(["local"]), default="local", show_default=True,
              help="Where to deploy: Ray actors on this machine (or on --ray-address).")
@click.option("--gpus", "ranks", type=click.IntRange(min=1), default=4, show_default=True,
              help="GPUs (EP ranks, one Ray actor each); must equal the placement's GPU count.")
@renamed_option("--ranks", "--gpus")
@click.option("--model", default=None, metavar="embedded|PRESET",
              help="Expert sizes (hidden, FFN): 'embedded' (default: placer's embedded model) or a preset "
                   "with the placement's layer and expert counts.")
@click.option("--tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Tokens per batch.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Batches served before the migration (and as many after it).")
@click.option("--max-experts-per-round", type=click.IntRange(min=1), default=1, show_default=True,
              help="Chunk size: experts one pair of ranks exchanges per round (one round per step).")
@click.option("--timeout", "timeout_s", type=FiniteFloat(min=0.5), default=5.0, show_default=True,
              help="Process-group timeout in seconds (how fast a dead rank is noticed).")
@click.option("--ray-address", default=None, help="Ray cluster to join (host:port; default RAY_ADDRESS, else a new local instance of this run's own).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights and the batches.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the placement that runs afterwards (the relabelled target) to this file.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the deployment, the plan, each layer's move, the serving times and the checks as JSON.")
@quiet_option
def apply(placement_path, from_path, deployment, ranks, model, tokens, warmup, max_experts_per_round,
          timeout_s, ray_address, seed, output, as_json, quiet):
    """Apply a placement live to a running deployment, verifying every output on the way.

    Starts one Ray actor per rank holding real SwiGLU expert weights, serves batches, plans the move
    (fewest bytes; rounds where each rank talks to one peer), transfers experts in chunks while
    serving, switches each layer at a step boundary after checksumming what it received, and
    compares every output with a single-process reference forward.

    \b
    Example:
        placer solve stats.npz --gpus 4 --redundant 4 -o new.json
        placer apply --placement new.json --deployment local --gpus 4
        placer apply --placement new.json --from old.json --gpus 4 --model embedded --json
    """
    from placer.io.atomic import check_writable  # deferred: keeps numba off placer --help
    from placer.io.placements import (  # deferred: keeps numba off placer --help
        detect_placement_format,
        read_placement_file,
        write_placement_json,
    )
    from placer.runtime.apply import (  # deferred: the runtime needs torch and ray (optional extras)
        apply_live,
        contiguous_placement,
        embedded_model,
        resolve_model,
    )

    if output:  # before the deployment starts and the migration runs
        check_writable(output)
    if detect_placement_format(placement_path) == "native":
        new_f = read_placement_file(placement_path)
    else:  # a stack's file holds only the map: --model gives its shape, --gpus the GPUs
        shape = embedded_model() if model in (None, "embedded") else get_model(model)
        new_f = read_placement_file(placement_path, model=shape, topology=make_topology(gpus=ranks))
    if from_path is not None:
        old_f = read_placement_file(from_path, model=new_f.model, topology=new_f.topology)
        for what in ("model", "topology"):
            if getattr(old_f, what) != getattr(new_f, what):
                raise InvalidInputError(f"the placements are for different {what}s", source="--from")
        old = old_f.placement
        if old.slots_per_gpu != new_f.placement.slots_per_gpu:
            raise InvalidInputError("the placements have different slots per GPU", source="--from")
    else:
        old = contiguous_placement(new_f.placement)
    spec, note = resolve_model(new_f.model, model)
    with Progress("apply", unit="rounds", quiet=quiet) as bar:  # the migration's rounds once planned
        outcome = apply_live(new_f.placement, old, spec, new_f.topology, dispatch=new_f.dispatch, ranks=ranks,
                             tokens=tokens, warmup=warmup, after=warmup, seed=seed, timeout_s=timeout_s,
                             max_experts_per_round=max_experts_per_round, ray_address=ray_address,
                             progress=lambda message: bar.update(note=message),
                             on_round=lambda done, total: bar.update(done, total=total))
    if output:
        write_placement_json(output, outcome.final, model=new_f.model, topology=new_f.topology,
                             dispatch=new_f.dispatch, method=new_f.method, status=new_f.status,
                             solve_seconds=new_f.solve_seconds, metrics=new_f.metrics)
    if as_json:
        echo_json({**summary(outcome, note, ranks), "output": output})
    else:
        _print(outcome, note, ranks)
        if output:
            click.echo(f"wrote the placement now running to {output}")
    if outcome.verified != outcome.batches or outcome.weight_mismatches:
        raise click.ClickException(f"{outcome.batches - outcome.verified} of {outcome.batches} outputs differ "
                                   f"from the reference; {len(outcome.weight_mismatches)} slots hold wrong weights")


def _where(rank_nodes: list[str]) -> str:
    """'on 2 Ray nodes (ranks 0-1 on 5f3a..., ranks 2-3 on 9c1e...)', or 'on 1 Ray node'."""
    groups: dict[str, list[int]] = {}
    for rank, node in enumerate(rank_nodes):
        groups.setdefault(node, []).append(rank)
    if len(groups) <= 1:
        return "on 1 Ray node"
    parts = [f"rank{'s' if len(rs) > 1 else ''} {_span(rs)} on {node[:8]}" for node, rs in groups.items()]
    return f"on {len(groups)} Ray nodes ({', '.join(parts)})"


def _span(ranks: list[int]) -> str:
    contiguous = ranks == list(range(ranks[0], ranks[-1] + 1))
    return f"{ranks[0]}-{ranks[-1]}" if contiguous and len(ranks) > 1 else ",".join(map(str, ranks))


def summary(o, note: str, ranks: int) -> dict:
    """What ``apply`` prints, as one JSON-ready dict (bytes, seconds; ``ok``: every check passed)."""
    p, r = o.plan, o.report
    nbytes = p.layer_bytes()
    steps = list(r.step_s)
    return {
        "deployment": {"ranks": ranks, "backend": "nccl" if o.device == "cuda" else "gloo", "device": o.device,
                       "start_s": float(o.start_s), "rank_nodes": list(o.rank_nodes),
                       "final_rank_nodes": list(o.final_rank_nodes)},
        "model": {"note": note, "moe_layers": o.model.num_moe_layers, "experts": o.model.num_experts,
                  "top_k": o.model.top_k, "hidden": o.model.hidden_size, "expert_ffn": o.model.expert_ffn_size,
                  "expert_bytes": int(o.model.expert_weight_bytes), "slots_per_layer": p.new.num_slots},
        "plan": {**{k: float(v) for k, v in p.summary().items()}, "transfers": len(p.transfers),
                 "rounds": p.num_rounds, "local_copies": len(p.local_copies), "staging_bytes": int(p.staging_bytes)},
        "layers": [{"layer": layer, "transfers": int((p.transfers.layer == layer).sum()),
                    "bytes": float(nbytes[layer]), "commit_step": int(r.commit_step[layer]),
                    "pause_s": float(r.pause_s[layer])} for layer in range(p.new.num_layers)],
        "served": {"batches": o.batches, "before": len(o.before_s), "during": r.batches, "after": len(o.after_s),
                   "step_median_before_s": statistics.median(o.before_s) if o.before_s else None,
                   "step_median_during_s": statistics.median(steps) if steps else None,
                   "step_max_during_s": max(steps, default=None)},
        "recoveries": len(r.recoveries),
        "verified": int(o.verified), "max_abs_err": float(o.max_abs_err), "weight_mismatches": len(o.weight_mismatches),
        "ok": o.verified == o.batches and not o.weight_mismatches,
    }


def _print(o, note: str, ranks: int) -> None:
    m, p, r = o.model, o.plan, o.report

    def b(n):
        return format_value("bytes", n)

    def t(seconds):
        return format_value("s", seconds)
    backend = "NCCL on GPU" if o.device == "cuda" else "gloo on CPU"
    click.echo(f"deployment: {ranks} ranks (Ray actors, {backend}) {_where(o.rank_nodes)}, started in {t(o.start_s)}; "
               f"model {note}: {m.num_moe_layers} MoE layers x {m.num_experts} experts, top-{m.top_k}, hidden "
               f"{m.hidden_size}, expert FFN {m.expert_ffn_size}, float32 ({b(m.expert_weight_bytes)} "
               f"per expert), {p.new.num_slots} slots per layer")
    s = p.summary()
    click.echo(f"plan: {b(s['bytes_moved'])} sent vs {b(s['naive_bytes'])} naive (saving "
               f"{format_value('share', s['saving'])}), {len(p.transfers)} transfers in {p.num_rounds} rounds (one round per step, "
               f"each rank with one peer), {len(p.local_copies)} local copies; staging "
               f"{b(p.staging_bytes)} per rank")
    nbytes = p.layer_bytes()
    click.echo(table([[str(layer), format_value("transfers", int((p.transfers.layer == layer).sum())),
                       format_value("bytes", nbytes[layer]), str(int(r.commit_step[layer])),
                       format_value("pause_s", r.pause_s[layer])] for layer in range(p.new.num_layers)],
                     header=["layer", "transfers", "sent", "commit step", "pause"], align="rrrrr"))
    steps = [t for t in r.step_s]
    med = statistics.median(steps) if steps else 0.0
    base = statistics.median(o.before_s) if o.before_s else float("nan")
    click.echo(f"served {o.batches} batches ({len(o.before_s)} before, {r.batches} during, {len(o.after_s)} after "
               f"the migration); step median {t(base)} before, {t(med)} during (max "
               f"{t(max(steps, default=0))}); {len(r.recoveries)} recoveries")
    if o.final_rank_nodes != o.rank_nodes:
        click.echo(f"ranks restarted elsewhere: now {_where(o.final_rank_nodes)}")
    ok = o.verified == o.batches and not o.weight_mismatches
    click.echo(f"outputs verified against the single-process reference: {o.verified}/{o.batches} batches match "
               f"(max abs err {o.max_abs_err:.1e}); weights: every slot's checksum "
               f"{'matches' if not o.weight_mismatches else 'does NOT match'} the authoritative copy"
               + ("" if ok else " -- FAILED"))
