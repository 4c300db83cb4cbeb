"""Weights and integer objective of context-coherent placement (see :mod:`placer.ilp.coherent`).

:func:`coherent_weights` prices a cross-GPU top-1 transition and a token-slot of per-layer max
GPU load in seconds from the shared cost model (:mod:`placer.costs`); :func:`make_objective`
turns them and the problem's weights into the :class:`CoherentObjective` every backend
minimises. :func:`_lower_bound` is the proven bound used where nothing exact applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from placer.costs import token_costs
from placer.errors import InvalidInputError
from placer.ilp.base import PlacementProblem
from placer.ilp.exact import (
    MAX_PARTITIONS,
    coherent_cost,
    count_partitions,
    enumerate_partitions,
    pair_matching_bound,
)
from placer.types import ModelSpec, Topology

__all__ = ["DEFAULT_BALANCE_SCALE", "CoherentObjective", "coherent_weights", "make_objective"]

DEFAULT_BALANCE_SCALE = 0.0373
"""Factor on the balance weight of :func:`coherent_weights` used when ``problem.weights`` has no
"balance" key. Empirical, not physical: it makes one token-slot of max load worth 1.2 cross-GPU
transitions for Mixtral-8x7B on H100 NVLink (unscaled: 32), the trade-off that best met the
held-out targets of ``benchmarks/eval_coherent.py``. The unscaled FLOP cost describes
compute-bound prefill; in memory-bound decode a token's share of expert time is far smaller."""


def coherent_weights(model: ModelSpec, topology: Topology) -> dict[str, Any]:
    """Weights of the context-coherent objective in seconds (counts when sizes are unknown).

    From the shared cost model (:func:`placer.costs.token_costs`). ``affinity``: seconds per
    cross-GPU top-1 transition, ``token_bytes`` over NVLink for a GPU in the same node and over
    the NIC otherwise, mixed by the share ``(gpus_per_node - 1) / (G - 1)`` of other GPUs in the
    same node. ``balance``: seconds per token-slot of per-layer max GPU load, ``6 * hidden *
    ffn`` FLOPs at :data:`placer.costs.COMPUTE_EFFICIENCY` of ``bf16_flops``. ``units``: "s" or
    "count".
    """
    if not model.sizes_known or model.token_bytes <= 0:
        return {"affinity": 1.0, "balance": 1.0, "units": "count"}
    g, gpn = topology.num_gpus, topology.gpus_per_node
    same_node = 1.0 if g <= 1 else (gpn - 1) / (g - 1)
    cost = token_costs(model, topology)
    affinity = same_node * cost.nvlink_s + (1.0 - same_node) * cost.nic_s
    return {"affinity": float(affinity), "balance": float(cost.expert_s), "units": "s"}


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

