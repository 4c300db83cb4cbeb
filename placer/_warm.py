"""Compile every numba kernel once on tiny inputs, so that later runs load them from the cache.

The kernels use ``cache=True`` (:mod:`placer._numba`), which only helps from the second run on:
on a fresh install the first ``placer solve`` would compile the local search (tens of seconds)
inside its time limit. ``python -m placer._warm`` (run by ``make install``) fills numba's
on-disk cache (``NUMBA_CACHE_DIR`` when set, else ``__pycache__`` next to the sources);
``python -m placer._warm --search`` warms only the local-search kernels.

:func:`placer.ilp.warmup.ensure_search_kernels` is what the ``placer`` method calls before its
search: the kernels load from the cache at once; on a cold cache they compile, in a background
``python -m placer._warm --search`` when a deadline is set, so the solve can give up at its
deadline (returning its best start) and the cache is still filled for the next run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np

from placer.ilp import PlacementProblem, solve
from placer.ilp._ls_load import gpu_load_moments
from placer.ilp.load_model import rank_loads
from placer.ilp.objective import evaluate_objective
from placer.ilp.packing import _pack_compiled
from placer.ilp.simple import contiguous_map
from placer.ilp.warmup import search_kernels
from placer.metrics import evaluate
from placer.metrics._count import CC_NAMES, COUNT_NAMES, add_counts, rank_arrays
from placer.metrics.dispatch import _nearest_kernel
from placer.presets import get_model, make_topology
from placer.simulator.a2a import a2a_benchmark
from placer.simulator.config import ServingWorkload, SimConfig
from placer.simulator.simulate import simulate
from placer.stats import compute_stats
from placer.synthetic import synthesize_trace
from placer.types import Placement
from placer.types._scan import scan_ids

# --------------------------------------------------------------------------------------------
# Tiny runs that compile (or load) each group of kernels with the signatures real runs use.
# --------------------------------------------------------------------------------------------

def _tiny_problem():
    model = get_model("olmoe-1b-7b")
    trace = synthesize_trace(model, 64, seed=0)
    return trace, PlacementProblem(compute_stats(trace), model, make_topology("h100", gpus=16), num_redundant=16)


def pipeline_kernels() -> None:
    """Synthetic traces, statistics counts, the objective, the metrics (a tiny solve), the
    ``nearest`` dispatch table, :func:`~placer.ilp.packing.keep_in_place`'s packing and the load
    model's moments (each called compiled: on a cold cache their callers take numpy)."""
    trace, problem = _tiny_problem()
    placement = solve(problem, "placer", num_workers=1, iterations=64).placement
    assert placement is not None  # a posed problem is feasible (PlacementProblem checks it)
    evaluate_objective(problem, placement)
    evaluate(placement, problem.topology, problem.model, trace)
    # the nearest table's kernel (dispatch tables take numpy until the cache holds it)
    _nearest_kernel(placement.physical_to_logical, placement.slots_per_gpu, problem.topology.gpus_per_node,
                    placement.num_experts, np.random.default_rng(0))
    _pack_compiled(placement, placement, problem.stats.load, 0.05)  # solve_from's packing
    topo = problem.topology  # the load model's kernel (scoring takes numpy until the cache holds it)
    gpu_load_moments(placement.physical_to_logical, problem.stats.load, topo.num_gpus, topo.num_nodes,
                     topo.gpus_per_node, placement.slots_per_gpu, "nearest",
                     *(rank_loads(problem.stats, topo.num_gpus) or ()))
    count_kernels()
    for writable in (True, False):  # RoutingTrace's id check, on fresh and frozen chunks
        ids = np.zeros((1, 1, 2), np.int16)
        ids[0, 0, 1] = 1
        ids.setflags(write=writable)
        scan_ids(ids)


def count_kernels() -> None:
    """The metrics' count kernel for every ids array it is handed: int16 (streamed chunks) or int64
    (whole traces, samples), read-only (frozen traces) or writable (chunks sorted by gate weight)."""
    arrays = rank_arrays(np.zeros((1, 2, 2), np.int64), 1, 1, 2)
    for dtype in (np.int16, np.int64):
        for writable in (True, False):
            ids = np.zeros((2, 1, 2), dtype)
            ids.setflags(write=writable)
            home = np.zeros(2, np.int64)
            add_counts(ids, home, home, arrays, True, np.zeros((1, 2), np.int64),
                       np.zeros((len(COUNT_NAMES), 1), np.int64), np.zeros((len(CC_NAMES), 1), np.int64),
                       np.zeros((1, 0, 0), np.int64))


def simulator_kernels() -> None:
    """The simulator's routing rates and network model (one tiny all-to-all, and a short
    serving run of ``simulate run`` under a rank-table and a position rule)."""
    a2a_benchmark(ep=16, tokens_per_rank=4, experts=32, groups=1, topk_groups=1)
    model = get_model("mixtral-8x7b")
    topology = make_topology("h100", gpus=8)
    placement = Placement(contiguous_map(model.num_moe_layers, model.num_experts, model.num_experts), 1,
                          model.num_experts)
    for rule in ("nearest", "vllm"):
        simulate(placement, topology, model, workload=ServingWorkload(rate=5.0, duration_s=0.5),
                 config=SimConfig(dispatch=rule, seed=0))


def permute_kernels() -> None:
    """The CPU permute / unpermute kernels (needs torch; skipped without it)."""
    try:
        import torch  # deferred: torch is an optional extra
    except ImportError:
        return
    from placer.kernels.ops import permute, unpermute  # deferred: imports torch, an optional extra

    for dtype in (torch.bfloat16, torch.float32):
        x = torch.ones(4, 8, dtype=dtype)
        ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])
        p = permute(x, ids, torch.arange(4), 4)
        unpermute(p.rows, p.row_map, torch.full((4, 2), 0.5))


GROUPS: dict[str, Callable[[], None]] = {"search": search_kernels, "pipeline": pipeline_kernels,
                                         "simulator": simulator_kernels, "permute": permute_kernels}


def warm(groups=tuple(GROUPS), say: Callable[[str], None] = lambda m: None) -> dict[str, str]:
    """Run each group; returns group -> "ok (s)" or the error (a failing group never stops the others)."""
    done = {}
    for name in groups:
        t0 = time.perf_counter()
        try:
            GROUPS[name]()
            done[name] = f"ok ({time.perf_counter() - t0:.1f} s)"
        except Exception as exc:  # noqa: BLE001 - warming is best effort: the kernels compile on use
            done[name] = f"failed: {type(exc).__name__}: {exc}"
        say(f"{name}: {done[name]}")
    return done


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    quiet = "--quiet" in args
    groups = ("search",) if "--search" in args else tuple(GROUPS)
    say = (lambda message: None) if quiet else (lambda message: print(f"placer._warm: {message}", flush=True))
    t0 = time.perf_counter()
    done = warm(groups, say)
    say(f"numba kernels compiled or loaded in {time.perf_counter() - t0:.1f} s")
    return 0 if all(v.startswith("ok") for v in done.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
