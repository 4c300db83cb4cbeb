"""Per-layer local search of the ``placer`` method (driver around :mod:`placer.ilp._ls_kernel`).

In standard execution the objective is a sum over layers and each layer's terms depend only on
that layer's placement (under the expected-dispatch model of :mod:`placer.ilp._ls_kernel`), so
every layer is an independent subproblem: :class:`LayerTask` in, :class:`LayerResult` out, with
its random stream keyed by ``(seed, layer, start)``. Results therefore do not depend on how
layers are grouped or on which process or machine runs them.

A layer search runs simulated annealing (:mod:`placer.ilp._ls_anneal`) from each promising
start (EPLB's and the contiguous layout; a start far worse than the best one is only kept as a
candidate) for a fixed number of iterations (the deterministic budget) in reheated cooling
cycles, checking an optional wall-clock deadline between chunks of iterations, and returns the
best state by the primary objective, never worse than the best start under the search model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from placer.ilp import _ls_anneal as A
from placer.ilp import _ls_kernel as K

CHUNK_ITERATIONS = 2048
"""Iterations between two wall-clock checks (the result does not depend on it)."""


@dataclass(frozen=True)
class SearchConfig:
    """Shape, rule and weights shared by every layer of one solve.

    ``w_bal`` multiplies the busiest GPU's token-slots per batch token, ``w_nv`` / ``w_rdma``
    the expected NVLink / RDMA sends per token; ``pen`` the max-load excess over a layer's cap;
    ``lam`` scales the smoothing term (std of GPU loads, relative to ``w_bal``);
    ``iterations`` is the per-start budget, in ``cycles`` cooling cycles; the initial
    temperature of each cycle is ``temp_scale`` x the ``temp_quantile`` quantile of the energy
    increases of ``probe`` random moves, cooled geometrically by ``temp_ratio`` per cycle;
    ``p_swap`` / ``p_guided`` are the shares of uniform and co-activation-guided swaps (the rest
    re-replicates); starts whose primary exceeds the best start's by more than ``start_margin``
    (relative) are kept as candidates but not annealed. ``distinct``: no move puts two copies of
    one expert on one GPU (the starts must already be so). ``link_scale`` float [G, G]: each
    rank pair's cost relative to its tier (:func:`placer.ilp.objective.link_scale`; None: all 1);
    ``time_scale`` float [G]: a GPU's load as time (``Topology.time_scale``; None: equal GPUs).
    """

    num_gpus: int
    num_nodes: int
    gpus_per_node: int
    slots_per_gpu: int
    num_experts: int
    num_slots: int
    top_k: int
    rule: str
    w_bal: float
    w_nv: float
    w_rdma: float
    pen: float = 0.0
    lam: float = 0.05
    iterations: int = 4000
    seed: int = 0
    p_swap: float = 0.4
    p_guided: float = 0.3
    temp_scale: float = 0.3
    temp_quantile: float = 0.25
    temp_ratio: float = 1e-3
    probe: int = 200
    start_margin: float = 0.25
    cycles: int = 16
    distinct: bool = False
    link_scale: np.ndarray | None = field(default=None, compare=False)
    time_scale: np.ndarray | None = field(default=None, compare=False)

    def dispatch(self) -> K.Dispatch:
        """The kernels' topology and rule."""
        return K.make_dispatch(self.rule, self.num_gpus, self.num_nodes, self.gpus_per_node, self.slots_per_gpu,
                               self.num_slots, self.time_scale)

    def weights(self, cap: float) -> K.Weights:
        """The kernels' objective weights, with the load cap ``cap``."""
        return K.Weights(float(self.w_bal), float(self.w_nv), float(self.w_rdma), float(self.lam),
                         float(self.pen), float(cap))


