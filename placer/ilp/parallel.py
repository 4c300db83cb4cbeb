"""Run independent layer subproblems serially, in a local process pool, or on a Ray cluster.

Every layer's search is seeded by ``(seed, layer, start)`` (see :mod:`placer.ilp.local_search`),
so the three ways give identical results for the same inputs; only wall time differs (and a
wall-clock deadline, when one is set, may cut different layers short).

- ``num_workers`` (default ``min(2, os.cpu_count())``): local worker processes. 1 runs in this
  process. The pool forks when this process runs a single thread; otherwise (Ray, grpc or other
  threads alive) it uses ``forkserver`` (``spawn`` where that is missing), whose workers
  preload the search module, and then, as with any spawned pool, a script calling the solver
  needs the ``if __name__ == "__main__":`` guard.
- Progress: as groups finish, the layers done are reported to :func:`placer._progress.report`
  (in this process; a command shows them).
- ``ray_address``: run one Ray task per layer group on the cluster at that address
  (:func:`placer._ray.init`; ``"auto"`` joins the cluster ``ray start`` started here). When Ray
  is already initialised in this process the existing connection is used and the address is
  ignored. Each task asks for one CPU and Ray spreads the tasks over the cluster's nodes
  (``SPREAD``); every task reports the node it ran on. A worker process needs placer importable
  (installed on every node, or a ``runtime_env``); numba's on-disk cache makes workers after the
  first on a node cheap.

The caller (:func:`placer.ilp.joint.solve_placer`) loads or compiles the search kernels in this
process first (:func:`placer.ilp.warmup.ensure_search_kernels`): forked workers inherit them and
forkserver / spawned ones load them from the cache, so no worker compiles outside the time
limit. On an exception (SIGINT, SIGTERM) the local workers are killed at once.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed

from placer._progress import report
from placer._ray import call_on_node
from placer._ray import init as ray_init
from placer.errors import InvalidInputError
from placer.ilp.local_search import LayerResult, LayerTask, SearchConfig, search_group

GROUPS_PER_WORKER = 4
"""Layer groups per worker (smaller groups balance uneven layers; each group is one task)."""

LAYER_SEARCH = "layer search"
"""What :func:`placer._progress.report` counts as groups finish: MoE layers searched."""


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def layer_groups(tasks: list[LayerTask], num_groups: int) -> list[list[LayerTask]]:
    """``tasks`` cut into at most ``num_groups`` contiguous groups of near-equal size."""
    n = max(1, min(num_groups, len(tasks)))
    bounds = [round(i * len(tasks) / n) for i in range(n + 1)]
    return [tasks[bounds[i]:bounds[i + 1]] for i in range(n) if bounds[i + 1] > bounds[i]]


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["placer.ilp.local_search"])
        return ctx
    return multiprocessing.get_context("spawn")


def run_local(tasks: list[LayerTask], cfg: SearchConfig, deadline: float | None = None,
              num_workers: int | None = None) -> list[LayerResult]:
    """Search every layer in ``num_workers`` local processes (1: in this process)."""
    workers = default_workers() if num_workers is None else int(num_workers)
    if workers < 1:
        raise InvalidInputError(f"num_workers must be >= 1, got {num_workers}", source="--workers")
    groups = layer_groups(tasks, workers * GROUPS_PER_WORKER)
    if workers == 1 or len(groups) <= 1:
        results = search_group(tasks, cfg, deadline)
        report(LAYER_SEARCH, len(tasks), len(tasks))
        return results
    pool = ProcessPoolExecutor(max_workers=min(workers, len(groups)), mp_context=_pool_context())
    try:
        futures = {pool.submit(search_group, g, cfg, deadline): len(g) for g in groups}
        done = 0
        for f in as_completed(futures):
            done += futures[f]
            report(LAYER_SEARCH, done, len(tasks))
        results = [r for f in futures for r in f.result()]
    except BaseException:  # SIGINT / SIGTERM or a failed group: stop the workers now, not at their end
        _kill_workers(pool)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            proc.kill()
        except (OSError, ValueError, AttributeError):
            pass


_REMOTE = None


def run_ray(tasks: list[LayerTask], cfg: SearchConfig, deadline: float | None = None, *,
            address: str, num_groups: int | None = None) -> tuple[list[LayerResult], list[str]]:
    """Search every layer on the Ray cluster at ``address``, one remote task per layer group,
    spread over the cluster's nodes (Ray's ``SPREAD`` strategy; one CPU each).

    Returns the results and, per task, the id of the Ray node that ran it.
    """
    global _REMOTE
    ray = ray_init(address, "solving on a Ray cluster (ray_address)")
    if _REMOTE is None:
        _REMOTE = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(call_on_node)
    if num_groups is None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        num_groups = max(1, cpus) * GROUPS_PER_WORKER
    cfg_ref = ray.put(cfg)
    groups = layer_groups(tasks, num_groups)
    refs = [_REMOTE.remote(search_group, g, cfg_ref, deadline) for g in groups]
    pending, finished = list(refs), 0
    sizes = {ref: len(g) for ref, g in zip(refs, groups, strict=True)}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        finished += sum(sizes[r] for r in ready)
        report(LAYER_SEARCH, finished, len(tasks))
    done = ray.get(refs)
    return [r for _, group in done for r in group], [node for node, _ in done]


def run_layer_search(tasks: list[LayerTask], cfg: SearchConfig, deadline: float | None = None, *,
                     num_workers: int | None = None, ray_address: str | None = None,
                     ray_nodes: list[str] | None = None) -> list[LayerResult]:
    """Dispatch to :func:`run_ray` when ``ray_address`` is given, else :func:`run_local`.

    Results come back in layer order. ``ray_nodes``, when given, receives the id of the Ray node
    each task ran on (nothing when the search ran locally).
    """
    if ray_address:
        results, nodes = run_ray(tasks, cfg, deadline, address=ray_address)
        if ray_nodes is not None:
            ray_nodes.extend(nodes)
    else:
        results = run_local(tasks, cfg, deadline, num_workers)
    return sorted(results, key=lambda r: r.layer)
