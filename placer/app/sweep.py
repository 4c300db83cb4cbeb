"""Sweeps: a grid of GPU counts x request rates, every point a full comparison of placements.

Points run in parallel, in local processes or as Ray tasks (``ray_address``); each writes its
own results directory under the sweep directory, and ``sweep.csv`` collects the summaries.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from placer._ray import call_on_node
from placer._ray import init as ray_init
from placer.app.comparison import placement_candidates, routing_identity, run_comparison
from placer.errors import InvalidInputError
from placer.io.atomic import atomic_write_text
from placer.io.placements import read_placement_json
from placer.io.routing import check_top1, gather_routing
from placer.presets import DEFAULT_CLUSTER, get_model, make_topology
from placer.simulator.config import ReplayWorkload, ServingWorkload, SimConfig

SWEEP_COLUMNS = ("point", "gpus", "rate", "placement", "throughput_tok_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
                 "e2e_p99_s", "iteration_p99_s", "a2a_p99_s", "straggler_share", "max_link_utilisation")


@dataclass(frozen=True)
class SweepSpec:
    """Everything a point needs (points run in other processes, so only picklable values):
    the inputs by path, placements by file or method, the workload (its ``rate`` is the swept
    one) and the simulator configuration."""

    inputs: tuple[str, ...] = ()
    placements: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    redundant: int = 0
    model: str | None = None
    cluster: str | None = None
    workload: ServingWorkload | ReplayWorkload = field(default_factory=ServingWorkload)
    config: SimConfig = field(default_factory=SimConfig)
    level: str = "count"


def point_name(gpus: int | None, rate: float | None) -> str:
    parts = []
    if gpus is not None:
        parts.append(f"gpus{gpus}")
    if rate is not None:
        parts.append(f"rate{rate:g}")
    return "-".join(parts) or "point"


def run_point(spec: SweepSpec, gpus: int | None, rate: float, output: str) -> list[dict[str, Any]]:
    """Simulate one grid point; returns its rows of the sweep table."""
    model = get_model(spec.model) if spec.model else None
    routing = gather_routing(list(spec.inputs), model=model) if spec.inputs else None
    check_top1(routing, execution=spec.config.execution, methods=spec.methods)
    if routing is not None and model is None:
        model = routing.model
    topology = make_topology(spec.cluster or DEFAULT_CLUSTER, gpus=gpus) if gpus is not None else None
    files = [p for p in spec.placements
             if topology is None or read_placement_json(p).topology.num_gpus == topology.num_gpus]
    if not files and not spec.methods:
        return []
    candidates, model, topology = placement_candidates(
        files, spec.methods, model=model, topology=topology, stats=None if routing is None else routing.stats,
        redundant=spec.redundant, dispatch=spec.config.dispatch or "nearest", execution=spec.config.execution,
        seed=spec.config.seed)
    workload = spec.workload
    if isinstance(workload, ServingWorkload):
        workload = replace(workload, rate=rate)
    config = spec.config
    data = None if routing is None else (routing.trace if routing.trace is not None else routing.stats)
    info = routing_identity(list(spec.inputs), data, model,
                            True if routing is None else routing.synthetic)
    runs = run_comparison(candidates, topology, model, routing=data, routing_info=info, workload=workload,
                          config=config, level=spec.level, output=output)
    name = os.path.basename(output)
    return [{"point": name, "gpus": topology.num_gpus, "rate": rate if isinstance(workload, ServingWorkload) else None,
             "placement": r.label, **{k: r.summary.get(k) for k in SWEEP_COLUMNS[4:]}} for r in runs]


def _ray_run(spec: SweepSpec, points: list[tuple[int | None, float, str]], address: str,
             tick: Callable[[], None]) -> tuple[list[list[dict]], list[str]]:
    """Every point as one Ray task (one CPU), spread over the cluster's nodes; each writes its
    folder where it runs, so ``output`` must be a path every node shares (one machine, or a
    shared file system)."""
    ray = ray_init(address, "a simulation sweep on Ray (--ray-address)", include_dashboard=False, log_to_driver=False,
                   configure_logging=False)
    task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(call_on_node)
    refs = [task.remote(run_point, spec, g, r, os.path.abspath(out)) for g, r, out in points]
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        tick()
    done = ray.get(refs)
    return [rows for _, rows in done], [node for node, _ in done]


def run_sweep(spec: SweepSpec, gpu_counts: list[int | None], rates: list[float], *, output: str,
              workers: int | None = None, ray_address: str | None = None,
              progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Run every (GPU count, rate) point; write ``output/<point>/`` and ``output/sweep.csv``.

    On Ray (``ray_address``) the table's ``attrs["ray_nodes"]`` counts the nodes the points ran on.
    ``progress(done, total)`` is called as each point finishes (in any order).
    """
    serving = isinstance(spec.workload, ServingWorkload)
    if not serving:
        rates = rates[:1]
    points = [(g, r, os.path.join(output, point_name(g, r if serving else None)))
              for g in gpu_counts for r in rates]
    os.makedirs(output, exist_ok=True)
    finished = 0

    def tick() -> None:
        nonlocal finished
        finished += 1
        if progress is not None:
            progress(finished, len(points))

    nodes: list[str] = []
    if ray_address is not None:
        results, nodes = _ray_run(spec, points, ray_address, tick)
    elif (workers or 1) == 1 or len(points) == 1:
        results = []
        for g, r, out in points:
            results.append(run_point(spec, g, r, out))
            tick()
    else:
        with ProcessPoolExecutor(max_workers=min(workers or os.cpu_count() or 1, len(points))) as pool:
            futures = [pool.submit(run_point, spec, g, r, out) for g, r, out in points]
            for _ in as_completed(futures):
                tick()
            results = [f.result() for f in futures]
    rows = [row for point_rows in results for row in point_rows]
    if not rows:
        raise InvalidInputError("no grid point has a placement: placement files fit only their own GPU count; "
                                "add --method", source="--placement")
    table = pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))
    if nodes:
        table.attrs["ray_nodes"] = len(set(nodes))  # Ray nodes the points ran on
    atomic_write_text(os.path.join(output, "sweep.csv"), table.to_csv(index=False, lineterminator="\n"))
    # The sweep's charts, the methods and every point, read back from the point directories
    # (imported here: the workers need no plotly).
    from placer.app.report import render_full_report  # deferred: the workers need no plotly

    render_full_report(output, os.path.join(output, "report.html"), title="placer simulate sweep")
    return table


__all__ = ["SweepSpec", "run_point", "run_sweep", "point_name"]