@dataclass(frozen=True)
class LayerTask:
    """One layer: expert loads per batch token, token types, starting maps, load cap.

    ``ids`` int64 [U, K] distinct (home, expert set) token types with ``home`` int64 [U] and
    ``wt`` float64 [U] (share of the sample); ``starts`` int64 [n, P]; ``cap_slack``: the
    busiest GPU may exceed the first start's max/mean load by this many ratio points before the
    penalty applies (``None``: no cap); ``move_cost`` float64 [G, E] or ``None``: the movement
    term, the cost of GPU g holding expert e, added to the primary once per (GPU, expert) held
    (:mod:`placer.ilp._ls_kernel`; re-placement from a running placement); ``rank_load`` float64
    [E, G] or ``None`` (uniform): the part of ``load`` whose tokens start on each rank;
    ``rank_sq`` float64 [E, G] or ``None`` (``rank_load ** 2``): its squares, for the variance of
    the load over the dispatch rule's deal (:func:`placer.ilp.load_model.rank_loads`);
    ``noise`` float64 [E] or ``None`` (0): ``rank_load``'s sampling noise
    (:func:`placer.ilp.load_model.rank_loads`).
    """

    layer: int
    load: np.ndarray
    ids: np.ndarray
    home: np.ndarray
    wt: np.ndarray
    starts: np.ndarray
    cap_slack: float | None = None
    move_cost: np.ndarray | None = None
    rank_load: np.ndarray | None = None
    rank_sq: np.ndarray | None = None
    noise: np.ndarray | None = None


@dataclass(frozen=True)
class LayerResult:
    layer: int
    p2l: np.ndarray
    primary: float
    cap: float
    start_primaries: tuple[float, ...]
    best_start: int
    iterations: int
    timed_out: bool


