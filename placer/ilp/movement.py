"""Movement-aware re-placement: a re-solve weighed, layer by layer, against the weights it moves.

A re-solve on new load (EPLB's, placer's) re-partitions experts over GPUs whenever the load order
changes, so most slots change after a small shift, and a shift that is noise moves weights for
nothing. :func:`solve_from` runs the method, then builds each layer of the answer from one of:

- the running placement ``A`` (a GPU holding two copies of an expert that has no more replicas
  than GPUs hands one to a GPU without it, :func:`keep_in_place` of ``A`` onto itself);
- the method's answer ``B`` relabelled onto ``A``'s GPUs to keep the most weights
  (:func:`relabel_gpus`: one node permutation and GPU permutations inside nodes, so ``B``'s
  node layout, and with it its traffic, is kept), its doubled copies moved the same way;
- ``B``'s replica counts packed to keep ``A``'s experts in place (:func:`keep_in_place` at the
  tolerances :data:`TOLERANCES`), or packed for balance alone and relabelled.

Each layer is scored by the problem's objective (:func:`placer.ilp.objective.evaluate_objective`:
balance, and the traffic and affinity terms where the statistics carry a token sample; not the
penalty of placer's balance cap, which is relative to EPLB's answer on this window), and the
moves by

    cost = J(X) / J(A) + move_s(X) / horizon_s

- ``J``: the objective summed over layers;
- ``move_s(X)``: the slowest GPU's receive time for the experts it lacks (one transfer per
  (layer, GPU, expert); over NVLink when a GPU of its node held the expert, else over the NIC):
  serving loses about that much while the weights move, amortised over the ``horizon_s`` seconds
  the new placement is expected to serve (``placer serve --horizon``; the rule serve publishes by).

For ``placer`` in standard execution (:func:`anchored_search`) ``B`` is itself movement-aware:
the method's local search starts from ``A`` (undoubled), no move puts two copies of an expert
on one GPU, and every (layer, GPU, expert) the search places where ``A`` does not hold it adds
:func:`anchor_cost` to the searched energy (the expert's bytes over the cheapest link, NVLink
when ``A`` holds it in the node, weighted by ``J(A) / horizon_s``, plus a noise floor of
``move_floor`` (:data:`MOVE_FLOOR`) of the layer's objective per expert moved). Such a ``B``
keeps most of ``A`` and moves experts only where they buy balance or traffic; the repacked rows
(for methods that know nothing of ``A``) are then not built.

Starting from ``A`` everywhere, layers switch to their best row, largest gain first, while the
cost falls (the affinity term of context-coherent execution couples adjacent layers, so there
the per-layer scores guide the choice and the result is scored again as a whole); a layer switches only when its own objective falls by more than ``min_gain`` (a
fraction, default :data:`MIN_GAIN`): a re-solve fitted to one window also fits its noise, and a
move that gains less than the noise is paid for and lost on the next window. No layer holds two
copies of an expert on one GPU unless that expert has more replicas than there are GPUs.

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
from placer.ilp.packing import keep_in_place
from placer.types import Placement, SolveResult, Topology
from placer.validate import check_placement

__all__ = ["MOVE_FLOOR", "TOLERANCES", "anchor_cost", "anchored_search", "copies_per_gpu", "doubled", "gpu_balance",
           "keep_in_place", "move_seconds", "relabel_gpus", "solve_from", "step_load"]

TOLERANCES = (0.0, 0.05, 0.2, 1.0)
"""Tolerances of :func:`keep_in_place` tried by :func:`solve_from` (0: pack for balance)."""
MIN_GAIN = 0.05
"""A layer moves only when its objective falls by more than this fraction (:func:`solve_from`)."""
MOVE_FLOOR = 0.03
"""Of an anchored search (:func:`anchor_cost`): each expert moved must buy this fraction of its
layer's objective (0.01 moved 21.8 GB per re-placement on the Mixtral history of
``benchmarks/bench_rebalance.py``, 0.03 15.2 GB, at the same next-window balance)."""


# ---- counting ---------------------------------------------------------------------------------


def copies_per_gpu(p2l: np.ndarray, num_gpus: int, num_experts: int) -> np.ndarray:
    """Copies of each expert on each GPU. ``p2l: [L, P]`` -> int64 [L, G, E]."""
    num_layers, num_slots = p2l.shape
    layer = np.repeat(np.arange(num_layers), num_slots)
    gpu = np.tile(np.arange(num_slots) // (num_slots // num_gpus), num_layers)
    flat = (layer * num_gpus + gpu) * num_experts + np.asarray(p2l, dtype=np.int64).ravel()
    counts = np.bincount(flat, minlength=num_layers * num_gpus * num_experts)
    return counts.reshape(num_layers, num_gpus, num_experts)


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


def receive_seconds(old: Placement, new: Placement, topology: Topology, expert_bytes: float, *,
                    old_held: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per layer and GPU, the seconds and bytes to receive ``new``'s experts it lacks under ``old``.

    One transfer per (layer, GPU, expert) the GPU lacks (further copies are local); received over
    NVLink when a GPU of the same node held the expert, else over the NIC. ``old_held`` (bool
    [L, G, E], ``copies_per_gpu(old) > 0``) may be passed when many ``new`` are compared with one
    ``old``. Returns float64 ``[L, G]`` seconds and ``[L, G]`` bytes.
    """
    g, gpn = old.num_gpus, topology.gpus_per_node
    c_old = copies_per_gpu(old.physical_to_logical, g, old.num_experts) > 0 if old_held is None else old_held
    c_new = copies_per_gpu(new.physical_to_logical, g, new.num_experts) > 0
    need = c_new & ~c_old  # [L, G, E]
    on_node = c_old.reshape(c_old.shape[0], g // gpn, gpn, -1).any(2)  # [L, N, E]
    local = np.repeat(on_node, gpn, axis=1)  # [L, G, E]: a GPU of this GPU's node held it
    intra = (need & local).sum(2) * float(expert_bytes)
    inter = (need & ~local).sum(2) * float(expert_bytes)
    seconds = transfer_seconds(intra, topology.nvlink_gbps) + transfer_seconds(inter, topology.nic_gbps)
    return seconds, intra + inter


def move_seconds(old: Placement, new: Placement, topology: Topology, expert_bytes: float) -> tuple[float, float]:
    """(seconds, bytes) to bring ``new``'s experts to GPUs that lack them under ``old``: the
    slowest GPU's receive time over all layers (:func:`receive_seconds`), and the bytes."""
    seconds, nbytes = receive_seconds(old, new, topology, expert_bytes)
    return float(seconds.sum(0).max(initial=0.0)), float(nbytes.sum())


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

    def common(t: int) -> np.ndarray:  # [G, G] (layer, expert) pairs with >= t copies on both GPUs
        # float64 products are exact here (counts below 2**53) and take BLAS, int64 ones do not
        return np.rint((a >= t).astype(np.float64) @ (b >= t).astype(np.float64).T).astype(np.int64)

    present = common(1)
    kept = sum(common(t) for t in range(1, top + 1))
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


# ---- the method -------------------------------------------------------------------------------


def anchored_search(method: str, problem: PlacementProblem) -> bool:
    """Whether :func:`solve_from` runs ``method`` anchored on the running placement (``placer`` in
    standard execution: its search carries the movement term, :func:`anchor_cost`)."""
    return method == "placer" and problem.execution == "standard"


def anchor_cost(problem: PlacementProblem, anchor: Placement, layer_objective: np.ndarray, *,
                horizon_s: float, move_floor: float = MOVE_FLOOR) -> np.ndarray:
    """The movement term of an anchored search: the cost of GPU g holding expert e in layer l.

    0 where ``anchor`` holds it; else, in the objective's units (seconds per batch token)::

        J(anchor) * receive_s / horizon_s  +  move_floor * J_l(anchor)

    ``receive_s``: the expert's bytes over NVLink when a GPU of g's node holds it (the cheapest
    source), else over the NIC; ``J``, ``J_l``: the anchor's objective summed over layers and of
    layer l (``layer_objective`` [L]). The first part is :func:`solve_from`'s cost (``move_s /
    horizon_s`` relative to ``J``) with the slowest GPU's receive time bounded by the sum over
    GPUs; the second, the noise floor, makes each expert moved buy a ``move_floor`` fraction of
    its layer's objective: a re-solve on one window also fits the window's sampling noise, and a
    gain below it is paid for and lost on the next window. Returns float64 [L, G, E].
    """
    topology = problem.topology
    g, gpn, e = anchor.num_gpus, topology.gpus_per_node, anchor.num_experts
    held = copies_per_gpu(anchor.physical_to_logical, g, e) > 0  # [L, G, E]
    on_node = np.repeat(held.reshape(held.shape[0], g // gpn, gpn, e).any(2), gpn, axis=1)
    expert_bytes = float(problem.model.expert_weight_bytes)
    receive = np.where(on_node, transfer_seconds(expert_bytes, topology.nvlink_gbps),
                       transfer_seconds(expert_bytes, topology.nic_gbps))
    j_l = np.maximum(np.asarray(layer_objective, dtype=np.float64), 0.0)
    cost = float(j_l.sum()) * receive / horizon_s + move_floor * j_l[:, None, None]
    return np.where(held, 0.0, cost)


def solve_from(problem: PlacementProblem, method: str, current: Placement, *, horizon_s: float,
               min_gain: float = MIN_GAIN, move_floor: float | None = MOVE_FLOOR,
               time_limit_s: float | None = None, seed: int = 0, **options: Any) -> SolveResult:
    """Run ``method`` on ``problem`` and build its answer layer by layer from ``current`` (see the
    module docstring).

    ``current`` is the running placement (same shape as the problem's); ``horizon_s`` the seconds
    the new placement is expected to serve; ``min_gain`` the fraction a layer's objective must
    fall by for it to move; ``move_floor`` the noise floor of an anchored search
    (:func:`anchor_cost`; ``None``: run the method unanchored, as other methods always are).
    Expert bytes come from ``problem.model``. The result's ``objective``
    is the cost; its ``terms`` add ``objective_ratio`` (``J(X) / J(current)``), ``step_ratio``
    (the sum of the layers' bottleneck GPU loads, :func:`step_load`, over the running one's),
    ``move_seconds``, ``bytes_moved``, ``movement_cost``, and the layers kept, taken from the
    method's answer and repacked (``layers_kept``, ``layers_resolved``, ``layers_repacked``), the
    candidate placements scored (``candidates``: 2 anchored, else 7; fewer when ``time_limit_s``,
    wall time from the call, ran out: the repacked ones are scored while one more and the final
    scoring fit), and the same ratios and movement for the method's answer as it is
    (``resolve_*``; anchored, that answer already weighs the movement, and ``movement_term`` is
    its anchor cost). ``bound`` and ``gap`` are None (the method's bound covers its own
    objective, not this one).
    """
    from placer.ilp.objective import (  # deferred: objective imports the metrics
        evaluate_objective,
        objective_weights,
        reference_ratio,
    )

    if not horizon_s > 0 or not np.isfinite(horizon_s):
        raise InvalidInputError(f"must be positive seconds, got {horizon_s}", source="--horizon-s")
    if not 0 <= min_gain < 1:
        raise InvalidInputError(f"must be a fraction in [0, 1), got {min_gain}", source="min_gain")
    if move_floor is not None and not (move_floor >= 0 and np.isfinite(move_floor)):
        raise InvalidInputError(f"must be a non-negative fraction, got {move_floor}", source="move_floor")
    topology, model = problem.topology, problem.model
    if (current.num_layers, current.num_experts, current.num_gpus, current.slots_per_gpu) != \
            (model.num_moe_layers, model.num_experts, topology.num_gpus, problem.slots_per_gpu):
        raise InvalidInputError(
            f"the running placement is [{current.num_layers} layers, {current.num_experts} experts] on "
            f"{current.num_gpus} GPUs x {current.slots_per_gpu} slots; this solve is [{model.num_moe_layers}, "
            f"{model.num_experts}] on {topology.num_gpus} x {problem.slots_per_gpu}", source="--from")
    start = time.perf_counter()
    load = np.asarray(problem.stats.load, dtype=np.float64)
    expert_bytes = float(model.expert_weight_bytes)
    weights = objective_weights(problem)  # once for every candidate
    reference = reference_ratio(problem) if weights["balance_cap"] is not None else None

    def layer_objective(cand: Placement) -> np.ndarray:  # [L]
        ev = evaluate_objective(problem, cand, weights=weights, reference=reference)
        return sum(ev["per_layer"][k] for k in ("balance", "traffic", "affinity"))

    kept = _undoubled(current, load)
    anchored = move_floor is not None and anchored_search(method, problem)
    j_kept: np.ndarray | None = None
    if anchored:
        j_kept = layer_objective(kept)
        cost = anchor_cost(problem, kept, j_kept, horizon_s=horizon_s, move_floor=float(move_floor or 0.0))
        # no move of the search puts two copies of an expert on one GPU, where the anchor has none
        # (an expert with more replicas than GPUs must be doubled somewhere)
        single = int(copies_per_gpu(kept.physical_to_logical, kept.num_gpus, kept.num_experts).max()) <= 1
        sub = replace(problem, distinct_per_gpu=True) if single and not problem.distinct_per_gpu else problem
        result = solve(sub, method, time_limit_s=time_limit_s, seed=seed, anchor=kept, anchor_cost=cost,
                       **options)
    else:
        result = solve(problem, method, time_limit_s=time_limit_s, seed=seed, **options)
    if result.placement is None:
        return result
    resolved = relabelled(current, result.placement, topology)

    def repacked():  # the method's replica counts packed into the running placement
        yield relabelled(current, keep_in_place(current, result.placement, load, tolerance=-1.0), topology)
        for t in TOLERANCES:
            yield keep_in_place(current, result.placement, load, tolerance=t)

    # candidate placements; row l of any of them is a valid layer l. Scored one after the other
    # (the counting kernel already runs on every core, placer.metrics.core.count_threads); under a
    # time limit the repacked ones only while one more and the final scoring still fit.
    cands = [kept, _undoubled(resolved, load)]
    t_scored = time.perf_counter()
    scored = [layer_objective(c) for c in (cands if j_kept is None else cands[1:])]
    each = (time.perf_counter() - t_scored) / len(scored)
    deadline = None if time_limit_s is None else start + float(time_limit_s)
    for cand in ([] if anchored else repacked()):
        if deadline is not None and time.perf_counter() + 2 * each > deadline:
            break
        cands.append(cand)
        scored.append(layer_objective(cand))
    j = np.stack(scored if j_kept is None else [j_kept, *scored])  # [C, L]
    held = copies_per_gpu(current.physical_to_logical, current.num_gpus, current.num_experts) > 0
    sec = [receive_seconds(current, c, topology, expert_bytes, old_held=held)[0] for c in cands]  # [L, G] each
    j_ref = max(float(j[0].sum()), 1e-300)
    choice = np.zeros(current.num_layers, np.int64)  # every layer kept
    gpu_s = sec[0].sum(0)
    best = np.argmin(j[1:], axis=0) + 1  # each layer's best other row
    gain = j[0] - j[best, np.arange(current.num_layers)]
    for layer in np.argsort(-gain, kind="stable").tolist():
        b = int(best[layer])
        if not gain[layer] > min_gain * abs(j[0, layer]):
            continue
        trial = gpu_s - sec[0][layer] + sec[b][layer]
        delta = -gain[layer] / j_ref + (trial.max() - gpu_s.max()) / horizon_s
        if delta < 0:
            choice[layer], gpu_s = b, trial
    rows = np.stack([cands[int(c)].physical_to_logical[i] for i, c in enumerate(choice)])
    placement = check_placement(Placement(rows, current.slots_per_gpu, current.num_experts), model, topology,
                                memory_limit_bytes=problem.memory_limit_bytes,
                                distinct_per_gpu=bool(problem.distinct_per_gpu))
    seconds, nbytes = move_seconds(current, placement, topology, expert_bytes)
    # scored again as a whole: the affinity term (context-coherent execution) couples adjacent
    # layers, so the rows' scores need not add up to the assembled placement's
    ev = evaluate_objective(problem, placement, weights=weights, reference=reference)
    ratio = float(sum(ev[k] for k in ("balance", "traffic", "affinity"))) / j_ref
    base = max(step_load(current, load), 1e-300)
    fresh_s, fresh_b = move_seconds(current, resolved, topology, expert_bytes)
    terms = {**result.terms, "objective_ratio": ratio, "step_ratio": step_load(placement, load) / base,
             "move_seconds": seconds, "bytes_moved": nbytes, "movement_cost": seconds / horizon_s,
             "layers_kept": float(np.sum(choice == 0)), "layers_resolved": float(np.sum(choice == 1)),
             "layers_repacked": float(np.sum(choice >= 2)), "candidates": float(len(cands)),
             "resolve_objective_ratio": float(j[1].sum()) / j_ref, "resolve_step_ratio": step_load(resolved, load) / base,
             "resolve_move_seconds": fresh_s, "resolve_bytes_moved": fresh_b}
    return replace(result, placement=placement, objective=ratio + seconds / horizon_s, terms=terms, bound=None,
                   gap=None, wall_time_s=time.perf_counter() - start)


def _undoubled(placement: Placement, load: np.ndarray) -> Placement:
    """``placement`` with each doubled copy (see :func:`doubled`) moved to a GPU without it."""
    if not doubled(placement):
        return placement
    return keep_in_place(placement, placement, load, tolerance=float("inf"))
