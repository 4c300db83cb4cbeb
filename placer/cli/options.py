"""Options and helpers shared by the ``placer`` subcommands: presets, cluster size, stack,
placement files, exports, JSON output."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable

import click

from placer.display import json_text
from placer.errors import InvalidInputError
from placer.presets import CLUSTERS, DEFAULT_CLUSTER, MODELS, get_model, make_topology
from placer.stacks import STACKS, get_stack, stack_help
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

def renamed_option(old: str, new: str) -> Callable[[Callable], Callable]:
    """A hidden ``old`` spelling of an option that exits 2 with one line naming ``new``."""
    def refuse(ctx: click.Context, param: click.Parameter, value: object) -> None:
        if value is not None:
            raise click.UsageError(f"{old} is now {new}")

    name = "renamed_" + old.lstrip("-").replace("-", "_")  # not the new option's parameter name
    return click.option(old, name, hidden=True, expose_value=False, callback=refuse, metavar="N",
                        help=f"Renamed {new}.")


def model_option(func: Callable) -> Callable:
    return click.option("--model", "model", metavar="PRESET",
                        help=f"Model preset ({', '.join(MODELS)}). Optional when an input names its model.")(func)


def cluster_options(func: Callable) -> Callable:
    for deco in reversed([
        click.option("--cluster", default=None, metavar="PRESET",
                     help=f"GPU kind ({', '.join(CLUSTERS)}; default {DEFAULT_CLUSTER}, nodes of 8)."),
        click.option("--gpus", type=int, default=None, help="Number of GPUs (EP ranks)."),
        click.option("--nodes", type=int, default=None, help="Number of nodes."),
        click.option("--gpus-per-node", type=int, default=None,
                     help="GPUs per node (any two of gpus, nodes, gpus-per-node give the third)."),
        click.option("--topology", "topology_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="GB/s between every two ranks, a G x G matrix (CSV rows or JSON; diagonal ignored): "
                          "transfers are costed by their pair's bandwidth, NVLink domains found from it; "
                          "--cluster gives the GPU."),
        click.option("--gpu-speed", "gpu_speed", default=None, metavar="FILE|RANKS=F",
                     help="Throughput of each GPU relative to --cluster's (load balance becomes time): a file "
                          "of one factor per rank (CSV or JSON list), or e.g. 3=0.5 (rank 3 at half speed), "
                          "0-7=0.8,12=0.5."),
    ]):
        func = deco(func)
    return func


def stack_option(func: Callable) -> Callable:
    return click.option("--stack", type=click.Choice(list(STACKS)), default=None, help=stack_help())(func)


def resolve_stack(name: str | None):
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


def resolve_model(name: str | None):
    return get_model(name) if name else None


def resolve_topology(cluster, gpus, nodes, gpus_per_node, topology_file=None, gpu_speed=None):
    if topology_file is not None:
        from placer.io.topology import read_topology  # deferred: keeps numpy off placer --help
        topo = read_topology(topology_file, cluster=cluster or DEFAULT_CLUSTER, gpus=gpus, nodes=nodes,
                             gpus_per_node=gpus_per_node)
    else:
        topo = make_topology(cluster or DEFAULT_CLUSTER, gpus=gpus, nodes=nodes, gpus_per_node=gpus_per_node)
    return with_speed(topo, gpu_speed)


def with_speed(topology, gpu_speed):
    """``topology`` with the speeds of ``--gpu-speed`` (unchanged when None)."""
    if gpu_speed is None:
        return topology
    from placer.io.topology import read_gpu_speed  # deferred: keeps numpy off placer --help
    return dataclasses.replace(topology, gpu_speed=read_gpu_speed(gpu_speed, topology.num_gpus))


def check_against_file(pf, path: str, model, cluster, gpus, nodes, gpus_per_node) -> None:
    """A placement file's model and topology are authoritative: a contradicting flag exits 2."""
    if model is not None and model != pf.model.name:
        raise InvalidInputError(f"--model {model} contradicts the placement's model {pf.model.name}", source=path)
    topo = pf.topology
    for flag, given, actual in (("--cluster", cluster, topo.gpu_preset), ("--gpus", gpus, topo.num_gpus),
                                ("--nodes", nodes, topo.num_nodes), ("--gpus-per-node", gpus_per_node, topo.gpus_per_node)):
        if given is not None and given != actual:
            raise InvalidInputError(f"{flag} {given} contradicts the placement's cluster "
                                    f"({topo.name}, {topo.num_nodes} x {topo.gpus_per_node} GPUs)", source=path)


def read_placement(path: str, model, cluster, gpus, nodes, gpus_per_node, stack=None, topology_file=None,
                   gpu_speed=None):
    """Any placement file (placer's, SGLang's, vllm-ascend's, TRT-LLM's, EPLB arrays).

    A native file is authoritative (contradicting flags exit 2) but for ``--topology FILE``, which
    re-costs its cluster's links (the sizes must agree), and ``--gpu-speed``; a stack's file holds only the map and
    takes the model and cluster from the flags.
    """
    from placer.io.placements import (  # deferred: keeps numba off placer --help
        detect_placement_format,
        read_placement_file,
    )
    if detect_placement_format(path) == "native":
        pf = read_placement_file(path)
        check_against_file(pf, path, model, cluster, gpus, nodes, gpus_per_node)
        if topology_file is None:
            return dataclasses.replace(pf, topology=with_speed(pf.topology, gpu_speed))
        topo = resolve_topology(cluster or pf.topology.gpu_preset, pf.topology.num_gpus, None, None,
                                topology_file)
        if (topo.num_nodes, topo.gpus_per_node) != (pf.topology.num_nodes, pf.topology.gpus_per_node):
            raise InvalidInputError(f"its NVLink domains ({topo.num_nodes} x {topo.gpus_per_node} GPUs) differ from "
                                    f"the placement's cluster ({pf.topology.num_nodes} x "
                                    f"{pf.topology.gpus_per_node})", source=topology_file)
        topo = dataclasses.replace(topo, gpu_speed=pf.topology.gpu_speed)  # the file's speeds, unless given
        return dataclasses.replace(pf, topology=with_speed(topo, gpu_speed))
    topology = (resolve_topology(cluster, gpus, nodes, gpus_per_node, topology_file, gpu_speed)
                if (cluster or gpus or topology_file) else None)
    return read_placement_file(path, model=resolve_model(model), topology=topology, stack=stack)


def placement_stack(pf, target):
    """The stack whose rule scores ``pf``: ``--stack``, else a stack file's own (not a native file's)."""
    return target if target is not None or not pf.method.startswith("file:") else pf.stack


def parse_exports(exports: tuple[str, ...], flag: str = "--export") -> list[tuple[str, str]]:
    from placer.io.placements import FORMATS  # deferred: keeps numba off placer --help
    out = []
    for item in exports:
        fmt, sep, path = item.partition("=")
        if not sep or not path:
            raise InvalidInputError(f"expected FORMAT=PATH, got {item!r}", source=flag)
        if fmt not in FORMATS:
            raise InvalidInputError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}", source=flag)
        out.append((fmt, path))
    return out


def echo_json(obj) -> None:
    click.echo(json_text(obj))


def echo_json_line(obj) -> None:
    """One event of a stream as one JSON line (flushed: a reader may be waiting for it)."""
    click.echo(json_text(obj, indent=None))
    sys.stdout.flush()



def parse_weights(text: str | None) -> dict[str, float]:
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
