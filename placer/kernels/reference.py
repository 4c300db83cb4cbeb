"""NumPy reference of the permute/unpermute kernels, and the bridge to placer's replica rule.

Everything here is NumPy: slow, obviously correct, and the definition the torch op and the
Triton kernels are tested against.

Semantics (shared by every implementation):

- ``slot_map`` sends logical expert ids to physical slots. It is either int ``[E]`` (one map
  for all tokens: a row ``dispatch_table(...)[layer, rank]`` of the rank-based rules ``nearest``
  and ``sglang-static``) or int ``[T, E]`` (one map per token: the position-based rules
  ``sglang-dynamic`` and ``vllm``). :func:`slot_map` builds either from a placement through :mod:`placer.metrics.dispatch`.
- ``permute`` writes ``T * K`` rows sorted by slot, and within a slot by (token, k): row
  ``r`` holds token ``r``'s input where ``order`` is the stable argsort of the flat slot ids.
  ``row_map[t, k]`` is the row holding copy ``k`` of token ``t``; ``slot_counts[p]`` is the
  number of rows for slot ``p`` (rows of slot ``p`` start at ``cumsum(slot_counts)[p - 1]``).
- ``unpermute`` returns ``out[t] = sum_k weights[t, k] * rows[row_map[t, k]]``, accumulated in
  float32 in the order ``k = 0, 1, ..., K - 1`` (each product rounded to float32, then added).
  Implementations that fuse the multiply-add (FMA) agree to within rounding of each term.
"""

from __future__ import annotations

import numpy as np

from placer.errors import InvalidInputError
from placer.metrics.dispatch import DEFAULT_DISPATCH_SEED, dispatch_table, replica_index
from placer.types import POSITION_RULES, Placement, Topology


def slot_map(placement: Placement, topology: Topology, layer: int, *, rank: int | None = None,
             positions: np.ndarray | None = None, rule: str = "nearest",
             seed: int = DEFAULT_DISPATCH_SEED, table: np.ndarray | None = None) -> np.ndarray:
    """Logical-to-slot map of one layer for the kernels, under placer's one replica rule.

    Parameters
    ----------
    placement, topology : the deployment (see :mod:`placer.types`).
    layer : int, MoE layer ordinal in ``[0, L)``.
    rank : int, the calling rank (home GPU of its tokens); required for ``nearest`` and
        ``sglang-static``.
    positions : int array, shape (T,), token rows; required for the position rules.
    rule, seed : the dispatch rule and its seed, as in :func:`placer.metrics.dispatch.dispatch_table`.
    table : int64 array, shape (L, G, E), optional precomputed ``dispatch_table`` (reuse it
        across layers and steps: computing it is the costly part).

    Returns
    -------
    ndarray of int64, shape (E,) for the rank-based rules, (T, E) for the position rules.
    Agrees with :func:`placer.metrics.dispatch.select_slots` for every token.
    """
    if not 0 <= layer < placement.num_layers:
        raise InvalidInputError(f"layer {layer} out of range [0, {placement.num_layers})",
                                source="slot_map")
    if rule in POSITION_RULES:
        if positions is None:
            raise InvalidInputError(f"the {rule} rule needs token positions", source="slot_map")
        pos = np.asarray(positions, dtype=np.int64)
        if pos.ndim != 1:
            raise InvalidInputError(f"positions must be 1-D, got shape {pos.shape}",
                                    source="slot_map")
        log2phy, cnt = placement.log2phy()[layer], placement.logcnt()[layer]  # [E, R], [E]
        experts = np.arange(placement.num_experts)
        return log2phy[experts[None, :], replica_index(pos[:, None], cnt[None, :], rule)]  # [T, E]
    if rank is None or not 0 <= rank < placement.num_gpus:
        raise InvalidInputError(f"rule {rule!r} needs a rank in [0, {placement.num_gpus}), "
                                f"got {rank}", source="slot_map")
    if table is None:
        table = dispatch_table(placement, topology, rule, seed)
    return np.ascontiguousarray(table[layer, rank], dtype=np.int64)


def split_sizes(slot_counts, slots_per_gpu: int):
    """Rows per destination rank from per-slot counts: slot ``p`` lives on GPU ``p // S``.

    ``slot_counts``: int, shape (P,) (NumPy array or torch tensor). Returns shape (P // S,),
    same array type, the ``input_split_sizes`` of an ``all_to_all_single`` over the rows.
    """
    num_slots = slot_counts.shape[0]
    if slots_per_gpu < 1 or num_slots % slots_per_gpu:
        raise InvalidInputError(f"{num_slots} slots do not split into GPUs of {slots_per_gpu}",
                                source="split_sizes")
    return slot_counts.reshape(num_slots // slots_per_gpu, slots_per_gpu).sum(1)


def route_reference(topk_ids: np.ndarray, slot_map: np.ndarray) -> np.ndarray:
    """Slot of every (token, k). ``topk_ids``: int [T, K]; ``slot_map``: int [E] or [T, E]."""
    ids = np.asarray(topk_ids, dtype=np.int64)
    smap = np.asarray(slot_map, dtype=np.int64)
    if smap.ndim == 1:
        return smap[ids]
    return np.take_along_axis(smap, ids, axis=1)


def permute_reference(x: np.ndarray, topk_ids: np.ndarray, slot_map: np.ndarray,
                      num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expert-sorted copies of the tokens.

    Parameters
    ----------
    x : float array, shape (T, H).
    topk_ids : int array, shape (T, K), logical expert ids in ``[0, E)``.
    slot_map : int array, shape (E,) or (T, E), slots in ``[0, num_slots)``.
    num_slots : int, P.

    Returns
    -------
    rows : shape (T * K, H), dtype of ``x``: rows sorted by slot, then token, then k.
    row_map : int64, shape (T, K): row of copy k of token t.
    slot_counts : int64, shape (P,): rows per slot.
    """
    x = np.asarray(x)
    slots = route_reference(topk_ids, slot_map)  # [T, K]
    t, k = slots.shape
    order = np.argsort(slots.ravel(), kind="stable")  # [T*K] flat (t, k) index of each row
    row_map = np.empty(t * k, dtype=np.int64)
    row_map[order] = np.arange(t * k)
    rows = x[order // k] if k else x[:0]
    counts = np.bincount(slots.ravel(), minlength=num_slots).astype(np.int64)
    return rows, row_map.reshape(t, k), counts


def unpermute_reference(rows: np.ndarray, row_map: np.ndarray,
                        weights: np.ndarray) -> np.ndarray:
    """Weighted sum of each token's k rows, in float32, in the order k = 0..K-1.

    ``rows``: float [N, H]; ``row_map``: int [T, K] in ``[0, N)``; ``weights``: float [T, K].
    Returns float32 [T, H].
    """
    rows = np.asarray(rows)
    row_map = np.asarray(row_map, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float32)
    acc = np.zeros((row_map.shape[0], rows.shape[1]), dtype=np.float32)
    for k in range(row_map.shape[1]):
        acc += rows[row_map[:, k]].astype(np.float32) * w[:, k, None]
    return acc
