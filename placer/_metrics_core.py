"""Kernels behind :mod:`placer.metrics`: token resolution and per-chunk counting (plain numpy).

Everything here counts per layer; :mod:`placer.metrics` turns the counts into means and
fractions. Replica choice always comes from :mod:`placer.dispatch` (its table, or
:func:`~placer.dispatch.select_slots` for the position-based rules).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from placer.dispatch import default_home_ranks, dispatch_table, select_slots
from placer.errors import InvalidInputError
from placer.types import (
    DISPATCH_RULES,
    POSITION_RULES,
    ModelSpec,
    Placement,
    RoutingStats,
    RoutingTrace,
    Topology,
)

CHUNK_ELEMENTS = 1 << 20
"""Token-layer-expert entries processed at once (bounds temporary memory)."""


@dataclass(frozen=True)
class Tokens:
    """Per-token routing resolved for metrics.

    ``ids`` int64 [T, L, K] (top-1 first when ``top1_known``), ``home`` int64 [T] home ranks,
    ``index`` int64 [T] stream positions (rows, for the position rules), ``source`` "trace" | "sample".
    """

    ids: np.ndarray
    home: np.ndarray
    index: np.ndarray
    source: str

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        t, num_layers, k = self.ids.shape
        step = max(1, CHUNK_ELEMENTS // max(1, num_layers * k))
        for start in range(0, t, step):
            sl = slice(start, start + step)
            yield self.ids[sl], self.home[sl], self.index[sl]


def check_rule(rule: str) -> None:
    if rule not in DISPATCH_RULES:
        raise InvalidInputError(f"unknown dispatch rule {rule!r}; known: {', '.join(DISPATCH_RULES)}",
                                source="--dispatch")


def check_shapes(placement: Placement, topology: Topology, num_layers: int, num_experts: int) -> None:
    if placement.num_gpus != topology.num_gpus:
        raise InvalidInputError(f"placement spans {placement.num_gpus} GPUs, cluster has "
                                f"{topology.num_gpus}", source="placement")
    if num_layers != placement.num_layers or num_experts != placement.num_experts:
        raise InvalidInputError(f"routing has {num_layers} layers x {num_experts} experts, placement "
                                f"{placement.num_layers} x {placement.num_experts}", source="placement")


def data_shape(data: RoutingTrace | RoutingStats) -> tuple[int, int, int]:
    """(L, E, K) of a trace or stats; raises on anything else."""
    if isinstance(data, (RoutingTrace, RoutingStats)):
        return data.num_layers, data.num_experts, data.top_k
    raise InvalidInputError(f"expected a RoutingTrace or RoutingStats, got {type(data).__name__}",
                            source="data")


def rank_table(placement: Placement, topology: Topology, rule: str, seed: int,
               model: ModelSpec | None = None) -> np.ndarray | None:
    """The dispatch table [L, G, E] for the rank-based rules, None for the position rules."""
    check_rule(rule)
    return None if rule in POSITION_RULES else dispatch_table(placement, topology, rule, seed, model=model)


def resolve_tokens(placement: Placement, topology: Topology, data: RoutingTrace | RoutingStats, *,
                   need_top1: bool, what: str) -> Tokens:
    """The tokens metrics run on: the whole trace, or the stats' reservoir sample."""
    num_layers, num_experts, _ = data_shape(data)
    check_shapes(placement, topology, num_layers, num_experts)
    num_gpus = placement.num_gpus
    if isinstance(data, RoutingTrace):
        ids = data.sorted_ids() if need_top1 else data.expert_ids
        index = np.arange(data.num_tokens, dtype=np.int64)
        home = (default_home_ranks(index, num_gpus) if data.home_rank is None
                else data.home_rank.astype(np.int64))
        source = "trace"
    else:
        if need_top1:
            data.require_top1(what)
        ids = data.require_sample(what)
        index = data.sample_token_index.astype(np.int64)
        raw = data.sample_home_rank.astype(np.int64)
        home = np.where(raw >= 0, raw, default_home_ranks(index, num_gpus))
        source = "sample"
    if home.size and home.max() >= num_gpus:
        raise InvalidInputError(f"home rank {int(home.max())} is outside the cluster's {num_gpus} GPUs",
                                source="home_rank")
    return Tokens(ids.astype(np.int64), home, index, source)


def first_of_run(sorted_vals: np.ndarray) -> np.ndarray:
    """True where a value differs from its left neighbour along the last (sorted) axis."""
    out = np.ones(sorted_vals.shape, dtype=bool)
    np.not_equal(sorted_vals[..., 1:], sorted_vals[..., :-1], out=out[..., 1:])
    return out


def chunk_gpus(placement: Placement, topology: Topology, ids: np.ndarray, home: np.ndarray,
               index: np.ndarray, rule: str, seed: int, table: np.ndarray | None) -> np.ndarray:
    """GPU serving every (token, layer, k) of a chunk when tokens dispatch from home. int64 [t, L, K]."""
    slots = select_slots(placement, topology, ids, home_rank=home, token_index=index, rule=rule,
                         seed=seed, table=table)
    return slots // placement.slots_per_gpu


STANDARD_COUNTS = ("intra_node_ranks", "inter_node_nodes", "remote_node_ranks", "remote_landing_ranks",
                   "token_slots_off_gpu", "token_slots_off_node")


