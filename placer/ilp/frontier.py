"""Exact frontier of inter-node dispatches against GPU load, with replicas, where layers are small.

Standard expert-parallel execution under the ``nearest`` dispatch rule (:mod:`placer.metrics.dispatch`)
on one or two nodes of one or two GPUs, every GPU holding distinct experts. There the two
numbers ``placer evaluate`` reports for a layer depend on the placement in a way that can be
enumerated:

- **Inter-node dispatches** (``inter_node_nodes``): with two nodes a token sends one RDMA
  message exactly when one of its experts has no copy in its home node, so a layer's count
  depends only on which experts each node holds (its *support*), through the sample's tokens
  grouped by (home node, expert set) and summed over subsets (a zeta transform).
- **Max GPU load** (``gpu_load`` from the statistics): a node serves ``load[e]`` of an expert it
  holds alone and ``load[e] / 2`` of one both nodes hold, split evenly over its copies (each GPU
  of a node of two sends its own share to its own copy, the other GPU's share to the node's other
  copy, and a node without the expert spreads its two ranks' shares over two copies one each),
  so no random draw of the rule's fair spread changes a GPU's load. In a node of two GPUs with
  ``spg`` slots each, experts held twice add half their traffic to each GPU and the others go
  to one GPU each, ``spg - doubled`` per GPU: the busiest GPU carries ``(T + |imbalance|) / 2``,
  minimised exactly over every choice of doubled experts and split.

Per layer every assignment of experts to "node 0 only", "node 1 only" or "both" whose supports
fit the nodes' slots is scored (``3**E`` of them, 6,561 for Mixtral's 8 experts); the layer's
Pareto points (max GPU load up, dispatches down) follow. A cap ``X`` on max/mean GPU load in
every layer leaves each layer its cheapest point under ``X``; the frontier is that total over
every cap where it changes (the worst layer's ratio on one axis, inter-node dispatches per
token-layer on the other). Both numbers are what :func:`placer.metrics.evaluate` reports for the
returned placement on the problem's statistics (its load, its token sample).

The space searched is placements whose GPUs hold distinct experts (a second copy of an expert
on the same GPU adds no node coverage and makes the rule's spread random); the result is the
optimum over that space, proven by enumeration.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from placer.errors import InfeasibleError, InvalidInputError
from placer.metrics.dispatch import sample_home_ranks
from placer.types import Placement, SolveResult

__all__ = ["MAX_WORK", "Frontier", "LayerFrontier", "enumeration_size", "exact_frontier", "frontier_refusal",
           "frontier_rows", "placement_at", "placement_under", "solve_frontier"]

MAX_WORK = 200_000_000
"""Largest enumeration (layers x (node assignments + node splits scored)) the exact frontier starts."""

_TOL = 1e-12


@dataclass(frozen=True)
class LayerFrontier:
    """Pareto points of one layer, by increasing max GPU load.

    ``max_load`` float64 [n]: token-slots on the busiest GPU; ``ratio`` float64 [n]: that over the
    mean GPU load; ``dispatches`` int64 [n]: inter-node sends of the sample's tokens (decreasing);
    ``state`` int64 [n]: the node assignment (base-3 digits per expert: 0 node 0 only, 1 node 1
    only, 2 both).
    """

    max_load: np.ndarray
    ratio: np.ndarray
    dispatches: np.ndarray
    state: np.ndarray


@dataclass(frozen=True)
class Frontier:
    """The whole curve.

    ``load_cap`` float64 [P]: the per-layer max/mean cap of each point, increasing (the worst
    layer's ratio there); ``inter_node`` float64 [P]: inter-node dispatches per token-layer,
    decreasing; ``load_median`` float64 [P]: the median layer's ratio; ``choice`` int64 [P, L]:
    each layer's Pareto point; ``layers``: the per-layer points; ``mean_load`` float64 [L]; and
    the shape it was computed for.
    """

    load_cap: np.ndarray
    inter_node: np.ndarray
    load_median: np.ndarray
    choice: np.ndarray
    layers: tuple[LayerFrontier, ...]
    mean_load: np.ndarray
    num_tokens: int
    num_experts: int
    num_nodes: int
    gpus_per_node: int
    slots_per_gpu: int
    node_rows: np.ndarray  # int16 [L, 3**E]: best split of each node code (see _node_tables)

    def point(self, load_cap: float | None = None) -> int:
        """Index of the point with the fewest dispatches at max/mean <= ``load_cap`` in every layer
        (the first, most balanced, point when None). Raises InfeasibleError below the first cap."""
        if load_cap is None:
            return 0
        first = float(self.load_cap[0])
        if load_cap < first * (1 - _TOL):
            worst = int(np.argmax([lf.ratio[0] for lf in self.layers]))
            raise InfeasibleError(f"no placement keeps max/mean GPU load <= {load_cap:g} in every layer: layer "
                                  f"{worst} cannot go below {first:.4f}; the frontier starts there")
        return int(np.searchsorted(self.load_cap, load_cap * (1 + _TOL), side="right") - 1)


# --------------------------------------------------------------------------------------------
# Domain and size
# --------------------------------------------------------------------------------------------


def _support_range(num_experts: int, gpus_per_node: int, slots_per_gpu: int) -> tuple[int, int]:
    """Smallest and largest number of distinct experts one node can hold (each 1..gpn copies)."""
    slots = gpus_per_node * slots_per_gpu
    return -(-slots // gpus_per_node), min(slots, num_experts)


def _split_rows(size: int, gpus_per_node: int, slots_per_gpu: int) -> np.ndarray:
    """Every way to split a node's ``size`` distinct experts over its GPUs, as signs. int8 [m, size].

    One GPU: a single row of ones (the GPU holds them all). Two GPUs: ``K - size`` experts are
    held by both (sign 0), the rest split ``spg - doubled`` per GPU (+1 first GPU, -1 second);
    the first single is on the first GPU (the mirror split has the same imbalance).
    """
    if gpus_per_node == 1:
        return np.ones((1, size), dtype=np.int8)
    doubled = 2 * slots_per_gpu - size
    per_gpu = slots_per_gpu - doubled
    rows = []
    for both in combinations(range(size), doubled):
        rest = [i for i in range(size) if i not in both]
        for first in combinations(rest[1:], per_gpu - 1) if per_gpu else [()]:
            row = np.zeros(size, dtype=np.int8)
            if per_gpu:
                row[rest] = -1
                row[[rest[0], *first]] = 1
            rows.append(row)
    return np.array(rows, dtype=np.int8).reshape(len(rows), size)


def _num_rows(size: int, gpus_per_node: int, slots_per_gpu: int) -> int:
    if gpus_per_node == 1:
        return 1
    doubled = 2 * slots_per_gpu - size
    singles = size - doubled
    return math.comb(size, doubled) * (math.comb(singles - 1, singles // 2 - 1) if singles else 1)


def enumeration_size(num_experts: int, num_nodes: int, gpus_per_node: int, slots_per_gpu: int,
                     num_layers: int) -> int:
    """Work of :func:`exact_frontier`: layers x (node assignments + node splits scored)."""
    lo, hi = _support_range(num_experts, gpus_per_node, slots_per_gpu)
    splits = sum(math.comb(num_experts, a) * 2 ** a * _num_rows(a, gpus_per_node, slots_per_gpu)
                 for a in range(lo, hi + 1))
    states = 3 ** num_experts if num_nodes == 2 else 1
    return num_layers * (states + splits)


def frontier_refusal(problem) -> str | None:
    """Why the exact frontier cannot run on ``problem`` (one line, naming what to use), or None."""
    topo, model, stats = problem.topology, problem.model, problem.stats
    instead = "; use --method placer (the joint local search) instead"
    if problem.execution != "standard":
        return "the exact frontier is for standard execution (--execution standard)"
    if problem.dispatch != "nearest":
        return (f"the exact frontier scores dispatch nearest only (got {problem.dispatch}: its replica choice "
                f"is not a function of the node supports){instead}")
    if topo.num_nodes > 2 or topo.gpus_per_node > 2:
        return (f"the exact frontier covers 1 or 2 nodes of 1 or 2 GPUs (where the dispatch rule's spread "
                f"is deterministic); this cluster has {topo.num_nodes} nodes x {topo.gpus_per_node} GPUs{instead}")
    if problem.slots_per_gpu > model.num_experts:
        return f"{problem.slots_per_gpu} slots per GPU cannot hold distinct experts (E={model.num_experts}){instead}"
    if stats.sample_size == 0 and topo.num_nodes == 2:
        return "the exact frontier counts inter-node dispatches per token: the input is load-only (no token sample)"
    work = enumeration_size(model.num_experts, topo.num_nodes, topo.gpus_per_node, problem.slots_per_gpu,
                            model.num_moe_layers)
    if work > MAX_WORK:
        return (f"too large for the exact frontier: {model.num_experts} experts on {topo.num_nodes} node(s) x "
                f"{topo.gpus_per_node} GPU(s) x {problem.slots_per_gpu} slots over {model.num_moe_layers} layers "
                f"need {work:,} enumeration steps (limit {MAX_WORK:,}){instead}")
    return None


# --------------------------------------------------------------------------------------------
# Node tables and token counts
# --------------------------------------------------------------------------------------------


def _node_tables(load: np.ndarray, gpus_per_node: int, slots_per_gpu: int,
                 num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Busiest-GPU load of a node for every node code, minimised over the node's splits.

    ``load`` float64 [L, E]. A node code (base 3, one digit per expert) says, per expert, 0: not
    held, 1: held by this node only, 2: held by both nodes. Returns ``best`` float64 [L, 3**E]
    (``inf`` where the code's support does not fit the node) and ``row`` int16 [L, 3**E]: the
    index of the best split into :func:`_split_rows` of the support's size.
    """
    num_layers, num_experts = load.shape
    lo, hi = _support_range(num_experts, gpus_per_node, slots_per_gpu)
    best = np.full((num_layers, 3 ** num_experts), np.inf)
    row = np.zeros((num_layers, 3 ** num_experts), dtype=np.int16)
    powers = 3 ** np.arange(num_experts, dtype=np.int64)
    for size in range(lo, hi + 1):
        signs = _split_rows(size, gpus_per_node, slots_per_gpu).astype(np.float64)   # [m, a]
        shared = (np.arange(2 ** size)[:, None] >> np.arange(size)[None, :]) & 1     # [2^a, a]
        divide = 1.0 + shared if num_nodes == 2 else np.ones_like(shared, dtype=np.float64)
        for support in combinations(range(num_experts), size):
            idx = list(support)
            codes = ((1 + shared) * powers[idx][None, :]).sum(axis=1)                  # [2^a]
            traffic = load[:, None, idx] / divide[None, :, :]                           # [L, 2^a, a]
            total = traffic.sum(axis=2)
            if gpus_per_node == 1:
                best[:, codes] = total
                continue
            imbalance = np.abs(traffic @ signs.T)                                      # [L, 2^a, m]
            pick = np.argmin(imbalance, axis=2)
            best[:, codes] = (total + np.take_along_axis(imbalance, pick[:, :, None], axis=2)[:, :, 0]) / 2
            row[:, codes] = pick
    return best, row


def _token_masks(problem) -> np.ndarray:
    """Sample tokens by (layer, home node, expert set). int64 [L, N, 2**E]."""
    stats, topo = problem.stats, problem.topology
    num_layers, num_experts = stats.load.shape
    out = np.zeros((num_layers, topo.num_nodes, 2 ** num_experts), dtype=np.int64)
    if stats.sample_size == 0:
        return out
    ids = np.asarray(stats.sample_ids, dtype=np.int64)                                  # [T, L, K]
    home = sample_home_ranks(stats, topo.num_gpus)
    node = home // topo.gpus_per_node                                                   # [T]
    masks = np.bitwise_or.reduce(np.left_shift(1, ids), axis=2)                         # [T, L]
    for layer in range(num_layers):
        np.add.at(out[layer], (node, masks[:, layer]), 1)
    return out


def _subset_sums(counts: np.ndarray, num_experts: int) -> np.ndarray:
    """Zeta transform over the last axis: ``out[..., A] = sum of counts[..., M]`` over ``M`` within ``A``."""
    out = counts.copy()
    full = 2 ** num_experts
    for bit in range(num_experts):
        step = 1 << bit
        view = out.reshape(*out.shape[:-1], full // (2 * step), 2, step)
        view[..., 1, :] += view[..., 0, :]
    return out


def _states(num_experts: int, num_nodes: int) -> np.ndarray:
    """Every node assignment as base-3 digits. int8 [3**E, E] (two nodes) or [1, E] of 0 (one node)."""
    if num_nodes == 1:
        return np.zeros((1, num_experts), dtype=np.int8)
    n = np.arange(3 ** num_experts, dtype=np.int64)
    return ((n[:, None] // 3 ** np.arange(num_experts)[None, :]) % 3).astype(np.int8)


# --------------------------------------------------------------------------------------------
# The frontier
# --------------------------------------------------------------------------------------------


def _pareto(max_load: np.ndarray, cost: np.ndarray, feasible: np.ndarray) -> np.ndarray:
    """Indices of the Pareto points (load up, cost strictly down) among ``feasible`` ones."""
    idx = np.flatnonzero(feasible)
    order = idx[np.lexsort((idx, cost[idx], max_load[idx]))]
    running = np.minimum.accumulate(cost[order])
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = running[1:] < running[:-1]
    return order[keep]


def exact_frontier(problem) -> Frontier:
    """The exact frontier of ``problem`` (see the module docstring).

    Raises InvalidInputError with :func:`frontier_refusal`'s line when the shape is outside its
    domain or its enumeration is larger than :data:`MAX_WORK`.
    """
    why = frontier_refusal(problem)
    if why is not None:
        raise InvalidInputError(why, source="--method exact")
    topo, stats = problem.topology, problem.stats
    num_nodes, gpn, spg = topo.num_nodes, topo.gpus_per_node, problem.slots_per_gpu
    load = np.asarray(stats.load, dtype=np.float64)                                     # [L, E]
    num_layers, num_experts = load.shape
    best, rows = _node_tables(load, gpn, spg, num_nodes)                                # [L, 3^E]
    states = _states(num_experts, num_nodes)                                            # [S, E]
    digit = states.astype(np.int64)
    powers = 3 ** np.arange(num_experts, dtype=np.int64)
    bits = 1 << np.arange(num_experts, dtype=np.int64)
    # Node 0 holds experts of digit 0 (alone) and 2 (with node 1); node 1 those of digit 1 and 2.
    code0 = (np.where(digit == 0, 1, np.where(digit == 2, 2, 0)) * powers).sum(axis=1)   # [S]
    support0 = ((digit != 1) * bits).sum(axis=1)
    code1 = (np.where(digit == 1, 1, np.where(digit == 2, 2, 0)) * powers).sum(axis=1)
    support1 = ((digit != 0) * bits).sum(axis=1)
    covered = _subset_sums(_token_masks(problem), num_experts)                          # [L, N, 2^E]
    tokens = stats.sample_size
    mean = load.sum(axis=1) / topo.num_gpus
    layers = []
    for layer in range(num_layers):
        if num_nodes == 2:
            ml = np.maximum(best[layer, code0], best[layer, code1])
            cost = tokens - covered[layer, 0, support0] - covered[layer, 1, support1]
        else:
            ml = best[layer, code0]
            cost = np.zeros(len(states), dtype=np.int64)
        keep = _pareto(ml, cost, np.isfinite(ml))
        if not len(keep):  # cannot happen: PlacementProblem checked that the slots fit
            raise InvalidInputError(f"layer {layer}: no node assignment fits the slots", source="--redundant")
        ratio = ml[keep] / mean[layer] if mean[layer] > 0 else np.ones(len(keep))
        layers.append(LayerFrontier(max_load=ml[keep], ratio=ratio, dispatches=cost[keep].astype(np.int64),
                                    state=keep.astype(np.int64)))
    caps = np.unique(np.concatenate([lf.ratio for lf in layers]))
    caps = caps[caps >= max(lf.ratio[0] for lf in layers)]
    choice = np.stack([np.searchsorted(lf.ratio, caps * (1 + _TOL), side="right") - 1 for lf in layers], axis=1)
    totals = np.array([sum(int(layers[li].dispatches[c]) for li, c in enumerate(row)) for row in choice])
    keep_cap = np.ones(len(caps), dtype=bool)
    keep_cap[1:] = totals[1:] < totals[:-1]
    choice, caps, totals = choice[keep_cap], caps[keep_cap], totals[keep_cap]
    ratios = np.array([[layers[li].ratio[c] for li, c in enumerate(row)] for row in choice])
    return Frontier(load_cap=caps, inter_node=totals / max(tokens * num_layers, 1),
                    load_median=np.median(ratios, axis=1), choice=choice, layers=tuple(layers), mean_load=mean,
                    num_tokens=tokens, num_experts=num_experts, num_nodes=num_nodes, gpus_per_node=gpn,
                    slots_per_gpu=spg, node_rows=rows)


def _node_gpus(code_digits: np.ndarray, row: int, gpus_per_node: int, slots_per_gpu: int) -> list[list[int]]:
    """The experts of each GPU of one node (ascending), from its code digits [E] and split row."""
    support = [int(e) for e in np.flatnonzero(code_digits > 0)]
    if gpus_per_node == 1:
        return [support]
    signs = _split_rows(len(support), gpus_per_node, slots_per_gpu)[row]
    first = [e for e, s in zip(support, signs, strict=True) if s >= 0]
    second = [e for e, s in zip(support, signs, strict=True) if s <= 0]
    return [first, second]


def placement_at(frontier: Frontier, index: int) -> Placement:
    """The placement of frontier point ``index``: int32 ``physical_to_logical [L, P]``, GPUs in node order."""
    return _placement_of(frontier, frontier.choice[index])


def placement_under(frontier: Frontier, max_load: np.ndarray) -> Placement:
    """Per layer the Pareto point with the fewest inter-node dispatches whose busiest GPU serves
    at most ``max_load[l]`` token-slots (float [L], the statistics' units), else the layer's most
    balanced point: the exact optimum at a given placement's own per-layer load."""
    choice = [max(0, int(np.searchsorted(lf.max_load, float(cap) * (1 + _TOL) + _TOL, side="right")) - 1)
              for lf, cap in zip(frontier.layers, max_load, strict=True)]
    return _placement_of(frontier, np.asarray(choice, dtype=np.int64))


def _placement_of(frontier: Frontier, choice: np.ndarray) -> Placement:
    """The placement of each layer's Pareto point ``choice`` int [L]."""
    e, spg, gpn = frontier.num_experts, frontier.slots_per_gpu, frontier.gpus_per_node
    powers = 3 ** np.arange(e, dtype=np.int64)
    rows = []
    for layer, c in enumerate(choice):
        digit = (int(frontier.layers[layer].state[c]) // powers) % 3 if frontier.num_nodes == 2 else np.zeros(e, int)
        p2l: list[int] = []
        for node in range(frontier.num_nodes):
            # Node n holds the experts of digit n alone (code digit 1) and those of digit 2 shared.
            code = np.where(digit == node, 1, np.where(digit == 2, 2, 0))
            value = int((code * powers).sum())
            for gpu in _node_gpus(code, int(frontier.node_rows[layer, value]), gpn, spg):
                assert len(gpu) == spg, (layer, node, gpu)
                p2l.extend(gpu)
        rows.append(p2l)
    return Placement(np.asarray(rows, dtype=np.int32), spg, e)


def frontier_rows(frontier: Frontier) -> list[dict[str, float]]:
    """The curve as rows: ``load_cap``, ``load_median``, ``inter_node_per_token_layer``."""
    return [{"load_cap": float(c), "load_median": float(m), "inter_node_per_token_layer": float(d)}
            for c, m, d in zip(frontier.load_cap, frontier.load_median, frontier.inter_node, strict=True)]


def solve_frontier(problem, *, load_cap: float | None = None) -> SolveResult:
    """Method ``exact`` in standard execution: the point of the exact frontier at ``load_cap``.

    Returns the placement with the fewest inter-node dispatches per token-layer among those whose
    every layer keeps max/mean GPU load <= ``load_cap`` (without a cap: the smallest cap every
    layer can meet). ``objective`` = ``bound`` = those dispatches (status ``optimal``, gap 0);
    ``terms`` hold the point (``load_cap``, ``load_max_over_mean_worst`` / ``_median``,
    ``inter_node_per_token_layer``) and the whole curve as ``frontier_{i}_load_cap``,
    ``frontier_{i}_load_median`` and ``frontier_{i}_inter_node`` for ``i < frontier_points``.
    """
    start = time.perf_counter()
    if load_cap is not None and (not math.isfinite(load_cap) or load_cap < 1.0):
        raise InvalidInputError(f"the load cap is a max/mean ratio >= 1, got {load_cap}", source="--load-cap")
    frontier = exact_frontier(problem)
    index = frontier.point(load_cap)
    placement = placement_at(frontier, index)
    ratios = np.array([frontier.layers[li].ratio[c] for li, c in enumerate(frontier.choice[index])])
    value = float(frontier.inter_node[index])
    terms = {"load_cap": float(frontier.load_cap[index]) if load_cap is None else float(load_cap),
             "load_cap_min": float(frontier.load_cap[0]), "load_max_over_mean_worst": float(ratios.max()),
             "load_max_over_mean_median": float(np.median(ratios)), "inter_node_per_token_layer": value,
             "frontier_points": float(len(frontier.load_cap)), "sample_tokens": float(frontier.num_tokens)}
    for i, row in enumerate(frontier_rows(frontier)):
        terms[f"frontier_{i}_load_cap"] = row["load_cap"]
        terms[f"frontier_{i}_load_median"] = row["load_median"]
        terms[f"frontier_{i}_inter_node"] = row["inter_node_per_token_layer"]
    return SolveResult(placement=placement, status="optimal", objective=value, terms=terms, bound=value, gap=0.0,
                       wall_time_s=time.perf_counter() - start, method="exact", backend="numpy-frontier")
