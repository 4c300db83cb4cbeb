"""A movement-aware re-solve: EPLB's replica counts, packed so that experts stay where they are.

An EPLB re-solve re-partitions the experts over GPUs whenever the load order changes, so most
slots change even after a small load shift (``benchmarks/RESULTS.md``). :func:`sticky_repack`
keeps the replica counts the re-solve chose (what balances the load) and re-packs them per layer:

1. **Keep**: every replica an old GPU already holds, heaviest first, stays on that GPU while the
   GPU's load stays within ``(1 + tolerance)`` times the mean GPU load and its slots allow.
2. **Fill**: the remaining replicas, heaviest first, go to the least-loaded GPU with a free slot
   (EPLB's balanced packing).

A replica's load is its expert's load divided by its replica count (the uniform split). Both
phases are greedy: when the only free slot left is on a GPU that already holds the expert, the
replica goes there (it then balances nothing). EPLB's hierarchical rule (an expert group's
replicas on one node) is not kept. The result passes :func:`placer.validate.check_placement`; its balance can be compared with the
re-solve's via :func:`gpu_balance`.
"""

from __future__ import annotations

import numpy as np

from placer.types import Placement
from placer.validate import check_placement

__all__ = ["gpu_balance", "sticky_repack"]


def gpu_balance(placement: Placement, load: np.ndarray) -> np.ndarray:
    """max / mean GPU load per layer when each expert's load splits evenly over its replicas.

    ``load``: [L, E] token-slots per expert. Returns float64 [L].
    """
    load = np.asarray(load, dtype=np.float64)
    cnt = placement.logcnt()
    rows = np.arange(placement.num_layers)[:, None]
    share = load[rows, placement.physical_to_logical] / cnt[rows, placement.physical_to_logical]
    gpu = share.reshape(placement.num_layers, placement.num_gpus, placement.slots_per_gpu).sum(2)
    return gpu.max(1) / np.maximum(gpu.mean(1), 1e-12)


def sticky_repack(old: Placement, target: Placement, load: np.ndarray, *,
                  tolerance: float = 0.05) -> Placement:
    """``target``'s replica counts packed to keep ``old``'s experts on their GPUs.

    Parameters
    ----------
    old : Placement, what runs now, ``[L, P]``.
    target : Placement, the balanced re-solve (e.g. EPLB on the new load), same shape.
    load : float [L, E], the new load the re-solve balanced.
    tolerance : float, how far above the mean GPU load a kept replica may push its GPU.

    Returns
    -------
    Placement, ``[L, P]``, validated; each expert has ``target``'s replica count.
    """
    load = np.asarray(load, dtype=np.float64)
    num_layers, num_slots = old.physical_to_logical.shape
    g, s, e = old.num_gpus, old.slots_per_gpu, old.num_experts
    cnt = target.logcnt()
    out = np.empty_like(old.physical_to_logical)
    for layer in range(num_layers):
        w = load[layer] / cnt[layer]  # per-replica load
        cap = (1.0 + tolerance) * float((w * cnt[layer]).sum()) / g
        quota = cnt[layer].copy()
        gpu_load = np.zeros(g)
        rows: list[list[int]] = [[] for _ in range(g)]
        old_rows = old.physical_to_logical[layer].reshape(g, s)
        candidates = [(w[x], gpu, int(x)) for gpu in range(g) for x in old_rows[gpu]]
        for weight, gpu, x in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
            if quota[x] and x not in rows[gpu] and len(rows[gpu]) < s and gpu_load[gpu] + weight <= cap:
                rows[gpu].append(x)
                quota[x] -= 1
                gpu_load[gpu] += weight
        rest = [int(x) for x in np.repeat(np.arange(e), quota)]
        for x in sorted(rest, key=lambda x: (-w[x], x)):
            free = [gpu for gpu in range(g) if len(rows[gpu]) < s]
            # a GPU without this expert first (a second copy on one GPU balances nothing)
            free.sort(key=lambda gpu: (x in rows[gpu], gpu_load[gpu], gpu))
            rows[free[0]].append(x)
            gpu_load[free[0]] += w[x]
        out[layer] = np.concatenate(rows)
    return check_placement(Placement(out, s, e))
