"""Kernels behind :mod:`placer.metrics`: token resolution and per-chunk counting.

Everything here counts per layer; :mod:`placer.metrics` turns the counts into means and
fractions. Replica choice always comes from :mod:`placer.metrics.dispatch` (its table, or
:func:`~placer.metrics.dispatch.select_slots` for the position-based rules).
:func:`count_tokens` counts every metric of several placements in one pass with the compiled
kernel of :mod:`placer.metrics._count`; the numpy functions (``chunk_gpus``,
``standard_counts``, ``cc_counts``) are the reference it equals, and what the solvers use on samples.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from placer.errors import InvalidInputError
from placer.metrics._count import CC_NAMES, COUNT_NAMES, DispatchArrays, add_counts
from placer.metrics.dispatch import (
    default_home_ranks,
    dispatch_table,
    position_key,
    sample_home_ranks,
    select_slots,
)
from placer.metrics.stream import StreamTokens, TraceStream
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
MAX_COUNT_THREADS = 8
"""At most this many threads count tokens at once (:func:`count_tokens`)."""


def count_threads() -> int:
    """Threads :func:`count_tokens` counts with: the CPUs this process may run on, at most
    :data:`MAX_COUNT_THREADS`."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, MAX_COUNT_THREADS))


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

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[2])

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


def data_shape(data: RoutingTrace | TraceStream | RoutingStats) -> tuple[int, int, int]:
    """(L, E, K) of a trace, a trace stream or stats; raises on anything else."""
    if isinstance(data, (RoutingTrace, TraceStream, RoutingStats)):
        return data.num_layers, data.num_experts, data.top_k
    raise InvalidInputError(f"expected a RoutingTrace or RoutingStats, got {type(data).__name__}",
                            source="data")


def rank_table(placement: Placement, topology: Topology, rule: str, seed: int,
               model: ModelSpec | None = None) -> np.ndarray | None:
    """The dispatch table [L, G, E] for the rank-based rules, None for the position rules."""
    check_rule(rule)
    return None if rule in POSITION_RULES else dispatch_table(placement, topology, rule, seed, model=model)


def resolve_tokens(placement: Placement, topology: Topology, data: RoutingTrace | TraceStream | RoutingStats,
                   *, need_top1: bool, what: str) -> Tokens | StreamTokens:
    """The tokens metrics run on: the whole trace, the trace streamed, or the stats' reservoir sample."""
    num_layers, num_experts, _ = data_shape(data)
    check_shapes(placement, topology, num_layers, num_experts)
    num_gpus = placement.num_gpus
    if isinstance(data, TraceStream):
        if need_top1 and not data.has_top1:
            raise InvalidInputError(f"{what} needs the top-1 expert of each token, but the trace's expert order "
                                    "is unknown and it carries no gate weights", source="trace")
        return StreamTokens(data, need_top1, num_gpus, CHUNK_ELEMENTS)
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
        assert data.sample_token_index is not None and data.sample_home_rank is not None  # set with the sample
        index = data.sample_token_index.astype(np.int64)
        home = sample_home_ranks(data, num_gpus)
        source = "sample"
    if home.size and home.max() >= num_gpus:
        raise InvalidInputError(f"home rank {int(home.max())} is outside the cluster's {num_gpus} GPUs",
                                source="home_rank")
    return Tokens(as_int64(ids), home, index, source)


_INT64: list = [None, None]  # [the last source array, its int64 copy (read-only)]


def as_int64(ids: np.ndarray) -> np.ndarray:
    """``ids`` as int64, read-only; the copy of the last array asked for is kept and reused.

    Every metric of every placement reads the same expert ids (a DeepSeek-V3 trace of 20,000
    tokens: 74 MB as int64, 20 copies per ``placer solve``). Only a read-only source is cached
    (the routing types freeze theirs), and the cache holds it, so its id cannot be reused by
    another array while it is cached.
    """
    if ids.flags.writeable:
        return ids.astype(np.int64)
    if ids.dtype == np.int64:
        return ids
    if _INT64[0] is not ids:
        copy = ids.astype(np.int64)
        copy.setflags(write=False)
        _INT64[:] = [ids, copy]
    return _INT64[1]


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


