"""Context-coherent placement: objective weights, CP-SAT and PuLP formulations, local search.

Context-coherent (ExFlow) execution keeps a token's state on the GPU of its top-1 expert. With
no replicas and expert-to-GPU maps ``pi_l`` the objective minimised here is

    J = affinity * sum_l sum_{i,j} T[l, i, j] * [pi_l(i) != pi_{l+1}(j)]
      + balance  * sum_l max_g sum_{e: pi_l(e) = g} load[l, e]

with ``T = stats.top1_transitions [L-1, E, E]`` (zero when top-1 is unknown) and ``load =
stats.load [L, E]``, optionally subject to a per-layer cap ``max/mean GPU load <= load_cap``.

**Weights** (:func:`coherent_weights`) are seconds: a cross-GPU transition moves one token
state (``model.token_bytes``) over NVLink, or over the NIC when it leaves the node (mixed by the
share of other GPUs that sit in another node); one token-slot of per-layer max GPU load costs
``6 * hidden * ffn`` FLOPs at half the GPU's dense BF16 peak. With unknown sizes both are 1
(counts). ``problem.weights["affinity"]`` / ``["balance"]`` multiply them and
``problem.weights["load_cap"]`` sets a cap. Internally the ratio balance / affinity is
rounded to the simplest fraction within 0.5 % so that every backend minimises the *same*
integer objective ``A * cross + B * sum max-load`` (reported as ``unit * (...)``, seconds).

**Default load term.** The topology weights price one token-slot of per-layer max GPU load at
32 cross-GPU transitions for Mixtral-8x7B on H100 (FLOP time vs NVLink time). On the HD-MoE
Mixtral traces (``benchmarks/eval_coherent.py``, 4 GPUs, leave one category out) that buys
balance at a large transition cost: held-out transitions 0.60-0.63 at max/mean load
1.07-1.10. The default therefore scales the balance weight by :data:`DEFAULT_BALANCE_SCALE`
(1.2 transitions per token-slot there): held-out 0.55-0.59 at load 1.07-1.12. A hard cap
(``load_cap``, exact in the DP) was tried too: at cap 1.08 one split's transitions exceed 0.61.
No single setting met "transitions <= 0.60 and load <= 1.10" on all five splits; the default
meets it on four (math: 0.573 / 1.115; its held-out load stays >= 1.10 even when the fitting
data are balanced perfectly).

**Backends** of :func:`solve_coherent`:

- ``exact``: :mod:`placer.ilp.exact` (assignment chain for E == G, partition DP for small E / G).
- ``local``: best of three starts (contiguous, greedy affinity clustering, balanced packing with
  optimal GPU relabelling), then best-improvement swaps of two experts of one layer between GPUs
  with incremental deltas, alternated with an exact GPU relabelling (a chain of assignment
  problems over the groups) and seeded perturbations. Deterministic given ``seed`` and
  ``max_rounds`` (a wall-clock limit only stops it earlier). Never worse than its start.
- ``cpsat`` / ``pulp``: the MIP below, warm-started from ``local`` (CP-SAT hints; CBC
  ``warmStart``; PuLP's HiGHS interface takes no start, so HiGHS runs cold).
- ``auto`` (default): ``exact`` where it applies, else ``local``.

**Replicas** (``num_redundant > 0``) change which GPU holds a token's state (the dispatch rule
picks the top-1 expert's replica), which no backend here models. The E experts are placed first
(``E // G`` or ``E // G + 1`` per GPU; ``local`` when they do not split evenly) with the chosen
backend, starting from the *neutral fill*: free slots duplicate the GPU's own experts, which
routes exactly like no replicas. Then, layer by layer, two fills of the layer's free slots are
tried: ``affinity`` (the experts most often the next top-1 of tokens whose state is on that GPU)
and ``balance`` (lightest GPU first, the expert with the largest load per copy it does not
hold). A fill is kept only when :mod:`placer.metrics` (transitions from the stats' token
sample, load from ``gpu_load``) scores the whole placement better, so the result is never worse
than the neutral fill. Without a token sample the neutral fill is kept and its transitions are
those of the E experts alone. Status ``feasible``, no bound (replicas can beat the no-replica
optimum).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import numpy as np

from placer import metrics
from placer.errors import InvalidInputError
from placer.ilp._cpsat import relative_gap, run_cpsat
from placer.ilp.base import PlacementProblem
from placer.ilp.exact import (
    MAX_PARTITIONS,
    assign_max,
    coherent_cost,
    count_partitions,
    enumerate_partitions,
    gpu_of_expert,
    pair_matching_bound,
    partition_dp,
)
from placer.types import ModelSpec, Placement, SolveResult, Topology

__all__ = ["BACKENDS", "DEFAULT_BALANCE_SCALE", "MAX_MIP_SIZE", "CoherentObjective", "coherent_weights",
           "compare_backends", "local_search", "make_objective", "solve_coherent"]

BACKENDS = ("auto", "exact", "local", "cpsat", "pulp")

DEFAULT_BALANCE_SCALE = 0.0373
"""Factor on the balance weight of :func:`coherent_weights` used when ``problem.weights`` has no
"balance" key. Empirical, not physical: it makes one token-slot of max load worth 1.2 cross-GPU
transitions for Mixtral-8x7B on H100 NVLink (unscaled: 32), the trade-off that best met the
held-out targets of ``benchmarks/eval_coherent.py``. The unscaled FLOP cost describes
compute-bound prefill; in memory-bound decode a token's share of expert time is far smaller."""

MAX_MIP_SIZE = 100_000
"""Largest (L-1) * E^2 * G (the linking constraints) the CP-SAT and PuLP models are built for."""


# --------------------------------------------------------------------------------------------
# Weights and the objective
# --------------------------------------------------------------------------------------------


def coherent_weights(model: ModelSpec, topology: Topology) -> dict[str, Any]:
    """Weights of the context-coherent objective in seconds (counts when sizes are unknown).

    ``affinity``: seconds per cross-GPU top-1 transition, ``token_bytes`` over NVLink for a GPU
    in the same node and over the NIC otherwise, mixed by the share ``(gpus_per_node - 1) /
    (G - 1)`` of other GPUs in the same node. ``balance``: seconds per token-slot of per-layer
    max GPU load, ``6 * hidden * ffn`` FLOPs at ``0.5 * bf16_flops``. ``units``: "s" or "count".
    """
    if not model.sizes_known or model.token_bytes <= 0:
        return {"affinity": 1.0, "balance": 1.0, "units": "count"}
    g, gpn = topology.num_gpus, topology.gpus_per_node
    same_node = 1.0 if g <= 1 else (gpn - 1) / (g - 1)
    t_nvlink = model.token_bytes / (topology.nvlink_gbps * 1e9)
    t_nic = model.token_bytes / (topology.nic_gbps * 1e9)
    affinity = same_node * t_nvlink + (1.0 - same_node) * t_nic
    balance = 6.0 * model.hidden_size * model.expert_ffn_size / (0.5 * topology.bf16_flops)
    return {"affinity": float(affinity), "balance": float(balance), "units": "s"}


