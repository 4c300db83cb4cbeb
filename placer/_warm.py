"""Compile every numba kernel once on tiny inputs, so that later runs load them from the cache.

The kernels use ``cache=True`` (:mod:`placer._numba`), which only helps from the second run on:
on a fresh install the first ``placer solve`` would compile the local search (tens of seconds)
inside its time limit. ``python -m placer._warm`` (run by ``make install``) fills numba's
on-disk cache (``NUMBA_CACHE_DIR`` when set, else ``__pycache__`` next to the sources);
``python -m placer._warm --search`` warms only the local-search kernels.

:func:`ensure_search_kernels` is what the ``placer`` method calls before its search: the
kernels load from the cache at once; on a cold cache they compile, in a background process
when a deadline is set, so the solve can give up at its deadline (returning its best start) and
the cache is still filled for the next run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

COMPILING = "compiling the search kernels (first run)..."


# --------------------------------------------------------------------------------------------
# Tiny runs that compile (or load) each group of kernels with the signatures real runs use.
# --------------------------------------------------------------------------------------------

def search_kernels() -> None:
    """The local search (:mod:`placer.ilp._ls_kernel`, :mod:`placer.ilp._ls_anneal`) on one tiny layer."""
    import numpy as np

    from placer.ilp.local_search import LayerTask, SearchConfig, search_layer, token_types

    rng = np.random.default_rng(0)
    e, gpus, nodes, spg, k, tokens = 8, 4, 2, 3, 2, 32
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(tokens)]).astype(np.int64)
    uids, home, wt = token_types(ids, np.arange(tokens, dtype=np.int64) % gpus)
    load = np.bincount(ids.ravel(), minlength=e).astype(np.float64) / tokens
    start = np.concatenate([np.arange(e), np.arange(gpus * spg - e) % e]).astype(np.int64)
    cfg = SearchConfig(num_gpus=gpus, num_nodes=nodes, gpus_per_node=gpus // nodes, slots_per_gpu=spg,
                       num_experts=e, num_slots=gpus * spg, top_k=k, rule="nearest", w_bal=1.0, w_nv=0.1,
                       w_rdma=0.2, iterations=64, probe=16, cycles=2)
    search_layer(LayerTask(0, load, uids, home, wt, start[None, :], 0.1), cfg)


def _tiny_problem():
    from placer.ilp import PlacementProblem
    from placer.presets import get_model, make_topology
    from placer.profiling.stats import compute_stats
    from placer.synthetic import synthesize_trace

    model = get_model("olmoe-1b-7b")
    trace = synthesize_trace(model, 64, seed=0)
    return trace, PlacementProblem(compute_stats(trace), model, make_topology("h100", gpus=16), num_redundant=16)


def pipeline_kernels() -> None:
    """Synthetic traces, statistics counts, the objective and the metrics (a tiny solve)."""
    from placer.ilp import solve
    from placer.ilp.objective import evaluate_objective
    from placer.metrics import evaluate

    trace, problem = _tiny_problem()
    result = solve(problem, "placer", num_workers=1, iterations=64)
    evaluate_objective(problem, result.placement)
    evaluate(result.placement, problem.topology, problem.model, trace)


def simulator_kernels() -> None:
    """The simulator's routing rates and network model (one tiny all-to-all)."""
    from placer.simulator.a2a import a2a_benchmark

    a2a_benchmark(ep=16, tokens_per_rank=4, experts=32, groups=1, topk_groups=1)


def permute_kernels() -> None:
    """The CPU permute / unpermute kernels (needs torch; skipped without it)."""
    try:
        import torch
    except ImportError:
        return
    from placer.kernels.ops import permute, unpermute

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


# --------------------------------------------------------------------------------------------
# Used by the placer method before its search.
# --------------------------------------------------------------------------------------------

def search_cache_warm() -> bool:
    """Whether numba's cache holds the search's driver kernels (False: the first call compiles)."""
    from placer.ilp import _ls_anneal as A
    from placer.ilp import _ls_kernel as K

    if not K.HAVE_NUMBA:
        return True
    try:  # an index that matches the sources (a stale one loads empty)
        return all(os.path.exists(f._cache._cache_file._index_path) and f._cache._cache_file._load_index()
                   for f in (A.anneal, A.init_state))
    except Exception:  # noqa: BLE001 - another numba layout: assume warm (the first call compiles)
        return True


_READY = False


def ensure_search_kernels(deadline: float | None = None,
                          say: Callable[[str], None] | None = None) -> bool:
    """Load the search kernels into this process (before any worker forks); True when they are.

    On a cold cache prints :data:`COMPILING` on stderr and compiles: in this process without a
    deadline; with one, in a background ``python -m placer._warm --search`` that this waits for
    until ``deadline`` (``time.time()``). False when the deadline came first: the compilation
    goes on in the background (it fills the cache for the next run) and the caller skips the
    search.
    """
    global _READY
    if _READY:
        return True
    tell = say or (lambda message: print(message, file=sys.stderr, flush=True))
    if not search_cache_warm():
        tell(COMPILING)
        if deadline is not None:
            proc = subprocess.Popen([sys.executable, "-m", "placer._warm", "--search", "--quiet"],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                proc.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                return False  # left running: it writes the cache, then exits
            except BaseException:  # interrupted: stop it with the solve
                proc.kill()
                raise
    search_kernels()  # loads from the cache (or compiles, without a deadline)
    _READY = True
    return True


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
