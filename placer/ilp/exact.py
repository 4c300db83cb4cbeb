"""Exact context-coherent placement where the structure allows it.

Context-coherent (ExFlow) execution keeps a token's state on the GPU of its top-1 expert, so
with no replicas and expert-to-GPU maps ``pi_l`` the cost of a placement is

    affinity * sum_l sum_{i,j} T[l, i, j] * [pi_l(i) != pi_{l+1}(j)]   (cross-GPU transitions)
  + balance  * sum_l max_g sum_{e: pi_l(e) = g} load[l, e]            (per-layer max GPU load)

with ``T = stats.top1_transitions [L-1, E, E]`` and ``load = stats.load [L, E]``. Two shapes are
solved exactly here:

- **One expert per GPU** (E == G): every GPU holds one expert, so the load term is the same for
  every placement and the transition term splits into one linear assignment problem per layer
  pair (:func:`exact_one_per_gpu`).
- **Few labelled partitions** (E / G experts per GPU, at most :data:`MAX_PARTITIONS` ways to
  split one layer): a Viterbi dynamic programme over the labelled partitions of every layer
  (:func:`exact_partition_dp`). Mixtral (8 experts) on 4 GPUs has 2,520 per layer.

Both are pure numpy functions (OR-Tools for the assignments and the b-matching bound). The
registered method ``exact`` (:func:`placer.ilp.coherent.solve_exact`) runs them for a
:class:`~placer.ilp.base.PlacementProblem` through :func:`placer.ilp.coherent.solve_coherent`,
which owns the objective weights; this module imports nothing of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from placer.errors import InvalidInputError
from placer.ilp.assignment import max_weight_assignment

__all__ = ["MAX_PARTITIONS", "DPResult", "assign_max", "coherent_cost", "count_partitions",
           "enumerate_partitions", "exact_one_per_gpu", "exact_partition_dp", "gpu_of_expert",
           "pair_matching_bound", "partition_dp", "phys2log_from_gpu"]

MAX_PARTITIONS = 20_000
"""Largest number of labelled partitions per layer the DP accepts (its cost is ~n^2 per layer pair)."""

_CHUNK_ENTRIES = 1 << 23  # entries of one [n, chunk] block of the DP (64 MiB of float64)


# --------------------------------------------------------------------------------------------
# Placement encodings
# --------------------------------------------------------------------------------------------


def gpu_of_expert(phys2log: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """GPU of every logical expert of a placement without replicas.

    ``phys2log``: int [L, E] (slot p on GPU p // slots_per_gpu). Returns int64 [L, E].
    """
    p2l = np.asarray(phys2log)
    num_layers, num_slots = p2l.shape
    gpu = np.empty((num_layers, num_slots), dtype=np.int64)
    gpu[np.arange(num_layers)[:, None], p2l] = (np.arange(num_slots) // slots_per_gpu)[None, :]
    return gpu


def phys2log_from_gpu(gpu: np.ndarray, num_gpus: int) -> np.ndarray:
    """Inverse of :func:`gpu_of_expert`: experts of GPU g (ascending) fill its slots.

    ``gpu``: int [L, E] with every GPU holding E / num_gpus experts per layer. Returns int32 [L, E].
    """
    gpu = np.asarray(gpu, dtype=np.int64)
    num_layers, num_experts = gpu.shape
    if num_experts % num_gpus:
        raise InvalidInputError(f"{num_experts} experts do not split over {num_gpus} GPUs", source="placement")
    counts = np.stack([np.bincount(row, minlength=num_gpus) for row in gpu])
    if counts.shape[1] != num_gpus or np.any(counts != num_experts // num_gpus):
        raise InvalidInputError("every GPU must hold the same number of experts in every layer",
                                source="placement")
    # Sort by (gpu, expert): a stable argsort of the GPU ids keeps experts ascending per GPU.
    return np.argsort(gpu, axis=1, kind="stable").astype(np.int32)


def coherent_cost(gpu: np.ndarray, transitions: np.ndarray | None, load: np.ndarray,
                  num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """Cross-GPU top-1 transitions per layer pair and max GPU load per layer.

    ``gpu``: int [L, E] GPU of every expert; ``transitions``: [L-1, E, E] or None (zero);
    ``load``: [L, E]. Returns ``cross`` float64 [L-1] and ``max_load`` float64 [L].
    """
    gpu = np.asarray(gpu, dtype=np.int64)
    num_layers = gpu.shape[0]
    if transitions is None or num_layers < 2:
        cross = np.zeros(max(num_layers - 1, 0))
    else:
        diff = gpu[:-1, :, None] != gpu[1:, None, :]
        cross = (np.asarray(transitions, dtype=np.float64) * diff).sum(axis=(1, 2))
    per_gpu = np.zeros((num_layers, num_gpus))
    np.add.at(per_gpu, (np.repeat(np.arange(num_layers), gpu.shape[1]), gpu.ravel()),
              np.asarray(load, dtype=np.float64).ravel())
    return cross, per_gpu.max(axis=1)


# --------------------------------------------------------------------------------------------
# One expert per GPU: a chain of linear assignment problems
# --------------------------------------------------------------------------------------------


def _integer_weights(weight: np.ndarray) -> np.ndarray:
    """``weight`` as int64; non-integral values are scaled by 1e6 and rounded first."""
    w = np.asarray(weight, dtype=np.float64)
    if not np.all(np.isfinite(w)):
        raise InvalidInputError("transition counts contain NaN or infinite values", source="stats")
    if np.all(w == np.round(w)):
        return w.astype(np.int64)
    return np.round(w * 1e6).astype(np.int64)


def assign_max(weight: np.ndarray) -> np.ndarray:
    """Exact maximum-weight perfect matching of a square matrix (OR-tools, integer costs).

    ``weight``: [n, n] non-negative counts. Returns int64 [n] ``sigma`` maximising
    ``sum_i weight[i, sigma[i]]``. Non-integral weights are scaled by 1e6 and rounded.
    """
    w = _integer_weights(weight)
    n = w.shape[0]
    if w.shape != (n, n):
        raise InvalidInputError(f"expected a square matrix, got {w.shape}", source="assignment")
    return max_weight_assignment(w)


def exact_one_per_gpu(transitions: np.ndarray) -> np.ndarray:
    """Optimal one-expert-per-GPU chain (E == G, no replicas) for context-coherent execution.

    ``transitions``: int [L-1, E, E] top-1 transition counts. Layer 0 is the identity (GPU g
    holds expert g; GPU labels are interchangeable). Sharing a GPU is a bijection ``sigma_l``
    from layer-l experts to layer-(l+1) experts, and any sequence of bijections is realised by
    exactly one chain of placements, so each ``sigma_l`` is an independent linear assignment
    problem maximising ``sum_i T[l, i, sigma_l(i)]``. Proven optimal (objective = bound).

    Returns int32 ``phys2log [L, E]`` (slot g = GPU g).
    """
    t = np.asarray(transitions)
    if t.ndim != 3 or t.shape[1] != t.shape[2]:
        raise InvalidInputError(f"expected transitions [L-1, E, E], got shape {t.shape}", source="stats")
    num_pairs, num_experts, _ = t.shape
    p2l = np.empty((num_pairs + 1, num_experts), dtype=np.int32)
    p2l[0] = np.arange(num_experts)
    for layer in range(num_pairs):
        sigma = assign_max(t[layer])
        # The expert on GPU g at layer l is p2l[l, g]; its partner sigma(...) takes that GPU.
        p2l[layer + 1] = sigma[p2l[layer]]
    return p2l


# --------------------------------------------------------------------------------------------
# E / G experts per GPU: Viterbi over labelled partitions
# --------------------------------------------------------------------------------------------


def count_partitions(num_experts: int, num_gpus: int) -> int:
    """Labelled partitions of E experts into G groups of E / G: ``E! / ((E/G)!)^G``."""
    if num_gpus < 1 or num_experts % num_gpus:
        raise InvalidInputError(f"{num_experts} experts do not split evenly over {num_gpus} GPUs",
                                source="--gpus")
    size = num_experts // num_gpus
    return math.factorial(num_experts) // math.factorial(size) ** num_gpus


def enumerate_partitions(num_experts: int, num_gpus: int) -> np.ndarray:
    """Every labelled partition of E experts into G groups of E / G. Returns int8/int16 [n, E].

    Row p gives the GPU of every expert; GPU labels matter (the layers of a chain must agree on
    them). Rows are in lexicographic order of the groups (GPU 0's set first).
    """
    n = count_partitions(num_experts, num_gpus)
    size = num_experts // num_gpus
    out = np.empty((n, num_experts), dtype=np.int16)
    row = np.empty(num_experts, dtype=np.int16)
    index = 0

    def fill(free: tuple[int, ...], gpu: int) -> None:
        nonlocal index
        if gpu == num_gpus - 1:
            row[list(free)] = gpu
            out[index] = row
            index += 1
            return
        for group in combinations(free, size):
            row[list(group)] = gpu
            chosen = set(group)
            fill(tuple(e for e in free if e not in chosen), gpu + 1)

    fill(tuple(range(num_experts)), 0)
    assert index == n
    return out


@dataclass(frozen=True)
class DPResult:
    """Outcome of :func:`partition_dp`.

    ``gpu`` int64 [L, E]: GPU of every expert; ``objective`` = ``affinity_weight * cross.sum() +
    load_weight * max_load.sum()`` (minimal under the cap); ``cross`` float64 [L-1];
    ``max_load`` float64 [L]; ``caps`` float64 [L]: the max/mean load cap applied per layer
    (``inf`` without a cap; raised to the smallest achievable ratio where ``load_cap`` admits no
    partition); ``num_partitions`` per layer.
    """

    gpu: np.ndarray
    objective: float
    cross: np.ndarray
    max_load: np.ndarray
    caps: np.ndarray
    num_partitions: int


def _check_shapes(transitions: np.ndarray | None, load: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    load = np.asarray(load, dtype=np.float64)
    if load.ndim != 2:
        raise InvalidInputError(f"expected load [L, E], got shape {load.shape}", source="stats")
    num_layers, num_experts = load.shape
    if transitions is None:
        t = np.zeros((max(num_layers - 1, 0), num_experts, num_experts))
    else:
        t = np.asarray(transitions, dtype=np.float64)
        if t.shape != (max(num_layers - 1, 0), num_experts, num_experts):
            raise InvalidInputError(f"transitions have shape {t.shape}, expected "
                                    f"{(num_layers - 1, num_experts, num_experts)}", source="stats")
    return t, load


def partition_dp(transitions: np.ndarray | None, load: np.ndarray, num_gpus: int, *,
                 load_weight: float = 0.0, load_cap: float | None = None,
                 affinity_weight: float = 1.0, max_partitions: int = MAX_PARTITIONS,
                 cap_load: np.ndarray | None = None) -> DPResult:
    """Exact minimum of the context-coherent objective over chains of labelled partitions.

    Objective: ``affinity_weight * cross-GPU transitions + load_weight * sum_l max GPU load``,
    optionally subject to ``max/mean GPU load <= load_cap`` per layer (a layer where no
    partition meets the cap uses the smallest ratio any partition reaches). Node costs are the
    load term; edge costs between consecutive layers' partitions are
    ``total - sum_g A_p[:, g]^T T A_q[:, g]`` computed as a matrix product of one-hot encodings
    ``A [n, E, G]``; the DP keeps one back-pointer per partition and layer.

    ``transitions``: [L-1, E, E] or None; ``load``: [L, E]. Raises InvalidInputError when E / G
    is not whole or there are more than ``max_partitions`` partitions per layer. ``cap_load``
    float [L] (instead of ``load_cap``): the largest allowed max GPU load per layer, in load units.
    """
    t, ld = _check_shapes(transitions, load)
    num_layers, num_experts = ld.shape
    n = count_partitions(num_experts, num_gpus)
    if n > max_partitions:
        raise InvalidInputError(
            f"{num_experts} experts on {num_gpus} GPUs have {n:,} labelled partitions per layer; the "
            f"exact DP handles at most {max_partitions:,} (use the local search: --method placer)",
            source="exact")
    parts = enumerate_partitions(num_experts, num_gpus).astype(np.int64)   # [n, E]
    onehot = np.zeros((n, num_experts, num_gpus))                           # A [n, E, G]
    onehot[np.arange(n)[:, None], np.arange(num_experts)[None, :], parts] = 1.0
    flat = onehot.reshape(n, num_experts * num_gpus)

    # Node costs: max GPU load of every partition in every layer, [L, n].
    gpu_load = np.einsum("peg,le->lpg", onehot, ld)
    max_load = gpu_load.max(axis=2)
    mean = ld.sum(axis=1) / num_gpus
    limit = np.full(num_layers, np.inf)
    if cap_load is not None:
        limit = np.maximum(np.asarray(cap_load, dtype=np.float64), max_load.min(axis=1))
    elif load_cap is not None:
        limit = np.maximum(float(load_cap) * mean, max_load.min(axis=1))
    allowed = max_load <= limit[:, None] + 1e-9 * np.maximum(1.0, limit[:, None])
    caps = np.where(mean > 0, limit / np.where(mean > 0, mean, 1.0), np.inf)
    node = np.where(allowed, load_weight * max_load, np.inf)

    chunk = max(1, _CHUNK_ENTRIES // n)
    back = np.empty((max(num_layers - 1, 0), n), dtype=np.int32)
    cost = node[0].copy()
    for layer in range(num_layers - 1):
        tl = t[layer]
        total = tl.sum()
        # B[p, j, g] = sum_i A[p, i, g] T[i, j]; same[p, q] = <B_p, A_q> (tokens staying on GPU).
        bt = np.einsum("pig,ij->pjg", onehot, tl).reshape(n, -1).T.copy()   # [E*G, n]
        new = np.empty(n)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            val = flat[start:stop] @ bt                # [chunk, n]: same[p, q] for q in the chunk
            val *= -affinity_weight
            val += cost[None, :]                       # val[q, p] = cost[p] - w * same[p, q]
            arg = np.argmin(val, axis=1)
            back[layer, start:stop] = arg
            new[start:stop] = val[np.arange(stop - start), arg] + affinity_weight * total
        cost = new + node[layer + 1]
    last = int(np.argmin(cost))
    if not np.isfinite(cost[last]):  # cannot happen: every layer keeps its best-balanced partitions
        raise RuntimeError("the load cap left no partition")
    chain = np.empty(num_layers, dtype=np.int64)
    chain[-1] = last
    for layer in range(num_layers - 2, -1, -1):
        chain[layer] = back[layer, chain[layer + 1]]
    gpu = parts[chain]
    cross, ml = coherent_cost(gpu, t, ld, num_gpus)
    objective = float(affinity_weight * cross.sum() + load_weight * ml.sum())
    return DPResult(gpu=gpu, objective=objective, cross=cross, max_load=ml, caps=caps, num_partitions=n)


def exact_partition_dp(transitions: np.ndarray | None, load: np.ndarray, num_gpus: int, *,
                       load_weight: float = 0.0, load_cap: float | None = None,
                       affinity_weight: float = 1.0, max_partitions: int = MAX_PARTITIONS) -> np.ndarray:
    """Exact context-coherent placement by DP over labelled partitions; see :func:`partition_dp`.

    ``transitions``: [L-1, E, E]; ``load``: [L, E]. ``load_weight`` is the weight of one unit of
    per-layer max GPU load (token-slots) relative to one cross-GPU transition (times
    ``affinity_weight``); ``load_cap`` a hard per-layer max/mean cap. Returns int32
    ``phys2log [L, E]`` with E / G experts per GPU (slot p on GPU p // (E / G)).
    """
    res = partition_dp(transitions, load, num_gpus, load_weight=load_weight, load_cap=load_cap,
                       affinity_weight=affinity_weight, max_partitions=max_partitions)
    return phys2log_from_gpu(res.gpu, num_gpus)


# --------------------------------------------------------------------------------------------
# A proven lower bound for any E / G (used where nothing exact applies)
# --------------------------------------------------------------------------------------------


def pair_matching_bound(transitions: np.ndarray, per_gpu: int) -> np.ndarray:
    """Upper bound on same-GPU top-1 transitions per layer pair, ignoring chain consistency.

    Each layer-l expert shares its GPU with exactly ``per_gpu`` layer-(l+1) experts and vice
    versa, so the same-GPU indicator ``y[i, j]`` of any placement is a 0/1 matrix with row and
    column sums ``per_gpu``; the maximum of ``sum T * y`` over such matrices (a bipartite
    b-matching, solved exactly as a min-cost flow) bounds the same-GPU transitions of every
    placement. With ``per_gpu == 1`` it is the assignment optimum (then tight for the chain).

    ``transitions``: [L-1, E, E]. Returns float64 [L-1] upper bounds on same-GPU transitions.
    """
    from ortools.graph.python import min_cost_flow  # deferred: 0.15 s a process

    t = np.asarray(transitions)
    num_pairs, num_experts, _ = t.shape
    out = np.zeros(num_pairs)
    for layer in range(num_pairs):
        w = _integer_weights(t[layer])
        scale = 1.0 if np.all(np.asarray(t[layer]) == np.round(t[layer])) else 1e6
        flow = min_cost_flow.SimpleMinCostFlow()
        src, sink = 2 * num_experts, 2 * num_experts + 1
        e = np.arange(num_experts, dtype=np.int64)
        tails, heads = np.divmod(np.arange(num_experts ** 2, dtype=np.int64), num_experts)
        # source -> left expert (capacity E/G), left -> right (capacity 1, cost -T), right -> sink.
        flow.add_arcs_with_capacity_and_unit_cost(
            np.concatenate([np.full(num_experts, src), tails, num_experts + e]),
            np.concatenate([e, num_experts + heads, np.full(num_experts, sink)]),
            np.concatenate([np.full(num_experts, per_gpu), np.ones(num_experts ** 2, np.int64),
                            np.full(num_experts, per_gpu)]),
            np.concatenate([np.zeros(num_experts, np.int64), -w.ravel(), np.zeros(num_experts, np.int64)]))
        flow.set_node_supply(src, num_experts * per_gpu)
        flow.set_node_supply(sink, -num_experts * per_gpu)
        status = flow.solve()
        if status != flow.OPTIMAL:
            raise RuntimeError(f"min-cost flow failed with status {status}")
        out[layer] = -flow.optimal_cost() / scale
    return out