@dataclass(frozen=True)
class CoherentObjective:
    """The objective every backend minimises, in integer form.

    ``J(gpu) = A * cross + B * sum_l max_load_l`` with ``A = aff_int``, ``B = bal_int``; the
    reported value is ``unit * J``. ``transitions`` float64 [L-1, E, E]; ``load`` float64
    [L, E]; ``capacities`` int [G] experts per GPU (primaries); ``cap_load`` float64 [L]
    largest allowed max GPU load per layer (``inf`` without a cap).
    """

    transitions: np.ndarray
    load: np.ndarray
    capacities: tuple[int, ...]
    aff_int: int
    bal_int: int
    unit: float
    affinity: float
    balance: float
    units: str
    load_cap: float | None
    cap_load: np.ndarray

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])

    @property
    def num_gpus(self) -> int:
        return len(self.capacities)

    @property
    def equal(self) -> bool:
        return len(set(self.capacities)) == 1

    @property
    def has_cap(self) -> bool:
        return bool(np.isfinite(self.cap_load).any())

    def parts(self, gpu: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """``(J, cross [L-1], max_load [L])`` of a placement ``gpu [L, E]``."""
        cross, ml = coherent_cost(gpu, self.transitions, self.load, self.num_gpus)
        return float(self.aff_int * cross.sum() + self.bal_int * ml.sum()), cross, ml

    def violation(self, max_load: np.ndarray) -> float:
        return float(np.maximum(max_load - self.cap_load, 0.0).sum()) if self.has_cap else 0.0

    def key(self, gpu: np.ndarray) -> tuple[float, float]:
        """Lexicographic key (cap violation, J): smaller is better."""
        j, _, ml = self.parts(gpu)
        return self.violation(ml), j


def _integer_ratio(affinity: float, balance: float) -> tuple[int, int, float]:
    """``(A, B, unit)``: ``B / A`` the simplest fraction within 0.5 % of balance / affinity, ``unit * A = affinity``."""
    if affinity < 0 or balance < 0 or not np.isfinite(affinity) or not np.isfinite(balance):
        raise InvalidInputError(f"weights must be finite and >= 0, got affinity={affinity}, "
                                f"balance={balance}", source="weights")
    if affinity == 0 and balance == 0:
        raise InvalidInputError("the affinity and balance weights are both 0", source="weights")
    if balance == 0:
        return 1, 0, affinity
    if affinity == 0:
        return 0, 1, balance
    ratio = balance / affinity
    for limit in (10, 100, 1000, 10_000, 100_000):
        frac = Fraction(ratio).limit_denominator(limit)
        if frac > 0 and abs(float(frac) - ratio) <= 0.005 * ratio:
            break
    if frac == 0:
        return 1, 0, affinity
    return frac.denominator, frac.numerator, affinity / frac.denominator


def _capacities(num_experts: int, num_gpus: int) -> tuple[int, ...]:
    q, r = divmod(num_experts, num_gpus)
    return tuple(q + (1 if g < r else 0) for g in range(num_gpus))


def _lpt_gpu(load: np.ndarray, capacities: tuple[int, ...]) -> np.ndarray:
    """Greedy balanced packing per layer (heaviest first into the lightest GPU with room). [L, E]."""
    num_layers, num_experts = load.shape
    cap = np.asarray(capacities)
    gpu = np.empty((num_layers, num_experts), dtype=np.int64)
    for layer in range(num_layers):
        gl = np.zeros(len(cap))
        count = np.zeros(len(cap), dtype=np.int64)
        for e in np.argsort(-load[layer], kind="stable"):
            key = np.where(count < cap, gl, np.inf)
            g = int(np.argmin(key))
            gpu[layer, e] = g
            gl[g] += load[layer, e]
            count[g] += 1
    return gpu


def _min_max_load(load: np.ndarray, capacities: tuple[int, ...]) -> np.ndarray:
    """Smallest per-layer max GPU load: exact by enumeration when the partitions are few, else
    the greedy packing's (an achievable value, so a cap relaxed to it stays feasible). [L]."""
    num_experts, num_gpus = load.shape[1], len(capacities)
    if len(set(capacities)) == 1 and count_partitions(num_experts, num_gpus) <= MAX_PARTITIONS:
        parts = enumerate_partitions(num_experts, num_gpus).astype(np.int64)
        onehot = np.zeros((len(parts), num_experts, num_gpus))
        onehot[np.arange(len(parts))[:, None], np.arange(num_experts)[None, :], parts] = 1.0
        return np.einsum("peg,le->lpg", onehot, load).max(axis=2).min(axis=1)
    gpu = _lpt_gpu(load, capacities)
    return coherent_cost(gpu, None, load, num_gpus)[1]


def make_objective(problem: PlacementProblem, *, capacities: tuple[int, ...] | None = None,
                   load_cap: float | None = None) -> CoherentObjective:
    """The objective of ``problem``: weights from :func:`coherent_weights` (balance times
    :data:`DEFAULT_BALANCE_SCALE`), multiplied by ``problem.weights["affinity"]`` / ``["balance"]``;
    ``load_cap`` (or ``problem.weights["load_cap"]``) caps per-layer max/mean GPU load, relaxed
    per layer to the smallest max load reachable (see :func:`_min_max_load`)."""
    stats = problem.stats
    num_layers, num_experts = stats.load.shape
    num_gpus = problem.topology.num_gpus
    caps = capacities if capacities is not None else _capacities(num_experts, num_gpus)
    w = coherent_weights(problem.model, problem.topology)
    # problem.weights["affinity"] / ["balance"] multiply the cost-model weights, as in the joint
    # objective (placer.ilp.objective); the "objective" mode switches a term off.
    mode = problem.weights.get("objective", "joint")
    if mode == "traffic":
        raise InvalidInputError("context-coherent execution has no dispatch-traffic term; use "
                                "--objective affinity, balance or joint", source="--objective")
    scale = DEFAULT_BALANCE_SCALE if w["units"] == "s" else 1.0
    affinity = w["affinity"] * float(problem.weights.get("affinity", 0.0 if mode == "balance" else 1.0))
    balance = w["balance"] * scale * float(problem.weights.get("balance", 0.0 if mode == "affinity" else 1.0))
    if load_cap is None and "load_cap" in problem.weights:
        load_cap = float(problem.weights["load_cap"])
    a, b, unit = _integer_ratio(affinity, balance)
    load = np.asarray(stats.load, dtype=np.float64)
    if stats.top1_transitions is None:
        t = np.zeros((num_layers - 1, num_experts, num_experts))
    else:
        t = np.asarray(stats.top1_transitions, dtype=np.float64)
    cap_load = np.full(num_layers, np.inf)
    if load_cap is not None:
        if not np.isfinite(load_cap) or load_cap < 1.0:
            raise InvalidInputError(f"load_cap must be >= 1, got {load_cap}", source="weights")
        mean = load.sum(axis=1) / num_gpus
        cap_load = load_cap * mean
        if np.all(load == np.round(load)):
            cap_load = np.floor(cap_load + 1e-9)  # integer loads: the same set, no rounding fuzz
        cap_load = np.maximum(cap_load, _min_max_load(load, caps))
    return CoherentObjective(transitions=t, load=load, capacities=tuple(caps), aff_int=a, bal_int=b,
                             unit=unit, affinity=a * unit, balance=b * unit,
                             units="custom" if {"affinity", "balance"} & set(problem.weights) else w["units"],
                             load_cap=load_cap, cap_load=cap_load)


def _load_floor(obj: CoherentObjective) -> np.ndarray:
    """A lower bound on every layer's max GPU load: the larger of the mean and the heaviest
    expert plus the lightest experts that fill its GPU (``min(capacities) - 1`` of them). [L]."""
    ld = np.sort(obj.load, axis=1)
    others = min(obj.capacities) - 1
    heavy = ld[:, -1] + ld[:, :others].sum(axis=1)
    return np.maximum(heavy, obj.load.sum(axis=1) / obj.num_gpus)


def _lower_bound(obj: CoherentObjective) -> float | None:
    """A proven lower bound on J for equal capacities (None otherwise).

    Transitions: per layer pair, total minus the b-matching bound on same-GPU transitions
    (:func:`placer.ilp.exact.pair_matching_bound`). Load: per layer, the larger of the mean
    and the heaviest expert plus the ``E/G - 1`` lightest others. Each part bounds its term of
    every placement, so their weighted sum bounds J (a cap only raises the optimum).
    """
    if not obj.equal:
        return None
    per_gpu = obj.capacities[0]
    bound = 0.0
    if obj.aff_int and obj.num_layers > 1:
        totals = obj.transitions.sum(axis=(1, 2))
        same = pair_matching_bound(obj.transitions, per_gpu)
        bound += obj.aff_int * float(np.maximum(totals - same, 0.0).sum())
    if obj.bal_int:
        bound += obj.bal_int * float(_load_floor(obj).sum())
    return bound


# --------------------------------------------------------------------------------------------
# Local search
# --------------------------------------------------------------------------------------------


def _onehot(gpu: np.ndarray, num_gpus: int) -> np.ndarray:
    out = np.zeros(gpu.shape + (num_gpus,))
    np.put_along_axis(out, gpu[..., None], 1.0, axis=-1)
    return out


def _contiguous_gpu(obj: CoherentObjective) -> np.ndarray:
    row = np.repeat(np.arange(obj.num_gpus), obj.capacities)
    return np.tile(row, (obj.num_layers, 1)).astype(np.int64)


def _greedy_gpu(obj: CoherentObjective) -> np.ndarray:
    """Layer 0 contiguous; each next layer's experts join the GPU most of their tokens come
    from (pairs (expert, GPU) by descending inflow, while the GPU has room)."""
    gpu = _contiguous_gpu(obj)
    cap = np.asarray(obj.capacities)
    for layer in range(obj.num_layers - 1):
        inflow = obj.transitions[layer].T @ _onehot(gpu[layer], obj.num_gpus)   # [E, G]
        order = np.argsort(-inflow, axis=None, kind="stable")
        count = np.zeros(obj.num_gpus, dtype=np.int64)
        done = np.zeros(obj.num_experts, dtype=bool)
        row = np.empty(obj.num_experts, dtype=np.int64)
        for flat in order:
            e, g = divmod(int(flat), obj.num_gpus)
            if done[e] or count[g] >= cap[g]:
                continue
            row[e], done[e] = g, True
            count[g] += 1
        gpu[layer + 1] = row
    return gpu


def relabel_gpus(obj: CoherentObjective, gpu: np.ndarray) -> np.ndarray:
    """Optimal GPU labels for the given per-layer groups (equal capacities only).

    Which GPU a layer's group gets does not change the load, and the transitions depend only on
    which group of layer l shares a label with which group of layer l+1: a bijection per layer
    pair, chosen by an assignment problem on the group-to-group transition counts (as in
    :func:`placer.ilp.exact.exact_one_per_gpu`). Never worse than ``gpu``.
    """
    if not obj.equal or obj.num_layers < 2:
        return gpu
    out = gpu.copy()
    oh = _onehot(gpu, obj.num_gpus)
    # Group-to-group transition counts of every layer pair, [L-1, G, G] (old labels).
    groups = np.swapaxes(oh[:-1], 1, 2) @ obj.transitions @ oh[1:]
    label = np.arange(obj.num_gpus)           # label[old group of layer l] -> new GPU
    for layer in range(obj.num_layers - 1):
        sigma = assign_max(groups[layer])      # group g of layer l shares a GPU with sigma[g]
        nxt = np.empty(obj.num_gpus, dtype=np.int64)
        nxt[sigma] = label
        out[layer + 1] = nxt[gpu[layer + 1]]
        label = nxt
    return out


class _State:
    """Incremental bookkeeping for swaps: GPU loads and per-expert transition counts by GPU."""

    def __init__(self, obj: CoherentObjective, gpu: np.ndarray, tol: float | None = None):
        self.obj = obj
        self.gpu = gpu.copy()
        if tol is None:
            # Improvements smaller than this are rounding noise (the data are usually integers).
            per_pair = obj.aff_int * float(obj.transitions.sum()) / max(obj.num_layers - 1, 1)
            tol = 1e-9 * max(1.0, per_pair + obj.bal_int * float(obj.load.sum()) / obj.num_layers)
        self.tol = tol
        self.rebuild()

    def copy(self) -> _State:
        new = object.__new__(_State)
        new.obj, new.tol = self.obj, self.tol
        new.gpu, new.gl, new.cin, new.cout = self.gpu.copy(), self.gl.copy(), self.cin.copy(), self.cout.copy()
        return new

    def rebuild(self) -> None:
        obj, g = self.obj, self.obj.num_gpus
        oh = _onehot(self.gpu, g)                                   # [L, E, G]
        num_layers, e = self.gpu.shape
        self.gl = np.einsum("leg,le->lg", oh, obj.load)             # [L, G]
        self.cin = np.zeros((num_layers, e, g))                     # tokens into (l, i) from GPU
        self.cout = np.zeros((num_layers, e, g))                    # tokens from (l, i) to GPU
        if num_layers > 1:
            self.cout[:-1] = np.einsum("lij,ljg->lig", obj.transitions, oh[1:])
            self.cin[1:] = np.einsum("lij,lig->ljg", obj.transitions, oh[:-1])

    def best_swap(self, layer: int) -> tuple[int, int] | None:
        """The best improving swap of layer ``layer`` by (cap violation, J), or None."""
        obj = self.obj
        g = self.gpu[layer]
        c = self.cin[layer] + self.cout[layer]                      # [E, G]
        m = c[:, g]                                                  # m[a, b] = C[a, gpu[b]]
        s = np.diag(m)
        gain = m + m.T - s[:, None] - s[None, :]                    # same-GPU transitions gained
        valid = g[:, None] != g[None, :]
        dj = -obj.aff_int * gain
        dviol = None
        if obj.bal_int or obj.has_cap:
            ld, gl = obj.load[layer], self.gl[layer]
            d = ld[None, :] - ld[:, None]                            # GPU of a gets b, loses a
            new_a = gl[g][:, None] + d
            new_b = gl[g][None, :] - d
            order = np.argsort(-gl, kind="stable")
            top = order[:3]
            # Max load over the GPUs other than g_a and g_b, from the three heaviest GPUs.
            other = np.full((obj.num_gpus, obj.num_gpus), 0.0)
            for k in range(len(top) - 1, -1, -1):
                keep = (np.arange(obj.num_gpus)[:, None] != top[k]) & (np.arange(obj.num_gpus)[None, :] != top[k])
                other = np.where(keep, gl[top[k]], other)
            new_max = np.maximum(np.maximum(new_a, new_b), other[g][:, g])
            cur = gl.max()
            dj = dj + obj.bal_int * (new_max - cur)
            if obj.has_cap:
                cap = obj.cap_load[layer]
                dviol = np.maximum(new_max - cap, 0.0) - max(cur - cap, 0.0)
        dj = np.where(valid, dj, np.inf)
        tol = self.tol
        if dviol is not None:
            dviol = np.where(valid, dviol, np.inf)
            lo = float(dviol.min())
            if lo < -tol:
                cand = np.where(dviol <= lo + tol, dj, np.inf)
                a, b = np.unravel_index(int(np.argmin(cand)), cand.shape)
                return int(a), int(b)
            dj = np.where(dviol <= tol, dj, np.inf)
        a, b = np.unravel_index(int(np.argmin(dj)), dj.shape)
        if dj[a, b] < -tol:
            return int(a), int(b)
        return None

    def swap(self, layer: int, a: int, b: int) -> None:
        obj, t = self.obj, self.obj.transitions
        ga, gb = int(self.gpu[layer, a]), int(self.gpu[layer, b])
        self.gpu[layer, a], self.gpu[layer, b] = gb, ga
        da = obj.load[layer, a] - obj.load[layer, b]
        self.gl[layer, ga] -= da
        self.gl[layer, gb] += da
        if layer > 0:
            diff = t[layer - 1][:, a] - t[layer - 1][:, b]           # tokens into a minus into b
            self.cout[layer - 1][:, ga] -= diff
            self.cout[layer - 1][:, gb] += diff
        if layer < obj.num_layers - 1:
            diff = t[layer][a] - t[layer][b]
            self.cin[layer + 1][:, ga] -= diff
            self.cin[layer + 1][:, gb] += diff


def _descend(state: _State, layers: list[int], deadline: float | None) -> int:
    """Best-improvement swaps until no layer improves (or the deadline). Returns the swap count."""
    queue = list(dict.fromkeys(layers))
    queued = set(queue)
    swaps = 0
    while queue:
        if deadline is not None and time.perf_counter() > deadline:
            break
        layer = queue.pop(0)
        queued.discard(layer)
        moved = False
        while True:
            pair = state.best_swap(layer)
            if pair is None:
                break
            state.swap(layer, *pair)
            swaps += 1
            moved = True
        if moved:
            for nb in (layer - 1, layer + 1):
                if 0 <= nb < state.obj.num_layers and nb not in queued:
                    queue.append(nb)
                    queued.add(nb)
    return swaps


@dataclass(frozen=True)
class LocalSearchInfo:
    start: str
    start_key: tuple[float, float]
    key: tuple[float, float]
    rounds: int
    swaps: int
    stopped_by_time: bool


def local_search(obj: CoherentObjective, start: np.ndarray | None = None, *, seed: int = 0,
                 max_rounds: int = 200, time_limit_s: float | None = None) -> tuple[np.ndarray, LocalSearchInfo]:
    """Swap-based local search on ``obj`` from ``start`` (default: the best of the contiguous,
    greedy-affinity and balanced-relabelled starts).

    ``start``: int [L, E] GPU of every expert. Each round: descend by best-improvement swaps
    (two experts of one layer exchange GPUs; deltas from the per-expert GPU transition counts),
    relabel GPUs optimally (:func:`relabel_gpus`), then perturb a random window of layers with
    random swaps and descend again, keeping the result only when it is better. Returns the best
    placement ``gpu [L, E]`` (never worse than the start by (cap violation, J)) and a summary.
    """
    deadline = None if time_limit_s is None else time.perf_counter() + float(time_limit_s)
    if start is None:
        starts = {"contiguous": _contiguous_gpu(obj), "greedy": _greedy_gpu(obj)}
        if obj.equal:
            starts["balanced"] = relabel_gpus(obj, _lpt_gpu(obj.load, obj.capacities))
        keys = {name: obj.key(g) for name, g in starts.items()}
        name = min(keys, key=lambda k: keys[k])
        start = starts[name]
    else:
        name = "given"
    start = np.asarray(start, dtype=np.int64)
    start_key = obj.key(start)
    rng = np.random.default_rng(seed)
    state = _State(obj, start)
    swaps = _descend(state, list(rng.permutation(obj.num_layers)), deadline)
    best, best_key = state, obj.key(state.gpu)
    relabel_due = True
    rounds = 0
    stopped = False
    for rounds in range(1, max_rounds + 1):  # noqa: B007 - rounds is reported
        if deadline is not None and time.perf_counter() > deadline:
            stopped = True
            break
        if relabel_due:  # optimal GPU labels for the current groups, then descend again
            relabel_due = False
            relabelled = relabel_gpus(obj, best.gpu)
            if obj.key(relabelled) < best_key:
                state = _State(obj, relabelled, best.tol)
                swaps += _descend(state, list(range(obj.num_layers)), deadline)
                key = obj.key(state.gpu)
                if key < best_key:
                    best, best_key = state, key
        # Perturb a window of layers with random swaps, then descend.
        state = best.copy()
        width = int(rng.integers(1, min(4, obj.num_layers) + 1))
        first = int(rng.integers(0, obj.num_layers - width + 1))
        window = list(range(first, first + width))
        for layer in window:
            for _ in range(max(1, obj.num_experts // 8)):
                a, b = rng.choice(obj.num_experts, size=2, replace=False)
                if state.gpu[layer, a] != state.gpu[layer, b]:
                    state.swap(layer, int(a), int(b))
        around = sorted({x for layer in window for x in (layer - 1, layer, layer + 1)
                         if 0 <= x < obj.num_layers})
        swaps += _descend(state, around, deadline)
        key = obj.key(state.gpu)
        if key < best_key:
            best, best_key = state, key
            relabel_due = True
    best = best.gpu.copy()
    if best_key > start_key:  # cannot happen: every accepted step improves
        best, best_key = start, start_key
    return best, LocalSearchInfo(start=name, start_key=start_key, key=best_key, rounds=rounds,
                                 swaps=swaps, stopped_by_time=stopped)


# --------------------------------------------------------------------------------------------
# CP-SAT
# --------------------------------------------------------------------------------------------


def _int_load(obj: CoherentObjective) -> np.ndarray:
    return np.round(obj.load).astype(np.int64)


def _sym_relabel(obj: CoherentObjective, gpu: np.ndarray) -> np.ndarray:
    """Relabel GPUs (same permutation in every layer) so that layer 0's GPUs are ordered by
    their smallest expert, the form the symmetry-breaking constraints admit."""
    first = np.array([np.flatnonzero(gpu[0] == g).min() for g in range(obj.num_gpus)])
    new_label = np.empty(obj.num_gpus, dtype=np.int64)
    new_label[np.argsort(first, kind="stable")] = np.arange(obj.num_gpus)
    return new_label[gpu]


def solve_cpsat(obj: CoherentObjective, hint: np.ndarray | None = None, *,
                time_limit_s: float | None = None, deterministic_time: float | None = None,
                num_workers: int = 1, seed: int = 0, log: bool = False) -> dict[str, Any]:
    """CP-SAT model of the context-coherent objective (no replicas).

    Returns ``{"gpu": [L, E] or None, "status", "objective" (J), "bound" (J), "wall_time_s"}``.
    Loads and transitions are rounded to integers (CP-SAT needs integer coefficients); the caller
    drops the bound and the proof when that rounding changed them.
    """
    from ortools.sat.python import cp_model

    # --- data ---
    num_layers, num_experts, num_gpus = obj.num_layers, obj.num_experts, obj.num_gpus
    t = np.round(obj.transitions).astype(np.int64)
    load = _int_load(obj)
    caps = obj.capacities
    # Every (i, j) pair gets a y, so the row and column sums below can be equalities.
    pairs = [[(i, j) for i in range(num_experts) for j in range(num_experts)]
             for layer in range(num_layers - 1)]
    model = cp_model.CpModel()

    # --- variables ---
    # x[l, e, g] = 1 when expert e of layer l sits on GPU g.
    x = [[[model.new_bool_var(f"x{layer}_{e}_{g}") for g in range(num_gpus)]
          for e in range(num_experts)] for layer in range(num_layers)]
    # y[l, i, j] = 1 only if expert i of layer l and expert j of layer l+1 share a GPU
    # (tokens i -> j then stay put); maximised, so it is 1 exactly when they do.
    y = [{(i, j): model.new_bool_var(f"y{layer}_{i}_{j}") for i, j in pairs[layer]}
         for layer in range(num_layers - 1)]
    # z[l] >= the largest GPU load of layer l (tight at the optimum when balance is weighted).
    use_z = obj.bal_int > 0 or obj.has_cap
    # Its domain starts at the load floor (valid for every placement; tightens the LP).
    floor = np.ceil(_load_floor(obj) - 1e-9).astype(np.int64)
    z = [model.new_int_var(int(floor[layer]), int(load[layer].sum()), f"z{layer}")
         for layer in range(num_layers)] if use_z else []

    # --- constraints ---
    for layer in range(num_layers):
        for e in range(num_experts):
            # Every expert sits on exactly one GPU.
            model.add_exactly_one(x[layer][e])
        for g in range(num_gpus):
            # Every GPU holds its number of experts (equal slots per GPU).
            model.add(sum(x[layer][e][g] for e in range(num_experts)) == caps[g])
            if use_z:
                # z[l] is at least every GPU's load.
                model.add(z[layer] >= sum(int(load[layer, e]) * x[layer][e][g] for e in range(num_experts)))
        if use_z and obj.has_cap:
            # The per-layer cap on the largest GPU load.
            model.add(z[layer] <= int(np.floor(obj.cap_load[layer] + 1e-9)))
    for layer in range(num_layers - 1):
        for (i, j), v in y[layer].items():
            for g in range(num_gpus):
                # y => (i on g => j on g): if they "share", j is on i's GPU.
                model.add_bool_or([x[layer][i][g].Not(), x[layer + 1][j][g]]).only_enforce_if(v)
        if obj.equal:
            for i in range(num_experts):
                # Expert i of layer l shares its GPU with exactly E/G experts of layer l+1, and
                # expert i of layer l+1 with exactly E/G of layer l (makes y exact; strong cut).
                model.add(sum(y[layer][i, j] for j in range(num_experts)) == caps[0])
                model.add(sum(y[layer][j, i] for j in range(num_experts)) == caps[0])
    if obj.equal:
        # Symmetry breaking (GPU labels are interchangeable): in layer 0, expert e may sit on
        # GPU g >= 1 only if a smaller expert sits on GPU g - 1 (GPUs ordered by smallest expert).
        for e in range(num_experts):
            for g in range(1, num_gpus):
                if e < g:
                    model.add(x[0][e][g] == 0)
                else:
                    model.add(x[0][e][g] <= sum(x[0][k][g - 1] for k in range(e)))

    # --- objective: minimise B * sum z - A * (same-GPU transitions); J = that + A * total ---
    same = sum(int(t[layer, i, j]) * v for layer in range(num_layers - 1) for (i, j), v in y[layer].items()
               if t[layer, i, j] > 0)
    expr = -obj.aff_int * same if obj.aff_int else 0
    if obj.bal_int:
        expr = expr + obj.bal_int * sum(z)
    model.minimize(expr)
    offset = obj.aff_int * float(t.sum())

    # --- hint ---
    if hint is not None:
        h = _sym_relabel(obj, hint) if obj.equal else hint
        for layer in range(num_layers):
            for e in range(num_experts):
                for g in range(num_gpus):
                    model.add_hint(x[layer][e][g], int(h[layer, e] == g))
        for layer in range(num_layers - 1):
            for (i, j), v in y[layer].items():
                model.add_hint(v, int(h[layer, i] == h[layer + 1, j]))
        if use_z:
            ml = coherent_cost(h, None, load, num_gpus)[1]
            for layer in range(num_layers):
                model.add_hint(z[layer], int(ml[layer]))

    # --- solve, triage, read back ---
    out = run_cpsat(model, time_limit_s=time_limit_s, deterministic_time=deterministic_time,
                    num_workers=num_workers, seed=seed, log=log)
    gpu = None
    if out.status in ("optimal", "timeout"):
        gpu = np.array([[next(g for g in range(num_gpus) if out.solver.boolean_value(x[layer][e][g]))
                         for e in range(num_experts)] for layer in range(num_layers)], dtype=np.int64)
    return {"gpu": gpu, "status": out.status,
            "objective": None if out.objective is None else out.objective + offset,
            "bound": None if out.bound is None else out.bound + offset, "wall_time_s": out.wall_time_s}


# --------------------------------------------------------------------------------------------
# PuLP (CBC, HiGHS)
# --------------------------------------------------------------------------------------------


def _run_pulp(prob, *, backend: str, time_limit_s: float | None, threads: int, warm: bool):
    """:func:`placer.ilp._pulp.run_pulp`, with a CBC warm start when ``warm``."""
    from placer.ilp import _pulp

    return _pulp.run_pulp(prob, backend=backend, time_limit_s=time_limit_s, threads=threads,
                          warm_start=warm and backend == "cbc")


def solve_pulp(obj: CoherentObjective, hint: np.ndarray | None = None, *, backend: str = "cbc",
               time_limit_s: float | None = None, threads: int = 1) -> dict[str, Any]:
    """MIP of the context-coherent objective with PuLP (no replicas).

    Same variables as :func:`solve_cpsat`, linearised: ``y[l,i,j] <= 1 - x[l,i,g] +
    x[l+1,j,g]`` for every GPU g (y continuous in [0, 1]; at integer x it is 1 only when i and
    j share a GPU). CBC is warm-started from ``hint`` (PuLP ``warmStart``); PuLP's HiGHS
    interface (highspy) accepts no start, so HiGHS runs without one.
    """
    import pulp

    # --- data ---
    num_layers, num_experts, num_gpus = obj.num_layers, obj.num_experts, obj.num_gpus
    t = obj.transitions
    load = obj.load
    caps = obj.capacities
    # Every (i, j) pair gets a y, so the row and column sums below can be equalities.
    pairs = [[(i, j) for i in range(num_experts) for j in range(num_experts)]
             for layer in range(num_layers - 1)]
    prob = pulp.LpProblem("coherent", pulp.LpMinimize)

    # --- variables ---
    # x[l, e, g] = 1 when expert e of layer l sits on GPU g.
    x = {(layer, e, g): prob.add_variable(f"x_{layer}_{e}_{g}", cat="Binary")
         for layer in range(num_layers) for e in range(num_experts) for g in range(num_gpus)}
    # y[l, i, j] <= [expert i of layer l and expert j of layer l+1 share a GPU].
    y = {(layer, i, j): prob.add_variable(f"y_{layer}_{i}_{j}", lowBound=0, upBound=1)
         for layer in range(num_layers - 1) for i, j in pairs[layer]}
    # z[l] >= the largest GPU load of layer l.
    use_z = obj.bal_int > 0 or obj.has_cap
    # Its lower bound is the load floor (valid for every placement; tightens the LP).
    floor = _load_floor(obj)
    z = {layer: prob.add_variable(f"z_{layer}", lowBound=float(floor[layer]))
         for layer in range(num_layers)} if use_z else {}

    # --- objective: minimise B * sum z - A * (same-GPU transitions); J = that + A * total ---
    prob += (obj.bal_int * pulp.lpSum(z.values()) if use_z else 0) - obj.aff_int * pulp.lpSum(
        float(t[k]) * v for k, v in y.items() if t[k] > 0)
    offset = obj.aff_int * float(t.sum())

    # --- constraints ---
    for layer in range(num_layers):
        for e in range(num_experts):
            # Every expert sits on exactly one GPU.
            prob += pulp.lpSum(x[layer, e, g] for g in range(num_gpus)) == 1
        for g in range(num_gpus):
            # Every GPU holds its number of experts (equal slots per GPU).
            prob += pulp.lpSum(x[layer, e, g] for e in range(num_experts)) == caps[g]
            if use_z:
                # z[l] is at least every GPU's load.
                prob += z[layer] >= pulp.lpSum(float(load[layer, e]) * x[layer, e, g] for e in range(num_experts))
        if use_z and obj.has_cap:
            # The per-layer cap on the largest GPU load.
            prob += z[layer] <= float(obj.cap_load[layer])
    for (layer, i, j), v in y.items():
        for g in range(num_gpus):
            # Sharing needs j on i's GPU: y <= 1 - x[l,i,g] + x[l+1,j,g].
            prob += v <= 1 - x[layer, i, g] + x[layer + 1, j, g]
    if obj.equal:
        for layer in range(num_layers - 1):
            for i in range(num_experts):
                # Expert i of layer l shares its GPU with exactly E/G experts of layer l+1, and
                # expert i of layer l+1 with exactly E/G of layer l (makes y exact; strong cut).
                prob += pulp.lpSum(y[layer, i, j] for j in range(num_experts)) == caps[0]
                prob += pulp.lpSum(y[layer, j, i] for j in range(num_experts)) == caps[0]
    if obj.equal:
        # Symmetry breaking: layer 0's GPUs ordered by their smallest expert.
        for e in range(num_experts):
            for g in range(1, num_gpus):
                if e < g:
                    prob += x[0, e, g] == 0
                else:
                    prob += x[0, e, g] <= pulp.lpSum(x[0, k, g - 1] for k in range(e))

    # --- warm start (CBC) ---
    warm = hint is not None and backend == "cbc"
    if warm:
        h = _sym_relabel(obj, hint) if obj.equal else hint
        for (layer, e, g), v in x.items():
            v.setInitialValue(int(h[layer, e] == g))
        for (layer, i, j), v in y.items():
            v.setInitialValue(int(h[layer, i] == h[layer + 1, j]))
        if use_z:
            ml = coherent_cost(h, None, load, num_gpus)[1]
            for layer, v in z.items():
                v.setInitialValue(float(ml[layer]))

    # --- solve, triage, read back ---
    out = _run_pulp(prob, backend=backend, time_limit_s=time_limit_s, threads=threads, warm=warm)
    gpu = None
    if out.objective is not None:
        val = np.array([[[x[layer, e, g].varValue or 0.0 for g in range(num_gpus)]
                         for e in range(num_experts)] for layer in range(num_layers)])
        gpu = val.argmax(axis=2).astype(np.int64)
        if np.any(np.abs(val.max(axis=2) - 1.0) > 1e-6):
            gpu = None
    status = out.status if gpu is not None or out.status in ("infeasible", "unknown") else "unknown"
    return {"gpu": gpu, "status": status,
            "objective": None if out.objective is None else out.objective + offset,
            "bound": None if out.bound is None else out.bound + offset, "wall_time_s": out.wall_time_s}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def _p2l(gpu: np.ndarray, capacities: tuple[int, ...]) -> np.ndarray:
    """Experts of GPU g (ascending) fill its first slots. int32 [L, E] (equal capacities)."""
    del capacities
    return np.argsort(gpu, axis=1, kind="stable").astype(np.int32)


def _measure(problem: PlacementProblem, placement: Placement) -> dict[str, float | None]:
    """Cross-GPU top-1 transitions and max GPU loads of a placement, from placer.metrics."""
    stats = problem.stats
    gl = metrics.gpu_load(placement, problem.topology, stats, dispatch=problem.dispatch)
    lb = metrics.load_balance(gl)
    out: dict[str, float | None] = {
        "sum_max_gpu_load": float(gl.max(axis=1).sum()),
        "load_max_over_mean_median": lb["median"], "load_max_over_mean_worst": lb["worst"],
        "frac_top1_transitions_cross_gpu": None, "cross_gpu_transitions": 0.0}
    if stats.has_top1 and stats.num_layers > 1:
        if placement.num_redundant and stats.sample_size == 0:
            out["cross_gpu_transitions"] = None
            return out
        cc = metrics.context_coherent_traffic(placement, problem.topology, problem.model, stats,
                                              dispatch=problem.dispatch)
        frac = cc["frac_top1_transitions_cross_gpu"]
        out["frac_top1_transitions_cross_gpu"] = frac
        if placement.num_redundant:
            out["cross_gpu_transitions"] = None if frac is None else frac * float(stats.top1_transitions.sum())
        else:
            per = np.nan_to_num(cc["per_layer"]["frac_top1_transitions_cross_gpu"])
            out["cross_gpu_transitions"] = float((per * stats.top1_transitions.sum(axis=(1, 2))).sum())
    return out


def _result(problem: PlacementProblem, obj: CoherentObjective, p2l: np.ndarray, *, status: str,
            bound_j: float | None, wall: float, method: str, backend: str,
            extra: dict[str, float] | None = None, internal_j: float | None = None,
            cross_override: float | None = None) -> SolveResult:
    """Build the SolveResult; objective and terms come from placer.metrics (checked against J).

    ``cross_override``: cross-GPU transitions to use when the metrics cannot measure them (a
    replica placement without a token sample; see :func:`solve_coherent`).
    """
    placement = Placement(p2l, problem.slots_per_gpu, problem.model.num_experts)
    m = _measure(problem, placement)
    if m["cross_gpu_transitions"] is None and cross_override is not None:
        m["cross_gpu_transitions"] = cross_override
        total = float(problem.stats.top1_transitions.sum())
        m["frac_top1_transitions_cross_gpu"] = cross_override / total if total > 0 else None
    cross = m["cross_gpu_transitions"]
    objective = obj.affinity * (cross or 0.0) + obj.balance * float(m["sum_max_gpu_load"])
    if internal_j is not None:
        mine = obj.unit * internal_j
        if abs(mine - objective) > 1e-6 * max(1.0, abs(objective)) + 1e-12:
            raise RuntimeError(f"objective check failed: solver says {mine}, placer.metrics {objective}")
    bound = None if bound_j is None else obj.unit * bound_j
    if bound is not None:
        tol = 1e-6 * max(1.0, abs(objective))
        if bound > objective + tol:
            raise RuntimeError(f"bound {bound} exceeds the objective {objective}")
        bound = min(bound, objective)
    if status == "optimal":
        bound = objective
    gap = relative_gap(objective, bound)
    terms: dict[str, float] = {k: float(v) for k, v in m.items() if v is not None}
    terms.update({"affinity_cost": obj.affinity * (cross or 0.0),
                  "balance_cost": obj.balance * float(m["sum_max_gpu_load"]),
                  "weight_affinity": obj.affinity, "weight_balance": obj.balance})
    if obj.load_cap is not None:
        terms["load_cap"] = float(obj.load_cap)
    terms.update(extra or {})
    return SolveResult(placement=placement, status=status, objective=float(objective), terms=terms,
                       bound=bound, gap=gap if gap is not None else None, wall_time_s=wall,
                       method=method, backend=backend)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _exact_possible(obj: CoherentObjective) -> str | None:
    """None when an exact method applies, else the reason it does not."""
    e, g = obj.num_experts, obj.num_gpus
    if not obj.equal:
        return f"{e} experts do not split evenly over {g} GPUs"
    if e == g:
        return None
    n = count_partitions(e, g)
    if n > MAX_PARTITIONS:
        return f"{e} experts on {g} GPUs have {n:,} labelled partitions per layer (limit {MAX_PARTITIONS:,})"
    return None


def _proven(j: float, bound: float | None, violation: float = 0.0) -> str:
    """``optimal`` when a proven bound meets the objective (and no cap is violated), else ``feasible``."""
    if bound is not None and violation <= 0 and j - bound <= 1e-9 * max(1.0, abs(j)):
        return "optimal"
    return "feasible"


def _solve_primary(obj: CoherentObjective, backend: str, *, time_limit_s: float | None, seed: int,
                   deterministic_time: float | None, num_workers: int, pulp_backend: str,
                   warm_start: str | None, max_rounds: int) -> dict[str, Any]:
    """Place the E experts (no replicas). Returns gpu, status, J, bound (J units), backend."""
    if backend == "auto":
        backend = "exact" if _exact_possible(obj) is None else "local"
    if backend == "exact":
        why = _exact_possible(obj)
        if why is not None:
            raise InvalidInputError(f"exact needs no redundant slots and at most ~{MAX_PARTITIONS // 1000}k "
                                    f"partitions per layer ({why}); use --method placer", source="--method")
        if obj.num_experts == obj.num_gpus:
            # One expert per GPU: the load term is the same for every placement, the transition
            # term a chain of assignment problems (exact_one_per_gpu, here on the problem's T).
            from placer.ilp.exact import exact_one_per_gpu
            p2l = exact_one_per_gpu(np.round(obj.transitions)) if obj.num_layers > 1 else \
                np.arange(obj.num_experts, dtype=np.int32)[None, :]
            gpu = gpu_of_expert(p2l, 1)
            j = obj.parts(gpu)[0]
            return {"gpu": gpu, "status": "optimal", "j": j, "bound": j, "backend": "ortools-lap"}
        res = partition_dp(obj.transitions, obj.load, obj.num_gpus, affinity_weight=obj.aff_int,
                           load_weight=obj.bal_int,
                           cap_load=obj.cap_load if obj.has_cap else None)
        return {"gpu": res.gpu, "status": "optimal", "j": res.objective, "bound": res.objective,
                "backend": "numpy-dp"}
    if backend not in ("local", "cpsat", "pulp"):
        raise InvalidInputError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}", source="--backend")
    size = max(obj.num_layers - 1, 1) * obj.num_experts ** 2 * obj.num_gpus
    if backend in ("cpsat", "pulp") and size > MAX_MIP_SIZE:
        raise InvalidInputError(f"the {backend} model would have {size:,} linking constraints (limit "
                                f"{MAX_MIP_SIZE:,}); use backend 'local'", source="--backend")
    start = time.perf_counter()
    ls_limit = time_limit_s if backend == "local" else (None if time_limit_s is None else 0.25 * time_limit_s)
    gpu, info = local_search(obj, seed=seed, max_rounds=max_rounds, time_limit_s=ls_limit)
    bound = _lower_bound(obj)
    if backend == "local":
        return {"gpu": gpu, "status": _proven(info.key[1], bound, info.key[0]), "j": info.key[1],
                "bound": bound, "backend": "numpy-local", "start": info.start, "start_j": info.start_key[1]}
    hint = None
    if warm_start == "local":
        hint = gpu
    elif warm_start == "greedy":
        hint = _greedy_gpu(obj)
    elif warm_start is not None:
        raise InvalidInputError(f"warm_start must be 'local', 'greedy' or None, got {warm_start!r}",
                                source="warm_start")
    rest = None if time_limit_s is None else max(0.1, time_limit_s - (time.perf_counter() - start))
    if backend == "cpsat":
        out = solve_cpsat(obj, hint, time_limit_s=rest, deterministic_time=deterministic_time,
                          num_workers=num_workers, seed=seed)
        name = "cpsat"
    else:
        out = solve_pulp(obj, hint, backend=pulp_backend, time_limit_s=rest, threads=num_workers)
        name = f"pulp-{pulp_backend}"
    solver_bound = out["bound"]
    if backend == "cpsat" and not (np.all(obj.load == np.round(obj.load))
                                   and np.all(obj.transitions == np.round(obj.transitions))):
        # CP-SAT solved the rounded data: its bound and proof say nothing about the real objective.
        solver_bound = None
        if out["status"] == "optimal":
            out["status"] = "feasible"
    bounds = [b for b in (bound, solver_bound) if b is not None]
    best_bound = max(bounds) if bounds else None
    if out["gpu"] is None:
        # The solver found nothing (or nothing readable): keep the local search's placement.
        status = "infeasible" if out["status"] == "infeasible" else "timeout"
        if status == "infeasible":
            raise RuntimeError("the MIP is infeasible although a feasible placement is known")
        return {"gpu": gpu, "status": status, "j": info.key[1], "bound": best_bound, "backend": name,
                "mip_j": out["objective"], "mip_bound": solver_bound}
    cand = out["gpu"]
    ckey = obj.key(cand)
    status = out["status"]
    if ckey > info.key:  # the solver's incumbent is worse than the local search: keep the better
        cand, ckey = gpu, info.key
        if status == "optimal":
            status = "feasible"
    if status == "optimal" and ckey[0] > 0:
        status = "feasible"
    if status not in ("optimal", "timeout", "feasible"):
        status = "timeout"
    if _proven(ckey[1], best_bound, ckey[0]) == "optimal":
        status = "optimal"  # the b-matching + load bound (or the solver's) closes the gap
    return {"gpu": cand, "status": status, "j": ckey[1], "bound": best_bound, "backend": name,
            "mip_j": out["objective"], "mip_bound": solver_bound}


def _fill_replicas(problem: PlacementProblem, obj: CoherentObjective, gpu: np.ndarray,
                   deadline: float | None = None) -> tuple[np.ndarray, dict]:
    """Slots of every GPU: its experts, then replicas (see the module docstring). int32 [L, P].

    Candidate fills per layer: ``affinity`` (the experts most often the next top-1 of tokens
    whose state is on the GPU) and ``balance`` (each free slot, lightest GPU first, gets the
    expert with the largest load per copy that it does not hold yet). Layer by layer, a
    candidate replaces the layer's current fill only when placer.metrics scores the whole
    placement better, so the result is never worse than the neutral fill.
    """
    num_layers, num_experts = gpu.shape
    num_gpus, slots = problem.topology.num_gpus, problem.slots_per_gpu
    neutral = np.empty((num_layers, num_gpus * slots), dtype=np.int32)
    cands: list[dict[str, np.ndarray]] = []
    for layer in range(num_layers):
        own = [np.flatnonzero(gpu[layer] == g) for g in range(num_gpus)]
        free = [slots - len(o) for o in own]
        for g in range(num_gpus):
            neutral[layer, g * slots:(g + 1) * slots] = np.concatenate([own[g], np.resize(own[g], free[g])])
        if layer > 0:
            inflow = obj.transitions[layer - 1].T @ _onehot(gpu[layer - 1], num_gpus)   # [E, G]
        else:
            inflow = np.repeat(obj.load[0][:, None], num_gpus, axis=1)
        aff = neutral[layer].copy()
        for g in range(num_gpus):
            score = inflow[:, g].astype(np.float64).copy()
            score[own[g]] = -np.inf
            pick = [int(e) for e in np.argsort(-score, kind="stable")[:free[g]] if np.isfinite(score[e])]
            pick += list(np.resize(own[g], free[g] - len(pick)))
            aff[g * slots + len(own[g]):(g + 1) * slots] = pick
        bal = neutral[layer].copy()
        copies = np.ones(num_experts)
        held = [set(o.tolist()) for o in own]
        gl = np.array([obj.load[layer, o].sum() for o in own])
        for g in np.argsort(gl, kind="stable"):
            for k in range(free[g]):
                share = obj.load[layer] / copies
                share[list(held[g])] = -np.inf
                e = int(np.argmax(share))
                if not np.isfinite(share[e]):
                    break
                bal[g * slots + len(own[g]) + k] = e
                held[g].add(e)
                copies[e] += 1
        cands.append({"affinity": aff, "balance": bal})
    info: dict[str, float] = {}
    stats = problem.stats
    if not (stats.has_top1 and stats.sample_size > 0):
        info["replica_layers_filled"] = 0.0
        return neutral, info

    def score(p2l: np.ndarray) -> float:
        m = _measure(problem, Placement(p2l, slots, num_experts))
        return obj.affinity * (m["cross_gpu_transitions"] or 0.0) + obj.balance * m["sum_max_gpu_load"]

    cur, cur_score = neutral.copy(), score(neutral)
    info["objective_neutral_fill"] = cur_score
    changed = 0
    for layer in range(num_layers):
        if deadline is not None and time.perf_counter() > deadline:
            break
        best_name = None
        for name, row in cands[layer].items():
            trial = cur.copy()
            trial[layer] = row
            sc = score(trial)
            if sc < cur_score - 1e-12 * max(1.0, abs(cur_score)):
                best_name, best_row, cur_score_new = name, row, sc
                cur_score = sc
        if best_name is not None:
            cur[layer] = best_row
            cur_score = cur_score_new
            changed += 1
    info["replica_layers_filled"] = float(changed)
    return cur, info


def solve_coherent(problem: PlacementProblem, *, time_limit_s: float | None = None, seed: int = 0,
                   backend: str = "auto", pulp_backend: str = "cbc", load_cap: float | None = None,
                   deterministic_time: float | None = None, num_workers: int = 1,
                   warm_start: str | None = "local", max_rounds: int = 200,
                   method: str | None = None, **_) -> SolveResult:
    """Context-coherent placement of ``problem`` (any shape; see the module docstring).

    ``backend``: "auto" | "exact" | "local" | "cpsat" | "pulp" (``pulp_backend`` "cbc" |
    "highs"). ``warm_start``: "local" (default), "greedy" or None for CP-SAT / PuLP.
    ``deterministic_time`` and ``num_workers`` go to CP-SAT (``num_workers`` is also the MIP
    thread count); ``max_rounds`` bounds the local search. ``load_cap`` adds a hard per-layer
    max/mean GPU load cap. ``bound`` / ``gap`` are proven (exact, CP-SAT, MIP, or the
    b-matching + load bound for local search); None with replicas.
    """
    start = time.perf_counter()
    num_experts, num_gpus = problem.model.num_experts, problem.topology.num_gpus
    replicas = problem.num_redundant > 0
    caps = _capacities(num_experts, num_gpus)
    if replicas and max(caps) > problem.slots_per_gpu:  # cannot happen: P >= E
        raise InvalidInputError("not enough slots per GPU", source="--redundant")
    if backend == "exact" and replicas:
        raise InvalidInputError(f"exact needs no redundant slots (got --redundant {problem.num_redundant}) "
                                f"and at most ~{MAX_PARTITIONS // 1000}k partitions per layer; "
                                "use --method placer", source="--method")
    obj = make_objective(problem, capacities=caps, load_cap=load_cap)
    primary_backend = backend
    if replicas and backend in ("auto", "exact", "cpsat", "pulp") and not obj.equal:
        primary_backend = "local"  # the exact, CP-SAT and MIP models assume equal groups
    primary_limit = time_limit_s if time_limit_s is None or not replicas else 0.7 * time_limit_s
    out = _solve_primary(obj, primary_backend, time_limit_s=primary_limit, seed=seed,
                         deterministic_time=deterministic_time, num_workers=num_workers,
                         pulp_backend=pulp_backend, warm_start=warm_start, max_rounds=max_rounds)
    gpu = out["gpu"]
    extra: dict[str, float] = {}
    if "start_j" in out:
        extra["start_objective"] = obj.unit * out["start_j"]
    for key in ("mip_j", "mip_bound"):  # the MIP's own incumbent and bound (before the local fallback)
        if out.get(key) is not None:
            extra["mip_objective" if key == "mip_j" else "mip_bound"] = obj.unit * out[key]
    exact_backend = out["backend"] in ("ortools-lap", "numpy-dp")
    name = method or ("exact" if exact_backend and not replicas else f"coherent-{out['backend']}")
    if not replicas:
        wall = time.perf_counter() - start
        return _result(problem, obj, _p2l(gpu, caps), status=out["status"], bound_j=out["bound"],
                       wall=wall, method=name, backend=out["backend"], extra=extra, internal_j=out["j"])
    p2l, info = _fill_replicas(problem, obj, gpu, None if time_limit_s is None else start + time_limit_s)
    extra.update(info)
    override = None
    if problem.stats.has_top1 and problem.stats.sample_size == 0:
        # Neutral fill (no token sample to measure replicas): it routes exactly like the E
        # experts alone, whose transitions placer.metrics measures exactly from the stats when
        # the GPUs hold equal numbers of them (else the same count from coherent_cost).
        if obj.equal:
            primary = Placement(_p2l(gpu, caps), caps[0], num_experts)
            override = _measure(replace(problem, num_redundant=0), primary)["cross_gpu_transitions"]
        else:
            override = float(obj.parts(gpu)[1].sum())
    wall = time.perf_counter() - start
    return _result(problem, obj, p2l, status="feasible", bound_j=None, wall=wall, method=name,
                   backend=out["backend"], extra=extra, cross_override=override)


def compare_backends(problem: PlacementProblem, *, time_limit_s: float = 60.0, seed: int = 0,
                     backends: tuple[str, ...] = ("exact", "local", "cpsat", "cbc", "highs"),
                     warm_start: str | None = "local", num_workers: int = 1,
                     load_cap: float | None = None) -> dict[str, dict[str, Any]]:
    """Run several backends on one problem (no replicas) and compare them with the exact optimum.

    Returns ``{backend: {status, objective, bound, gap, wall_time_s, frac_top1_transitions_cross_gpu,
    load_max_over_mean_median, mip_objective, mip_bound, placement, rel_to_exact}}`` (``mip_*``:
    the MIP's own incumbent and bound before the local-search fallback) (``rel_to_exact`` = objective / exact - 1 when
    ``exact`` ran; ``error`` instead when a backend could not run).
    """
    from placer.ilp._pulp import highs_available

    out: dict[str, dict[str, Any]] = {}
    for name in backends:
        kwargs: dict[str, Any] = dict(time_limit_s=time_limit_s, seed=seed, load_cap=load_cap,
                                      num_workers=num_workers, warm_start=warm_start)
        if name in ("cbc", "highs"):
            if name == "highs" and not highs_available():
                out[name] = {"error": "highspy is not installed"}
                continue
            kwargs.update(backend="pulp", pulp_backend=name)
        else:
            kwargs["backend"] = name
        try:
            res = solve_coherent(problem, **kwargs)
        except InvalidInputError as exc:
            out[name] = {"error": str(exc)}
            continue
        out[name] = {"status": res.status, "objective": res.objective, "bound": res.bound, "gap": res.gap,
                     "wall_time_s": res.wall_time_s, "backend": res.backend,
                     "frac_top1_transitions_cross_gpu": res.terms.get("frac_top1_transitions_cross_gpu"),
                     "load_max_over_mean_median": res.terms.get("load_max_over_mean_median"),
                     "mip_objective": res.terms.get("mip_objective"), "mip_bound": res.terms.get("mip_bound"),
                     "placement": res.placement}
    exact = out.get("exact", {}).get("objective")
    for row in out.values():
        if exact is not None and "objective" in row:
            row["rel_to_exact"] = row["objective"] / exact - 1.0 if exact else 0.0
    return out