STANDARD_COUNTS = COUNT_NAMES


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (int64 result)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    as_bytes = np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, 8)
    return _BYTE_BITS[as_bytes].sum(axis=-1, dtype=np.int64)


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
MASK_GPUS = 64
"""Up to this many GPUs, the distinct GPUs of a token-layer are counted as bits of one uint64."""


def gpu_masks(gpu: np.ndarray) -> np.ndarray:
    """Bit g set where any of the last axis is GPU g: uint64 [...] from int [..., K] (GPUs < 64)."""
    return np.bitwise_or.reduce(np.left_shift(np.uint64(1), gpu.astype(np.uint64)), axis=-1)


def standard_counts(gpu: np.ndarray, home: np.ndarray, gpus_per_node: int,
                    num_gpus: int | None = None) -> dict[str, np.ndarray]:
    """Per-layer sums over a chunk of standard (DeepEP normal) dispatch counts.

    ``gpu``: int64 [t, L, K] GPU of each chosen replica, ``home``: int64 [t]. Returns int64 [L]
    per name in :data:`STANDARD_COUNTS`. ``num_gpus`` (when known and at most
    :data:`MASK_GPUS`) selects the bit-mask path; both paths give the same counts.
    """
    h = home[:, None, None]
    off_gpu = (gpu != h).sum(axis=(0, 2))
    off_node = (gpu // gpus_per_node != h // gpus_per_node).sum(axis=(0, 2))
    if num_gpus is not None and num_gpus <= MASK_GPUS and num_gpus % gpus_per_node == 0:
        counts = _standard_counts_masks(gpu, home, gpus_per_node, num_gpus)
    else:
        counts = _standard_counts_sorted(gpu, home, gpus_per_node)
    counts["token_slots_off_gpu"] = off_gpu
    counts["token_slots_off_node"] = off_node
    return counts


def _standard_counts_sorted(gpu: np.ndarray, home: np.ndarray, gpus_per_node: int) -> dict[str, np.ndarray]:
    h = home[:, None, None]
    home_node = h // gpus_per_node
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
    }