def token_types(ids: np.ndarray, home: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (home, expert set) rows of one layer's sample: (ids [U, K], home [U], weight [U]).

    Rows in ascending lexicographic order (home first), as ``np.unique(rows, axis=0)`` gives them:
    each row is packed into a few uint64 words (home, then the sorted expert ids, whole fields per
    word, most significant first), which sort in the same order as the rows.
    """
    s = ids.shape[0]
    if s == 0:
        return np.zeros((0, ids.shape[1]), np.int64), np.zeros(0, np.int64), np.zeros(0)
    rows = np.concatenate([home[:, None].astype(np.int64), np.sort(ids.astype(np.int64), axis=1)], axis=1)
    words = _pack_rows(rows)
    order = np.lexsort(words[::-1])  # the last key is the primary one: words[0]
    packed = words[:, order]
    first = np.ones(s, dtype=bool)
    first[1:] = (packed[:, 1:] != packed[:, :-1]).any(axis=0)
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, s))
    uniq = rows[order[starts]]
    return (np.ascontiguousarray(uniq[:, 1:]), np.ascontiguousarray(uniq[:, 0]),
            counts.astype(np.float64) / s)


def _pack_rows(rows: np.ndarray) -> np.ndarray:
    """Non-negative int64 rows [S, C] as uint64 words [W, S], fields whole, big-endian."""
    bits = [max(1, int(rows[:, c].max()).bit_length()) for c in range(rows.shape[1])]
    words: list[np.ndarray] = []
    word, used = np.zeros(rows.shape[0], np.uint64), 0
    for c, b in enumerate(bits):
        if used + b > 64:
            words.append(word)
            word, used = np.zeros(rows.shape[0], np.uint64), 0
        word = (word << np.uint64(b)) | rows[:, c].astype(np.uint64)
        used += b
    words.append(word)
    return np.stack(words)


def _layer(task: LayerTask, cfg: SearchConfig) -> tuple[K.Layer, K.State, K.Work]:
    u = task.ids.shape[0]
    lay = K.make_layer(task.ids, task.home, task.wt, task.load, cfg.num_experts, cfg.slots_per_gpu,
                       cfg.dispatch(), cfg.weights(float("inf")), cfg.distinct, task.move_cost, cfg.link_scale,
                       task.rank_load, task.rank_sq, task.noise)
    st = K.make_state(cfg.num_experts, cfg.num_slots, cfg.num_gpus, cfg.num_nodes, u)
    wk = K.make_work(cfg.num_experts, cfg.num_slots, cfg.num_gpus, cfg.num_nodes, u, cfg.probe)
    return lay, st, wk


def _primary(cfg: SearchConfig, cap: float, traffic: float, mx: float) -> float:
    return cfg.w_bal * mx + traffic + cfg.pen * max(0.0, mx - cap)


def search_layer(task: LayerTask, cfg: SearchConfig, deadline: float | None = None) -> LayerResult:
    """Anneal from the promising starts; the best state by primary (ties: the earlier start)."""
    lay, st, wk = _layer(task, cfg)
    has_traffic = cfg.w_nv > 0 or cfg.w_rdma > 0
    p_guided = cfg.p_guided if has_traffic else 0.0
    p_swap = cfg.p_swap if cfg.num_slots > cfg.num_experts else 1.0 - p_guided
    iters = int(cfg.iterations)
    starts = [np.array(s, dtype=np.int64) for s in task.starts]
    init = [A.init_state(s, lay, st, wk) for s in starts]
    cap = float("inf")
    if task.cap_slack is not None:
        mean = float(task.load.sum()) / cfg.num_gpus
        cap = (init[0][1] / mean + task.cap_slack) * mean if mean > 0 else float("inf")
    lay = lay._replace(weights=cfg.weights(cap))
    start_primaries = [_primary(cfg, cap, tr, mx) for tr, mx, _ in init]
    floor = min(start_primaries)
    best: tuple[float, int, np.ndarray] | None = None
    done = 0
    timed_out = False
    for si, p2l in enumerate(starts):
        primary = start_primaries[si]
        best_p2l = p2l.copy()
        if iters > 0 and deadline is not None and time.time() > deadline:
            timed_out = True  # no start anneals past the deadline
        if iters > 0 and not timed_out and primary <= floor + cfg.start_margin * abs(floor):
            traffic, mx, sd = A.init_state(p2l, lay, st, wk)
            energy = primary + cfg.lam * cfg.w_bal * sd
            score = np.array([traffic, mx, sd, energy, primary, energy])
            rand = np.random.default_rng([cfg.seed, task.layer, si]).random((iters, 6))
            probe = min(cfg.probe, iters)
            period = max(1, -(-iters // max(1, cfg.cycles)))
            worse = int(A.anneal(0, probe, period, rand, -1.0, 1.0, p_swap, p_guided, p2l, best_p2l, lay,
                                 st, wk, score))
            temp0 = cfg.temp_scale * float(np.quantile(wk.pbuf[:worse], cfg.temp_quantile)) if worse else 0.0
            it = 0
            while it < iters:
                nxt = min(iters, it + CHUNK_ITERATIONS)
                A.anneal(it, nxt, period, rand, temp0, cfg.temp_ratio, p_swap, p_guided, p2l, best_p2l,
                         lay, st, wk, score)
                done += nxt - it
                it = nxt
                if it < iters:
                    # Rebuild the state from the map: bounds float drift at fixed iterations.
                    score[0], score[1], score[2] = A.init_state(p2l, lay, st, wk)
                    score[3] = A.energy(score[1], score[2], score[0], lay.weights)[1]
                    if deadline is not None and time.time() > deadline:
                        timed_out = True
                        break
        traffic, mx, _ = A.init_state(best_p2l, lay, st, wk)
        final = _primary(cfg, cap, traffic, mx)
        if final > primary:  # the start itself is the best state seen
            final, best_p2l = primary, starts[si]
        if best is None or final < best[0]:
            best = (final, si, best_p2l)
    assert best is not None
    assert best[0] <= floor + 1e-12 * max(1.0, abs(floor))
    return LayerResult(task.layer, best[2].astype(np.int32), float(best[0]), cap, tuple(start_primaries),
                       best[1], done, timed_out)


def search_group(tasks: list[LayerTask], cfg: SearchConfig,
                 deadline: float | None = None) -> list[LayerResult]:
    """Search a group of layers in order (the unit of work of :mod:`placer.ilp.parallel`)."""
    return [search_layer(t, cfg, deadline) for t in tasks]
