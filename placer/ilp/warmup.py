"""The local search's numba kernels, ready before the search: loaded from numba's on-disk
cache, or compiled (in a background ``python -m placer._warm --search`` under a deadline).

``make install`` fills the cache (``python -m placer._warm``); :func:`ensure_search_kernels` is
what the ``placer`` method calls before its search.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from placer._numba import cache_holds
from placer.ilp import _ls_anneal as A
from placer.ilp import _ls_kernel as K
from placer.ilp.local_search import LayerTask, SearchConfig, search_layer, token_types

COMPILING = "compiling the search kernels (first run)..."


def search_kernels() -> None:
    """The local search (:mod:`placer.ilp._ls_kernel`, :mod:`placer.ilp._ls_anneal`) on one tiny layer."""
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


def search_cache_warm() -> bool:
    """Whether numba's cache holds the search's driver kernels (False: the first call compiles)."""
    return not K.HAVE_NUMBA or all(cache_holds(f) for f in (A.anneal, A.init_state))


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
