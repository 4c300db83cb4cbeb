"""Compiled per-token dispatch counts (numba): every metric of a chunk in one pass.

:func:`add_counts` adds a chunk's per-layer counts under any dispatch rule (GPU load, the
standard-dispatch counts, the context-coherent counts) in one pass over its token-expert pairs:
each pair's replica looked up once (the rank rules' table of GPUs, or the position rules'
replica list and the token's key), distinct GPUs and nodes of a token-layer found with stamp
arrays (any cluster size). The counts equal those of the numpy reference in
:mod:`placer.metrics.core` (``chunk_gpus``, ``standard_counts``, ``cc_counts``; tested under
every rule in ``tests/metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placer._numba import njit
from placer.types import Placement

COUNT_NAMES = ("intra_node_ranks", "inter_node_nodes", "remote_node_ranks", "remote_landing_ranks",
               "token_slots_off_gpu", "token_slots_off_node")
"""The rows of the standard-dispatch counts, in order (``core.STANDARD_COUNTS``)."""
CC_NAMES = ("state_moves", "other_gpus", "cross_gpu", "cross_node")
"""The rows of the context-coherent counts (``core.CC_COUNTS``); ``cross_*`` use columns 0..L-2."""


@njit
def _all_counts(ids, home, key, by_rank, gpu_table, rep_gpu, rep_cnt, node_of, lane_of, coherent,
                load, std, cc, pairs):  # pragma: no cover - numba
    t, num_layers, k = ids.shape
    num_gpus = node_of.shape[0]
    by_pair = pairs.shape[1] > 0  # sends per rank pair wanted (a cluster with a bandwidth per pair)
    seen_gpu = np.zeros(num_gpus, dtype=np.int64)
    seen_node = np.zeros(num_gpus, dtype=np.int64)
    seen_other = np.zeros(num_gpus, dtype=np.int64)
    gpus = np.empty(k, dtype=np.int64)
    width = rep_gpu.shape[2]
    kmod = np.zeros(width + 1, dtype=np.int64)  # kmod[n]: the token's replica among n (position rules)
    stamp = 0
    for i in range(t):
        if not by_rank:
            for n in range(1, width + 1):
                kmod[n] = key[i] % n
        h = home[i]
        h_node = node_of[h]
        h_lane = lane_of[h]
        loc = h  # context-coherent: where the token's state is
        for layer in range(num_layers):
            stamp += 1
            for j in range(k):  # standard dispatch: every expert's replica chosen from home
                e = ids[i, layer, j]
                if by_rank:
                    g = np.int64(gpu_table[layer, h, e])
                else:
                    g = np.int64(rep_gpu[layer, e, kmod[rep_cnt[layer, e]]])
                gpus[j] = g
                load[layer, g] += 1
                node = node_of[g]
                if g != h:
                    std[4, layer] += 1
                if node != h_node:
                    std[5, layer] += 1
                if seen_gpu[g] == stamp:
                    continue
                seen_gpu[g] = stamp
                if node == h_node:
                    if g != h:
                        std[0, layer] += 1
                        if by_pair:
                            pairs[layer, h, g] += 1
                else:
                    land = g - lane_of[g] + h_lane  # home's lane in the remote node
                    std[2, layer] += 1
                    if lane_of[g] == h_lane:
                        std[3, layer] += 1
                    elif by_pair:
                        pairs[layer, land, g] += 1  # forwarded over the remote node's NVLink
                    if seen_node[node] != stamp:
                        seen_node[node] = stamp
                        std[1, layer] += 1
                        if by_pair:
                            pairs[layer, h, land] += 1  # the one RDMA send to the node
            if not coherent:
                continue
            # context-coherent: top-1 (column 0) chosen from where the state is, the others from there
            top1 = np.int64(gpu_table[layer, loc, ids[i, layer, 0]]) if by_rank else gpus[0]
            if top1 != loc:
                cc[0, layer] += 1
                if layer > 0:
                    cc[2, layer - 1] += 1
                    if node_of[top1] != node_of[loc]:
                        cc[3, layer - 1] += 1
            loc = top1
            seen_other[top1] = stamp  # top-1's GPU is not counted among the others
            for j in range(1, k):
                g = np.int64(gpu_table[layer, top1, ids[i, layer, j]]) if by_rank else gpus[j]
                if seen_other[g] != stamp:
                    seen_other[g] = stamp
                    cc[1, layer] += 1


@dataclass(frozen=True)
class DispatchArrays:
    """How :func:`add_counts` chooses replicas for one placement and rule (built once, reused per chunk).

    ``by_rank``: a rank-table rule; ``gpu_table`` int [L, G, E] is then the GPU each rank sends
    each expert to. Otherwise (position rules) ``rep_gpu`` int [L, E, X] holds the GPUs of each
    expert's replicas in ascending slot order and ``rep_cnt`` int64 [L, E] their number. GPU
    arrays are int16 (int32 past 32,767 GPUs), so a table stays in cache. ``node_of`` and
    ``lane_of`` int64 [G]: node and local index of every GPU.
    """

    by_rank: bool
    gpu_table: np.ndarray
    rep_gpu: np.ndarray
    rep_cnt: np.ndarray
    node_of: np.ndarray
    lane_of: np.ndarray

    @property
    def num_gpus(self) -> int:
        return int(self.node_of.shape[0])


def _gpu_dtype(num_gpus: int) -> type:
    return np.int16 if num_gpus <= np.iinfo(np.int16).max else np.int32


def rank_arrays(table: np.ndarray, slots_per_gpu: int, gpus_per_node: int, num_gpus: int) -> DispatchArrays:
    """:class:`DispatchArrays` of a rank rule's dispatch ``table`` int [L, G, E] (the slot each rank
    sends each expert to, :func:`placer.metrics.dispatch.dispatch_table`)."""
    small = _gpu_dtype(num_gpus)
    gpus = np.arange(num_gpus, dtype=np.int64)
    return DispatchArrays(True, (np.asarray(table) // slots_per_gpu).astype(small), np.zeros((1, 1, 1), dtype=small),
                          np.ones((1, 1), dtype=np.int64), gpus // gpus_per_node, gpus % gpus_per_node)


def dispatch_arrays(placement: Placement, gpus_per_node: int, table: np.ndarray | None) -> DispatchArrays:
    """:class:`DispatchArrays` of ``placement``: from the rank rule's dispatch ``table`` int [L, G, E],
    or for the position rules when it is None."""
    spg, num_gpus = placement.slots_per_gpu, placement.num_gpus
    if table is not None:
        return rank_arrays(table, spg, gpus_per_node, num_gpus)
    small = _gpu_dtype(num_gpus)
    gpus = np.arange(num_gpus, dtype=np.int64)
    slots = placement.log2phy()  # [L, E, X], -1 past each expert's replicas
    rep_gpu: np.ndarray = np.where(slots >= 0, slots // spg, -1).astype(small)
    return DispatchArrays(False, np.zeros((1, 1, 1), dtype=small), rep_gpu, placement.logcnt(),
                          gpus // gpus_per_node, gpus % gpus_per_node)


def add_counts(ids: np.ndarray, home: np.ndarray, key: np.ndarray, arrays: DispatchArrays, coherent: bool,
               load: np.ndarray, std: np.ndarray, cc: np.ndarray, pairs: np.ndarray) -> None:
    """Add one chunk's per-layer counts, in place, to ``load`` int64 [L, G] (token-slots per GPU,
    dispatched from home), ``std`` int64 [6, L] (rows :data:`COUNT_NAMES`), ``pairs`` int64
    [L, G, G] or empty [L, 0, 0] when not wanted (standard dispatch's sends from rank to rank per
    layer: home to each other rank
    of its node, one RDMA send to home's lane in each remote node, that rank's NVLink forwards
    to the others there) and, when ``coherent``, ``cc`` int64 [4, L] (rows :data:`CC_NAMES`).

    ``ids`` int [t, L, K] logical experts, C-contiguous (top-1 first when ``coherent``),
    ``home`` int64 [t] home ranks, ``key`` int64 [t] the position rules' replica key
    (:func:`placer.metrics.dispatch.position_key`; unread by the rank rules).
    """
    _all_counts(ids, home, key, arrays.by_rank, arrays.gpu_table, arrays.rep_gpu, arrays.rep_cnt,
                arrays.node_of, arrays.lane_of, bool(coherent), load, std, cc, pairs)


def table_standard_counts(ids: np.ndarray, home: np.ndarray, table: np.ndarray, slots_per_gpu: int,
                          gpus_per_node: int, num_gpus: int) -> dict[str, np.ndarray]:
    """Per-layer standard-dispatch counts of a chunk under a rank-table rule.

    ``ids`` int [t, L, K] logical experts, ``home`` int [t] home ranks, ``table`` int [L, G, E]
    (the slot each rank sends each expert to). Returns int64 [L] per name in
    :data:`COUNT_NAMES`, equal to ``core.standard_counts`` of ``core.chunk_gpus`` of the chunk.
    """
    ids = np.ascontiguousarray(ids)
    num_layers = ids.shape[1]
    std = np.zeros((len(COUNT_NAMES), num_layers), dtype=np.int64)
    home = np.ascontiguousarray(home, dtype=np.int64)
    add_counts(ids, home, home, rank_arrays(table, slots_per_gpu, gpus_per_node, num_gpus), False,
               np.zeros((num_layers, num_gpus), dtype=np.int64), std, np.zeros((len(CC_NAMES), num_layers), dtype=np.int64),
               np.zeros((num_layers, 0, 0), dtype=np.int64))
    return dict(zip(COUNT_NAMES, std, strict=True))
