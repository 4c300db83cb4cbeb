"""Movement-aware re-placement: a re-solve weighed against the weights it would move.

A re-solve on new load (EPLB's, placer's) re-partitions experts over GPUs whenever the load order
changes, so most slots change after a small shift. :func:`solve_from` runs the method and then
chooses, from the running placement ``A``, the method's answer ``B`` (relabelled onto ``A``'s GPUs
to keep the most weights, :func:`relabel_gpus`) and ``B``'s replica counts packed to keep ``A``'s
experts in place at several tolerances (:func:`keep_in_place`; at tolerance -1 nothing is kept:
``B``'s replicas packed for balance alone, then relabelled), the candidate ``X`` of least

    cost(X) = step(X) / step(A) + move_s(X) / horizon_s

- ``step(X)``: the sum over layers of the bottleneck GPU's load (token-slots, an expert's load
  split evenly over its replicas): what a layer's expert compute waits for;
- ``move_s(X)``: the slowest GPU's receive time for the experts it lacks (one transfer per
  (layer, GPU, expert); over NVLink when a GPU of its node held the expert, else over the NIC);
  serving loses about that much while the weights move, amortised over the ``horizon_s`` seconds
  the new placement is expected to serve (``placer serve --horizon``; the same rule serve
  publishes by).

Only balance enters ``step``: the traffic terms of placer's objective are not re-scored, so under
``--method placer`` the candidates that keep ``B``'s layout (``B`` itself) keep its traffic and the
repacked ones do not. No candidate holds two copies of an expert on one GPU unless ``B`` gives that
expert more replicas than there are GPUs (the running placement and ``B`` are left out where they
do: EPLB's packing can put two replicas of one expert on one GPU).

Shapes: ``physical_to_logical: [L, P]``, slot ``p`` on GPU ``p // S``; loads ``[L, E]``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from placer.costs import transfer_seconds
from placer.errors import InvalidInputError
from placer.ilp.assignment import max_weight_assignment
from placer.ilp.base import PlacementProblem, solve
from placer.types import Placement, SolveResult, Topology
from placer.validate import check_placement

__all__ = ["TOLERANCES", "copies_per_gpu", "doubled", "gpu_balance", "keep_in_place", "move_seconds", "relabel_gpus",
           "solve_from", "step_load"]

TOLERANCES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""Tolerances of :func:`keep_in_place` tried by :func:`solve_from` (0: pack for balance)."""


# ---- counting ---------------------------------------------------------------------------------