def standard_counts(gpu: np.ndarray, home: np.ndarray, gpus_per_node: int) -> dict[str, np.ndarray]:
    """Per-layer sums over a chunk of standard (DeepEP normal) dispatch counts.

    ``gpu``: int64 [t, L, K] GPU of each chosen replica, ``home``: int64 [t]. Returns int64 [L]
    per name in :data:`STANDARD_COUNTS`.
    """
    h = home[:, None, None]
    home_node = h // gpus_per_node
    off_gpu = (gpu != h).sum(axis=(0, 2))
    off_node = (gpu // gpus_per_node != home_node).sum(axis=(0, 2))
    gs = np.sort(gpu, axis=-1)
    ns = gs // gpus_per_node  # sorted too: node is monotone in GPU
    first = first_of_run(gs)
    local = ns == home_node
    intra = first & local & (gs != h)
    remote = first & ~local
    landing = remote & (gs % gpus_per_node == h % gpus_per_node)
    nodes = first_of_run(ns) & ~local
    return {
        "intra_node_ranks": intra.sum(axis=(0, 2)),
        "inter_node_nodes": nodes.sum(axis=(0, 2)),
        "remote_node_ranks": remote.sum(axis=(0, 2)),
        "remote_landing_ranks": landing.sum(axis=(0, 2)),
        "token_slots_off_gpu": off_gpu,
        "token_slots_off_node": off_node,
    }


CC_COUNTS = ("state_moves", "other_gpus", "cross_gpu", "cross_node")


def coherent_gpus(placement: Placement, topology: Topology, ids: np.ndarray, home: np.ndarray,
                  index: np.ndarray, rule: str, seed: int,
                  table: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """GPUs under context-coherent execution: ``top1`` int64 [t, L] (where the state lives) and
    ``others`` int64 [t, L, K-1] (the other experts' replicas, chosen from the top-1 GPU).

    The state starts on ``home``; each layer's top-1 replica is chosen from where the state is.
    ``table`` is the rank-based dispatch table, or None for the position-based rules.
    """
    spg = placement.slots_per_gpu
    t, num_layers, _ = ids.shape
    if table is None:  # position rules: the replica depends on the token's position only
        gpu = chunk_gpus(placement, topology, ids, home, index, rule, seed, None)
        return gpu[:, :, 0], gpu[:, :, 1:]
    top1 = np.empty((t, num_layers), dtype=np.int64)
    loc = home
    for layer in range(num_layers):
        loc = table[layer, loc, ids[:, layer, 0]] // spg
        top1[:, layer] = loc
    others = table[np.arange(num_layers)[None, :, None], top1[:, :, None], ids[:, :, 1:]] // spg
    return top1, others


def cc_counts(placement: Placement, topology: Topology, ids: np.ndarray, home: np.ndarray,
              index: np.ndarray, rule: str, seed: int, table: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-layer sums over a chunk of context-coherent (ExFlow) execution counts.

    ``ids``: int64 [t, L, K] top-1 first. The state starts on ``home`` and follows the GPU of the
    replica of the top-1 expert chosen from where the state is; the other experts dispatch from
    that GPU. Returns ``state_moves`` [L], ``other_gpus`` [L] (distinct GPUs other than the top-1
    GPU among the other experts' replicas), ``cross_gpu`` and ``cross_node`` [L-1] (top-1 GPU
    or node changes between consecutive layers).
    """
    gpn = topology.gpus_per_node
    top1, others = coherent_gpus(placement, topology, ids, home, index, rule, seed, table)
    prev = np.concatenate([home[:, None], top1[:, :-1]], axis=1)
    node1 = top1 // gpn
    os_ = np.sort(others, axis=-1)
    other = first_of_run(os_) & (os_ != top1[:, :, None])
    return {
        "state_moves": (top1 != prev).sum(axis=0),
        "other_gpus": other.sum(axis=(0, 2)),
        "cross_gpu": (top1[:, 1:] != top1[:, :-1]).sum(axis=0),
        "cross_node": (node1[:, 1:] != node1[:, :-1]).sum(axis=0),
    }


def accumulate(tokens: Tokens, names: tuple[str, ...], count_fn, num_layers: int) -> dict[str, np.ndarray]:
    """Sum ``count_fn(ids, home, index)`` over the token chunks (int64 arrays per name)."""
    totals: dict[str, np.ndarray] = {}
    for ids, home, index in tokens.chunks():
        for name, v in count_fn(ids, home, index).items():
            totals[name] = totals[name] + v if name in totals else v.astype(np.int64)
    for name in names:
        if name not in totals:
            size = num_layers - 1 if name in ("cross_gpu", "cross_node") else num_layers
            totals[name] = np.zeros(max(size, 0), dtype=np.int64)
    return totals


def exact_top1_transitions(placement: Placement, topology: Topology,
                           transitions: np.ndarray) -> dict[str, np.ndarray]:
    """Cross-GPU and cross-node top-1 transitions per layer pair from ``[L-1, E, E]`` counts.

    Only valid without replicas (each expert's GPU is fixed). Returns int64 [L-1] ``cross_gpu``,
    ``cross_node`` and ``total``.
    """
    num_layers = placement.num_layers
    gpu = np.empty((num_layers, placement.num_experts), dtype=np.int64)
    gpu[np.arange(num_layers)[:, None], placement.physical_to_logical] = placement.gpu_of_slot()[None, :]
    node = gpu // topology.gpus_per_node
    diff_gpu = gpu[:-1, :, None] != gpu[1:, None, :]
    diff_node = node[:-1, :, None] != node[1:, None, :]
    return {
        "cross_gpu": (transitions * diff_gpu).sum(axis=(1, 2)),
        "cross_node": (transitions * diff_node).sum(axis=(1, 2)),
        "total": transitions.sum(axis=(1, 2)),
    }