def _standard_counts_masks(gpu: np.ndarray, home: np.ndarray, gpus_per_node: int,
                           num_gpus: int) -> dict[str, np.ndarray]:
    """The same counts from one uint64 of destination GPUs per token-layer (no sort)."""
    one, gpn = np.uint64(1), gpus_per_node
    mask = gpu_masks(gpu)  # [t, L]
    h = home.astype(np.uint64)
    node_bits = np.uint64((1 << gpn) - 1)
    home_node = (node_bits << (h // np.uint64(gpn) * np.uint64(gpn)))[:, None]
    lane = h % np.uint64(gpn)  # the landing GPU of each remote node has home's local index
    local = mask & home_node
    remote = mask & ~home_node
    lanes = np.zeros(home.shape, dtype=np.uint64)
    nodes = np.zeros(mask.shape, dtype=np.int64)  # nodes hit other than home's
    for node in range(num_gpus // gpn):
        first = np.uint64(node * gpn)
        lanes |= one << (lane + first)
        nodes += ((remote >> first) & node_bits) != 0
    return {
        "intra_node_ranks": _popcount(local & ~(one << h)[:, None]).sum(axis=0),
        "inter_node_nodes": nodes.sum(axis=0),
        "remote_node_ranks": _popcount(remote).sum(axis=0),
        "remote_landing_ranks": _popcount(remote & lanes[:, None]).sum(axis=0),
    }


CC_COUNTS = CC_NAMES


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
    if topology.num_gpus <= MASK_GPUS:
        other_gpus = _popcount(gpu_masks(others) & ~np.left_shift(np.uint64(1), top1.astype(np.uint64))).sum(axis=0)
    else:
        os_ = np.sort(others, axis=-1)
        other_gpus = (first_of_run(os_) & (os_ != top1[:, :, None])).sum(axis=(0, 2))
    return {
        "state_moves": (top1 != prev).sum(axis=0),
        "other_gpus": other_gpus,
        "cross_gpu": (top1[:, 1:] != top1[:, :-1]).sum(axis=0),
        "cross_node": (node1[:, 1:] != node1[:, :-1]).sum(axis=0),
    }


def count_tokens(tokens: Tokens | StreamTokens, arrays: Sequence[DispatchArrays], rule: str, coherent: bool,
                 num_layers: int, pairs: bool = False) -> list[dict[str, np.ndarray]]:
    """Every per-token count of several placements from one pass over ``tokens`` (compiled; up to
    :func:`count_threads` pieces of the stream counted at once into their own accumulators,
    summed at the end: integer sums, the same whatever the threads).

    ``arrays``: one :func:`~placer.metrics._count.dispatch_arrays` per placement, all for
    ``rule``. Returns per placement ``gpu_load`` int64 [L * G] (token-slots per layer and GPU,
    dispatched from home), :data:`STANDARD_COUNTS` int64 [L] and, when ``coherent`` (``tokens``
    resolved top-1 first), :data:`CC_COUNTS` (int64 [L], ``cross_*`` [L-1]): the sums over the
    chunks of ``bincount`` of :func:`chunk_gpus`, :func:`standard_counts` and :func:`cc_counts`;
    and, when ``pairs``, ``pair_sends`` int64 [L, G, G], standard dispatch's sends per layer and
    (from, to) rank pair (:func:`placer.metrics._count.add_counts`).
    """
    position = rule in POSITION_RULES
    parts = count_threads()  # pieces counted at once, piece n into accumulator n % parts
    acc = [[(np.zeros((num_layers, a.num_gpus), dtype=np.int64),
             np.zeros((len(COUNT_NAMES), num_layers), dtype=np.int64),
             np.zeros((len(CC_NAMES), num_layers), dtype=np.int64),
             np.zeros((num_layers, a.num_gpus, a.num_gpus) if pairs else (num_layers, 0, 0), dtype=np.int64))
            for _ in range(parts)] for a in arrays]
    in_flight: deque[list[Future]] = deque()  # per piece, its placements' jobs, oldest first
    with ThreadPoolExecutor(max_workers=parts) as pool:  # the kernel releases the GIL
        for n, (ids, home, index) in enumerate(tokens.chunks()):
            key = np.ascontiguousarray(position_key(index, rule) if position else index, dtype=np.int64)
            ids, home = np.ascontiguousarray(ids), np.ascontiguousarray(home, dtype=np.int64)
            if len(in_flight) == parts:  # the oldest piece used the accumulators this one takes
                for job in in_flight.popleft():
                    job.result()
            in_flight.append([pool.submit(add_counts, ids, home, key, a, coherent, *part[n % parts])
                              for a, part in zip(arrays, acc, strict=True)])
        for jobs in in_flight:
            for job in jobs:
                job.result()
    summed = [tuple(sum(counts) for counts in zip(*part, strict=True)) for part in acc]
    out = []
    for load, std, cc, pair_sends in summed:
        c = {"gpu_load": load.reshape(-1), **dict(zip(STANDARD_COUNTS, std, strict=True))}
        if pairs:
            c["pair_sends"] = pair_sends
        if coherent:
            c.update({"state_moves": cc[0], "other_gpus": cc[1], "cross_gpu": cc[2, :max(num_layers - 1, 0)],
                      "cross_node": cc[3, :max(num_layers - 1, 0)]})
        out.append(c)
    return out


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