def copies_per_gpu(p2l: np.ndarray, num_gpus: int, num_experts: int) -> np.ndarray:
    """Copies of each expert on each GPU. ``p2l: [L, P]`` -> int64 [L, G, E]."""
    num_layers, num_slots = p2l.shape
    out = np.zeros((num_layers, num_gpus, num_experts), np.int64)
    layer = np.repeat(np.arange(num_layers), num_slots)
    gpu = np.tile(np.arange(num_slots) // (num_slots // num_gpus), num_layers)
    np.add.at(out, (layer, gpu, p2l.ravel()), 1)
    return out


def doubled(placement: Placement) -> bool:
    """Whether some GPU holds two copies of an expert that has no more replicas than GPUs."""
    copies = copies_per_gpu(placement.physical_to_logical, placement.num_gpus, placement.num_experts)
    fits = placement.logcnt() <= placement.num_gpus  # [L, E]
    return bool(((copies > 1) & fits[:, None, :]).any())


def gpu_loads(placement: Placement, load: np.ndarray) -> np.ndarray:
    """Per-GPU load when each expert's load splits evenly over its replicas: float64 [L, G]."""
    load = np.asarray(load, dtype=np.float64)
    cnt = placement.logcnt()
    rows = np.arange(placement.num_layers)[:, None]
    share = load[rows, placement.physical_to_logical] / cnt[rows, placement.physical_to_logical]
    return share.reshape(placement.num_layers, placement.num_gpus, placement.slots_per_gpu).sum(2)


def gpu_balance(placement: Placement, load: np.ndarray) -> np.ndarray:
    """max / mean GPU load per layer (:func:`gpu_loads`). ``load``: [L, E]. Returns float64 [L]."""
    gpu = gpu_loads(placement, load)
    return gpu.max(1) / np.maximum(gpu.mean(1), 1e-12)


def step_load(placement: Placement, load: np.ndarray) -> float:
    """Sum over layers of the bottleneck GPU's load (:func:`gpu_loads`)."""
    return float(gpu_loads(placement, load).max(1).sum())


def move_seconds(old: Placement, new: Placement, topology: Topology, expert_bytes: float) -> tuple[float, float]:
    """(seconds, bytes) to bring ``new``'s experts to GPUs that lack them under ``old``.

    One transfer per (layer, GPU, expert) the GPU lacks (further copies are local); received over
    NVLink when a GPU of the same node held the expert, else over the NIC; seconds are the slowest
    GPU's receive time.
    """
    g, gpn = old.num_gpus, topology.gpus_per_node
    c_old = copies_per_gpu(old.physical_to_logical, g, old.num_experts) > 0
    c_new = copies_per_gpu(new.physical_to_logical, g, new.num_experts) > 0
    need = c_new & ~c_old  # [L, G, E]
    on_node = c_old.reshape(c_old.shape[0], g // gpn, gpn, -1).any(2)  # [L, N, E]
    local = np.repeat(on_node, gpn, axis=1)  # [L, G, E]: a GPU of this GPU's node held it
    intra = (need & local).sum((0, 2)) * float(expert_bytes)
    inter = (need & ~local).sum((0, 2)) * float(expert_bytes)
    seconds = transfer_seconds(intra, topology.nvlink_gbps) + transfer_seconds(inter, topology.nic_gbps)
    return float(seconds.max(initial=0.0)), float(intra.sum() + inter.sum())


# ---- relabelling ------------------------------------------------------------------------------


def _max_assignment(weight: np.ndarray) -> tuple[np.ndarray, int]:
    """Row -> column assignment of largest total ``weight`` (int64 [n, n]), identity on ties."""
    n = weight.shape[0]
    score = weight * (n + 1) + np.eye(n, dtype=np.int64)  # ties go to the identity
    cols = max_weight_assignment(score)
    return cols, int(weight[np.arange(n), cols].sum())


def relabel_gpus(c_old: np.ndarray, c_new: np.ndarray, num_nodes: int, gpn: int) -> tuple[np.ndarray, np.ndarray]:
    """Node then GPU-in-node relabel of the requested GPUs keeping the most weights in place.

    ``c_old, c_new: [L, G, E]`` copies per GPU (:func:`copies_per_gpu`). The value of putting
    requested GPU j on physical GPU g is, lexicographically, the (layer, expert) pairs present on
    both (transfers saved), then the slots kept (local copies saved): an assignment of nodes
    whose weights are optimal assignments of GPUs inside each node pair, hence optimal among
    node-structure-preserving relabels. Returns (gpu_relabel [G], node_relabel [N]): requested
    GPU j goes to physical GPU ``gpu_relabel[j]``.
    """
    num_layers, num_gpus, _ = c_old.shape
    top = int(max(c_old.max(), c_new.max()))
    a = c_new.transpose(1, 0, 2).reshape(num_gpus, -1)
    b = c_old.transpose(1, 0, 2).reshape(num_gpus, -1)
    present = (a >= 1).astype(np.int64) @ (b >= 1).astype(np.int64).T  # [G, G]
    kept = sum((a >= t).astype(np.int64) @ (b >= t).astype(np.int64).T for t in range(1, top + 1))
    weight = present * (num_layers * c_old.sum(axis=2).max() + 1) + kept
    block = weight.reshape(num_nodes, gpn, num_nodes, gpn).transpose(0, 2, 1, 3)  # [N, N, gpn, gpn]
    inner = np.zeros((num_nodes, num_nodes, gpn), np.int64)
    node_weight = np.zeros((num_nodes, num_nodes), np.int64)
    for i in range(num_nodes):
        for j in range(num_nodes):
            inner[i, j], node_weight[i, j] = _max_assignment(block[i, j])
    node_relabel, _ = _max_assignment(node_weight)
    gpu_relabel = np.concatenate([node_relabel[i] * gpn + inner[i, node_relabel[i]]
                                  for i in range(num_nodes)])
    return gpu_relabel, node_relabel


def relabelled(old: Placement, new: Placement, topology: Topology) -> Placement:
    """``new`` with its GPUs relabelled onto ``old``'s (:func:`relabel_gpus`); same meaning."""
    g, s = new.num_gpus, new.slots_per_gpu
    gpu_relabel, _ = relabel_gpus(copies_per_gpu(old.physical_to_logical, g, old.num_experts),
                                  copies_per_gpu(new.physical_to_logical, g, new.num_experts),
                                  topology.num_nodes, topology.gpus_per_node)
    blocks = new.physical_to_logical.reshape(new.num_layers, g, s)
    out = np.empty_like(blocks)
    out[:, gpu_relabel] = blocks
    return Placement(out.reshape(new.num_layers, -1), s, new.num_experts)


# ---- packing ----------------------------------------------------------------------------------


def keep_in_place(old: Placement, target: Placement, load: np.ndarray, *, tolerance: float = 0.05) -> Placement:
    """``target``'s replica counts packed to keep ``old``'s experts on their GPUs.

    Per layer, a replica's load is its expert's load over its replica count:

    1. **Keep**: every replica an old GPU already holds, heaviest first, stays on that GPU while
       the GPU's load stays within ``(1 + tolerance)`` times the mean GPU load and its slots allow.
    2. **Fill**: the remaining replicas, heaviest first, go to the least-loaded GPU with a free
       slot that does not hold that expert. When every free slot is on a GPU holding it, a
       replica ``y`` of a GPU without it moves to the free slot (where ``y`` is not) and the
       expert takes its place; only an expert with more replicas than GPUs can end up twice on
       one GPU.

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
    if old.physical_to_logical.shape != target.physical_to_logical.shape or \
            old.slots_per_gpu != target.slots_per_gpu or old.num_experts != target.num_experts:
        raise InvalidInputError("the running placement has another shape than the re-solve's", source="--from")
    num_layers = old.num_layers
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
            _fill(rows, gpu_load, w, x, s)
        out[layer] = np.concatenate(rows)
    return check_placement(Placement(out, s, e))


def _fill(rows: list[list[int]], gpu_load: np.ndarray, w: np.ndarray, x: int, s: int) -> None:
    """Put one replica of ``x`` on a GPU without it (see :func:`keep_in_place`, step 2)."""
    g = len(rows)
    free = [gpu for gpu in range(g) if len(rows[gpu]) < s]
    without = [gpu for gpu in free if x not in rows[gpu]]
    if without:
        gpu = min(without, key=lambda k: (gpu_load[k], k))
        rows[gpu].append(x)
        gpu_load[gpu] += w[x]
        return
    for f in sorted(free, key=lambda k: (gpu_load[k], k)):  # every free GPU holds x: make room
        for h in sorted(range(g), key=lambda k: (gpu_load[k], k)):
            if len(rows[h]) < s or x in rows[h]:
                continue
            y = next((y for y in sorted(rows[h], key=lambda y: (w[y], y)) if y not in rows[f]), None)
            if y is None:
                continue
            rows[h].remove(y)
            rows[f].append(y)
            rows[h].append(x)
            gpu_load[h] += w[x] - w[y]
            gpu_load[f] += w[y]
            return
    gpu = min(free, key=lambda k: (gpu_load[k], k))  # more replicas of x than GPUs can hold once
    rows[gpu].append(x)
    gpu_load[gpu] += w[x]


# ---- the method -------------------------------------------------------------------------------


def solve_from(problem: PlacementProblem, method: str, current: Placement, *, horizon_s: float,
               time_limit_s: float | None = None, seed: int = 0, **options: Any) -> SolveResult:
    """Run ``method`` on ``problem`` and return the candidate of least movement-aware cost.

    ``current`` is the running placement (same shape as the problem's); ``horizon_s`` the seconds
    the new placement is expected to serve. Expert bytes come from ``problem.model``. The
    result's ``terms`` add ``step_ratio`` (``step(X) / step(current)``), ``move_seconds``,
    ``bytes_moved``, ``movement_cost`` and ``tolerance`` (-1: the method's own answer, -2: the
    running placement kept, -3: the answer's replicas packed for balance alone and relabelled), and the same figures of the method's own answer (``resolve_*``); ``objective`` is the movement-aware cost, and ``bound`` and
    ``gap`` are None (the method's bound covers its own objective, not this one).
    """
    if not horizon_s > 0 or not np.isfinite(horizon_s):
        raise InvalidInputError(f"must be positive seconds, got {horizon_s}", source="--horizon-s")
    topology, model = problem.topology, problem.model
    if (current.num_layers, current.num_experts, current.num_gpus, current.slots_per_gpu) != \
            (model.num_moe_layers, model.num_experts, topology.num_gpus, problem.slots_per_gpu):
        raise InvalidInputError(
            f"the running placement is [{current.num_layers} layers, {current.num_experts} experts] on "
            f"{current.num_gpus} GPUs x {current.slots_per_gpu} slots; this solve is [{model.num_moe_layers}, "
            f"{model.num_experts}] on {topology.num_gpus} x {problem.slots_per_gpu}", source="--from")
    start = time.perf_counter()
    result = solve(problem, method, time_limit_s=time_limit_s, seed=seed, **options)
    if result.placement is None:
        return result
    load = np.asarray(problem.stats.load, dtype=np.float64)
    expert_bytes = float(model.expert_weight_bytes)
    base = max(step_load(current, load), 1e-300)

    def score(cand: Placement) -> tuple[float, float, float, float]:
        seconds, nbytes = move_seconds(current, cand, topology, expert_bytes)
        ratio = step_load(cand, load) / base
        return ratio + seconds / horizon_s, ratio, seconds, nbytes

    resolved = relabelled(current, result.placement, topology)
    fresh = score(resolved)  # the method's answer as it is: reported beside the choice
    candidates = {k: p for k, p in ((-2.0, current), (-1.0, resolved)) if not doubled(p)}  # EPLB can double one
    for tol in TOLERANCES:
        candidates[tol] = keep_in_place(current, result.placement, load, tolerance=tol)
    # nothing kept (a cap of 0): the re-solve's replicas packed for balance alone, then relabelled
    candidates[-3.0] = relabelled(current, keep_in_place(current, result.placement, load, tolerance=-1.0), topology)
    scored = {key: fresh if key == -1.0 else score(cand) for key, cand in candidates.items()}
    best = min(scored, key=lambda k: (scored[k][0], scored[k][1], scored[k][3]))  # ties: balance, then bytes
    cost, ratio, seconds, nbytes = scored[best]
    placement = check_placement(candidates[best], model, topology, memory_limit_bytes=problem.memory_limit_bytes,
                                distinct_per_gpu=bool(problem.distinct_per_gpu))
    terms = {**result.terms, "step_ratio": ratio, "move_seconds": seconds, "bytes_moved": nbytes,
             "movement_cost": seconds / horizon_s, "tolerance": float(best),
             "resolve_step_ratio": fresh[1], "resolve_move_seconds": fresh[2], "resolve_bytes_moved": fresh[3]}
    return replace(result, placement=placement, objective=float(cost), terms=terms, bound=None, gap=None,
                   wall_time_s=time.perf_counter() - start)
