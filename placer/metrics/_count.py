"""Compiled per-token dispatch counts for the rank-table rules (numba).

:func:`table_standard_counts` gives exactly what :func:`placer.metrics.core.standard_counts`
gives on ``chunk_gpus(...)`` for a rule with a dispatch table (``nearest``, ``sglang-static``,
``vllm-ascend``), without building the [t, L, K] slot and GPU arrays: one pass over the
token-expert pairs, each looked up in the table once, distinct GPUs and nodes of a token-layer
found with stamp arrays (any cluster size).
"""

from __future__ import annotations

import numpy as np

from placer._numba import njit

COUNT_NAMES = ("intra_node_ranks", "inter_node_nodes", "remote_node_ranks", "remote_landing_ranks",
               "token_slots_off_gpu", "token_slots_off_node")
"""The rows of :func:`table_standard_counts`' result, in order (``core.STANDARD_COUNTS``)."""


@njit
def _counts(ids, home, gpu_table, node_of, lane_of, num_gpus):  # pragma: no cover - numba
    t, num_layers, k = ids.shape
    out = np.zeros((6, num_layers), dtype=np.int64)
    seen_gpu = np.zeros(num_gpus, dtype=np.int64)
    seen_node = np.zeros(num_gpus, dtype=np.int64)
    stamp = 0
    for layer in range(num_layers):  # layer outer: one layer's table ([G, E]) stays in cache
        table = gpu_table[layer]
        for i in range(t):
            h = home[i]
            h_node = node_of[h]
            h_lane = lane_of[h]
            stamp += 1
            row = table[h]
            for j in range(k):
                g = row[ids[i, layer, j]]
                node = node_of[g]
                if g != h:
                    out[4, layer] += 1
                if node != h_node:
                    out[5, layer] += 1
                if seen_gpu[g] == stamp:
                    continue
                seen_gpu[g] = stamp
                if node == h_node:
                    if g != h:
                        out[0, layer] += 1
                else:
                    out[2, layer] += 1
                    if lane_of[g] == h_lane:
                        out[3, layer] += 1
                    if seen_node[node] != stamp:
                        seen_node[node] = stamp
                        out[1, layer] += 1
    return out


def table_standard_counts(ids: np.ndarray, home: np.ndarray, table: np.ndarray, slots_per_gpu: int,
                          gpus_per_node: int, num_gpus: int) -> dict[str, np.ndarray]:
    """Per-layer standard-dispatch counts of a chunk under a rank-table rule.

    ``ids`` int [t, L, K] logical experts, ``home`` int [t] home ranks, ``table`` int64 [L, G, E]
    (the slot each rank sends each expert to, :func:`placer.metrics.dispatch.dispatch_table`).
    Returns int64 [L] per name in :data:`COUNT_NAMES`, equal to ``standard_counts`` of the chunk.
    """
    gpu_table = (np.asarray(table) // slots_per_gpu).astype(np.int32)  # [L, G, E], a third of the bytes
    gpus = np.arange(num_gpus, dtype=np.int64)
    counts = _counts(np.ascontiguousarray(ids), np.ascontiguousarray(home, dtype=np.int64), gpu_table,
                     gpus // gpus_per_node, gpus % gpus_per_node, int(num_gpus))
    return dict(zip(COUNT_NAMES, counts, strict=True))
