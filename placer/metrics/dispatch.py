"""Replica dispatch: which physical slot serves a token's logical expert.

One rule is used by metrics, solvers, simulator and runtime alike, so load and traffic are
always computed under the same choice of replica. Four rules reproduce a released stack's
choice; ``nearest`` is placer's idealised rule.

Rank-based rules (each (rank, layer, logical expert) has one fixed replica,
:func:`dispatch_table`):

- ``sglang-static``: SGLang 0.5.23's ``--ep-dispatch-algorithm static`` with an a2a backend
  (``--moe-a2a-backend deepep``), reproduced exactly (``python/sglang/srt/eplb/
  expert_location.py``). Each EP rank first collapses its own candidate lists
  (``_compute_logical_to_all_physical_map``): a single replica stays; else the first replica on
  the rank's GPU; else the first replica on its node, but only when some and not all replicas
  are on the node; else the full list. Each rank then builds the whole table from its own lists
  (``compute_logical_to_rank_dispatch_physical_map``) with a fresh ``random.Random(42)``,
  dealing the ranks left without a replica over the candidates (``_fair_choices``: each
  candidate ``k // n`` times, ``random.sample`` for the remainder, then ``shuffle``), and keeps
  its own row. Ranks draw from different lists, so their streams diverge and the spreads of
  different ranks do not coordinate. The stream runs through every hidden layer in order,
  dense layers too (their rows are the trivial ``arange(P) % E`` that placer's SGLang export
  writes), so the model's layer layout is needed for exact tables.
- ``vllm-ascend``: vllm-ascend 0.23.0.post1's static EPLB with tensor parallel size 1 (the
  flags placer prints): the tokens of EP rank ``r`` use replica ``r % n`` of an expert with
  ``n`` replicas, replicas in ascending slot order (``generate_log2phy_map`` in
  ``vllm_ascend/eplb/core/eplb_utils.py``, run on CPU against these tables in
  ``tests/stacks/test_vllm_ascend_stack.py``). With TP ``T > 1`` the release picks
  ``(r % T + r // T + expert) % n`` instead, which placer does not score.
- ``nearest`` (placer's idealised rule, not any stack's): a replica on the token's own GPU, else
  one on the same node, else a spread over all replicas, all coordinated across ranks: the
  ranks that need a remote replica are dealt to the candidates in equal numbers (the remainder
  to a seeded random subset). It is the balance a stack could get with a coordinated table.

Position-based rules (the replica depends on the token's row in the batch,
:func:`replica_index`):

- ``sglang-dynamic``: SGLang 0.5.23's ``dynamic`` dispatch with ``--moe-a2a-backend none``
  (rank-invariant): replica ``row % replicas`` (``_topk_ids_logical_to_physical_dynamic``).
- ``vllm``: vLLM 0.34.0's EPLB mapping, replica ``((row * 2654435769) & 0xFFFFFFFF) %
  replicas`` (Knuth's multiplicative hash in ``vllm/model_executor/layers/fused_moe/
  eplb_triton.py``, a Triton kernel: encoded here from the release's source, not run).

Replicas are listed in ascending slot order, as both stacks list them. A trace's token index
stands in for the row in the batch.
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict

import numpy as np

from placer._numba import cache_holds, njit
from placer.errors import InvalidInputError
from placer.types import DISPATCH_RULES, POSITION_RULES, ModelSpec, Placement, Topology

DEFAULT_DISPATCH_SEED = 42
KNUTH_MULTIPLIER = 2654435769
_TABLE_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()
_TABLE_CACHE_SIZE = 8
_TABLE_LOCK = threading.Lock()


def _check_rule(rule: str) -> None:
    if rule not in DISPATCH_RULES:
        raise InvalidInputError(f"unknown dispatch rule {rule!r}; known: {', '.join(DISPATCH_RULES)}",
                                source="--dispatch")


def position_key(token_index: np.ndarray, rule: str) -> np.ndarray:
    """The position rules' key of each row: the replica is ``key % replicas``. int64, shaped like
    ``token_index`` (the row itself for ``sglang-dynamic``, Knuth's hash of it for ``vllm``)."""
    index = np.asarray(token_index, dtype=np.int64)
    if rule == "vllm":
        return (index * KNUTH_MULTIPLIER) & 0xFFFFFFFF
    if rule != "sglang-dynamic":
        raise InvalidInputError(f"rule {rule!r} chooses replicas by rank, not by position",
                                source="--dispatch")
    return index


def replica_index(token_index: np.ndarray, count: np.ndarray, rule: str) -> np.ndarray:
    """Replica rank (0-based, into the ascending slot list) for the position-based rules.

    ``token_index`` and ``count`` broadcast against each other (int arrays).
    """
    return position_key(token_index, rule) % np.asarray(count, dtype=np.int64)


def hidden_layer_map(placement: Placement, model: ModelSpec | None) -> tuple[np.ndarray, np.ndarray]:
    """``(full int64 [H, P], moe_rows [L])``: the map over every hidden layer as SGLang loads it.

    Dense layers get the trivial ``arange(P) % E``; without a model every layer is a MoE layer.
    """
    p2l = placement.physical_to_logical
    if model is None or model.num_hidden_layers == placement.num_layers:
        return p2l.astype(np.int64), np.arange(placement.num_layers)
    rows = np.asarray(model.moe_layer_ids, dtype=np.int64)
    full = np.tile(np.arange(placement.num_slots, dtype=np.int64) % placement.num_experts,
                   (model.num_hidden_layers, 1))
    full[rows] = p2l
    return full, rows


def _nearest_sglang(cands: list[int], spg: int, gpn: int, num_gpus: int) -> np.ndarray:
    """SGLang's ``_find_nearest_expert`` for every rank: the slot, or -1. int64 [G]."""
    out = np.full(num_gpus, -1, dtype=np.int64)
    if len(cands) == 1:
        out[:] = cands[0]
        return out
    c = np.asarray(cands, dtype=np.int64)
    gpu = c // spg
    node = gpu // gpn
    for rank in range(num_gpus):
        same = c[gpu == rank]
        if same.size:
            out[rank] = same[0]
            continue
        local = c[node == rank // gpn]
        if 0 < local.size < c.size:
            out[rank] = local[0]
    return out


def sglang_static_table(full_map: np.ndarray, num_gpus: int, num_nodes: int,
                        seed: int = DEFAULT_DISPATCH_SEED, num_experts: int | None = None) -> np.ndarray:
    """SGLang 0.5.23's static dispatch table of every EP rank, int64 ``[H, G, E]``.

    ``full_map``: int [H, P] over every hidden layer (dense rows included), slot ``p`` on GPU
    ``p // (P / G)``; ``num_nodes`` is SGLang's ``--nnodes``. See the module docstring.
    """
    full_map = np.asarray(full_map, dtype=np.int64)
    num_layers, num_slots = full_map.shape
    num_experts = int(full_map.max()) + 1 if num_experts is None else num_experts
    spg, gpn = num_slots // num_gpus, num_gpus // num_nodes
    out = np.full((num_layers, num_gpus, num_experts), -1, dtype=np.int64)
    # Draw events in SGLang's loop order: (layer, expert) with >= 2 replicas where some rank is
    # left without a nearest replica; those ranks draw, each from its own stream.
    events: list[tuple[int, int, list[int], np.ndarray]] = []
    for layer in range(num_layers):
        row = full_map[layer]
        order = np.argsort(row, kind="stable")
        bounds = np.searchsorted(row[order], np.arange(num_experts + 1))
        for expert in range(num_experts):
            cands = order[bounds[expert]:bounds[expert + 1]].tolist()
            nearest = _nearest_sglang(cands, spg, gpn, num_gpus)
            out[layer, :, expert] = nearest
            remaining = np.flatnonzero(nearest < 0)
            if remaining.size:
                events.append((layer, expert, cands, remaining))
    if not events:
        return out
    member = np.zeros((len(events), num_gpus), dtype=bool)
    for ev, (_, _, _, remaining) in enumerate(events):
        member[ev, remaining] = True
    # Ranks with the same draw events share one stream; run each distinct stream once.
    _, group_of_rank = np.unique(member.T, axis=0, return_inverse=True)
    for group in np.unique(group_of_rank):
        ranks = np.flatnonzero(group_of_rank == group)
        rng = random.Random(seed)
        for i in np.flatnonzero(member[:, ranks[0]]):
            layer, expert, cands, remaining = events[i]
            quotient, remainder = divmod(len(remaining), len(cands))
            choices = cands * quotient + rng.sample(cands, k=remainder)
            rng.shuffle(choices)
            pos = np.searchsorted(remaining, ranks)
            out[layer, ranks, expert] = np.asarray(choices, dtype=np.int64)[pos]
    return out


# The compiled table draws as numpy's Generator.choice(replace=False) and permutation do, with
# the Generator's public calls (equal streams: tests/metrics/test_nearest_table.py).


@njit
def _shuffle_from(rng, data, first):  # pragma: no cover - numba
    """numpy's ``_shuffle_int`` (``choice``'s shuffle): ``data[i]`` swapped with a draw below ``i +
    1`` (``rng.integers``: numpy's Lemire draws), ``i`` from the end down to ``first``."""
    for i in range(len(data) - 1, first - 1, -1):
        j = rng.integers(0, i + 1)
        data[i], data[j] = data[j], data[i]


@njit
def _shuffle(rng, data, n):  # pragma: no cover - numba
    """``rng.shuffle(data[:n])`` (``permutation``'s draws; fewer than 2**32 items): ``data[i]``
    swapped with a draw in ``[0, i]`` by numpy's ``random_interval``, masked rejection of raw
    32-bit draws."""
    for i in range(n - 1, 0, -1):
        mask = 1
        while mask < i:
            mask = 2 * mask + 1
        j = i + 1
        while j > i:
            j = np.int64(rng.integers(0, 0xFFFFFFFF, dtype=np.uint32, endpoint=True)) & mask
        data[i], data[j] = data[j], data[i]


@njit
def _sample_indices(rng, population, size):  # pragma: no cover - numba
    """``rng.choice(population, size, replace=False)``'s indices and draws, exactly: numpy's tail
    shuffle for large populations, else Floyd's algorithm then a shuffle. int64 [size]."""
    if population > 10000 and size > population // 50:
        idx = np.arange(population)
        _shuffle_from(rng, idx, max(population - size, 1))
        return idx[population - size:].copy()
    idx = np.empty(size, dtype=np.int64)
    taken = np.zeros(population, dtype=np.bool_)
    for j in range(population - size, population):
        val = rng.integers(0, j + 1)  # none for j == 0
        if taken[val]:
            val = j
        taken[val] = True
        idx[j - population + size] = val
    _shuffle_from(rng, idx, 1)
    return idx


@njit
def _fair_into(candidates, count, rng, out):  # pragma: no cover - numba
    """``count`` picks spread evenly over ``candidates`` (each ``count // n`` times, the remainder
    drawn without replacement), in random order, into ``out[:count]``. A remainder of 0 draws
    nothing, and neither does shuffling one pick."""
    n = len(candidates)
    q, r = divmod(count, n)
    for i in range(q * n):
        out[i] = candidates[i % n]
    if r:
        idx = _sample_indices(rng, n, r)
        for i in range(r):
            out[q * n + i] = candidates[idx[i]]
    _shuffle(rng, out, count)


@njit
def _nearest_kernel(p2l, slots_per_gpu, gpus_per_node, num_experts, rng):  # pragma: no cover - numba
    """The ``nearest`` table of ``p2l`` int [L, P] (slot ``p`` on GPU ``p // slots_per_gpu``):
    int64 [L, G, E]. Per layer, a GPU holding the expert uses its lowest slot of it, a single
    replica serves every rank, and the other experts (ascending) are dealt with :func:`_fair_into`,
    node by node (ascending) over the node's replicas, then the GPUs of nodes without one over
    all replicas, drawing from ``rng`` in that order."""
    num_layers, num_slots = p2l.shape
    num_gpus = num_slots // slots_per_gpu
    table = np.full((num_layers, num_gpus, num_experts), -1, dtype=np.int64)
    start = np.zeros(num_experts + 1, dtype=np.int64)
    order = np.empty(num_slots, dtype=np.int64)  # slots grouped by expert, ascending within
    here = np.empty(num_slots, dtype=np.int64)
    need = np.empty(num_gpus, dtype=np.int64)
    rest = np.empty(num_gpus, dtype=np.int64)
    picks = np.empty(num_gpus, dtype=np.int64)
    for layer in range(num_layers):
        row, out = p2l[layer], table[layer]
        start[:] = 0
        for p in range(num_slots):
            start[row[p] + 1] += 1
        for e in range(num_experts):
            start[e + 1] += start[e]
        fill = start[:-1].copy()
        for p in range(num_slots):
            order[fill[row[p]]] = p
            fill[row[p]] += 1
            if out[p // slots_per_gpu, row[p]] < 0:  # same GPU: the lowest local slot
                out[p // slots_per_gpu, row[p]] = p
        for e in range(num_experts):
            lo, hi = start[e], start[e + 1]
            if hi - lo == 1:  # a single replica: every rank uses it
                out[:, e] = order[lo]
                continue
            # GPUs without a copy use a replica on their node, spread evenly over those (node by
            # node, ascending); where their node has none, any
            n_rest = 0
            for node in range(num_gpus // gpus_per_node):
                n_need = 0
                for g in range(node * gpus_per_node, (node + 1) * gpus_per_node):
                    if out[g, e] < 0:
                        need[n_need] = g
                        n_need += 1
                if n_need == 0:
                    continue
                n_here = 0
                for i in range(lo, hi):
                    if order[i] // slots_per_gpu // gpus_per_node == node:
                        here[n_here] = order[i]
                        n_here += 1
                if n_here == 0:
                    rest[n_rest:n_rest + n_need] = need[:n_need]
                    n_rest += n_need
                    continue
                _fair_into(here[:n_here], n_need, rng, picks)
                for i in range(n_need):
                    out[need[i], e] = picks[i]
            if n_rest:
                _fair_into(order[lo:hi], n_rest, rng, picks)
                for i in range(n_rest):
                    out[rest[i], e] = picks[i]
    return table


def _nearest_table(placement: Placement, topology: Topology, seed: int) -> np.ndarray:
    """The ``nearest`` table, int64 [L, G, E], drawing from ``np.random.default_rng(seed)``:
    compiled (:func:`_nearest_kernel`) once numba's cache holds the kernel, else in numpy
    (:func:`_nearest_numpy`), so that a cold cache compiles nothing inside a solve's time limit
    (``python -m placer._warm``, run by ``make install``, compiles it)."""
    rng = np.random.default_rng(seed)
    if not cache_holds(_nearest_kernel):
        return _nearest_numpy(placement, topology, rng)
    return _nearest_kernel(placement.physical_to_logical, placement.slots_per_gpu, topology.gpus_per_node,
                           placement.num_experts, rng)


def _nearest_numpy(placement: Placement, topology: Topology, rng: np.random.Generator) -> np.ndarray:
    """:func:`_nearest_kernel` in numpy (the same table and draws), for a cold numba cache."""
    num_layers, num_gpus, num_experts = placement.num_layers, placement.num_gpus, placement.num_experts
    gpn = topology.gpus_per_node
    gpu_of_slot = placement.gpu_of_slot()
    node_of_gpu = np.arange(num_gpus) // gpn
    node_of_slot = node_of_gpu[gpu_of_slot]
    cnt = placement.logcnt()
    table = np.full((num_layers, num_gpus, num_experts), -1, dtype=np.int64)
    slots = np.arange(placement.num_slots)
    none = placement.num_slots
    for layer in range(num_layers):
        p2l = placement.physical_to_logical[layer]
        # Same GPU: the lowest local slot holding the expert.
        local = np.full((num_gpus, num_experts), none, dtype=np.int64)
        np.minimum.at(local, (gpu_of_slot, p2l), slots)
        table[layer] = np.where(local < none, local, -1)
        # Single-replica experts: every rank uses the one slot.
        single = cnt[layer] == 1
        only_slot = np.full(num_experts, -1, dtype=np.int64)
        only_slot[p2l] = np.arange(placement.num_slots)
        table[layer][:, single] = only_slot[single][None, :]
        # Replicated experts, in expert order: GPUs without a copy use a replica on their node,
        # spread evenly over those (node by node, ascending); where their node has none, any.
        order = np.argsort(p2l, kind="stable")  # slots grouped by expert, ascending within
        starts = np.searchsorted(p2l[order], np.arange(num_experts + 1))
        missing_by_node = _missing_by_node(table[layer] < 0, gpn)
        for expert in np.flatnonzero(~single).tolist():
            column = table[layer, :, expert]
            by_node = missing_by_node(expert)
            if not by_node:
                continue
            candidates = order[starts[expert]:starts[expert + 1]]
            cand_list, cand_nodes = candidates.tolist(), node_of_slot[candidates].tolist()
            rest: list[int] = []
            for node, need in by_node:
                here = [c for c, n in zip(cand_list, cand_nodes, strict=True) if n == node]
                if here:
                    column[need] = _fair(np.asarray(here, dtype=candidates.dtype), len(need), rng)
                else:
                    rest.extend(need)
            if rest:
                column[rest] = _fair(candidates, len(rest), rng)
    return table


def _fair(candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` picks spread evenly over ``candidates`` (each ``count // n`` times, the remainder
    drawn without replacement), in random order. Calls that would draw nothing are skipped: they
    leave the generator's state as it is, so the stream is the same as always calling them."""
    q, r = divmod(count, len(candidates))
    if len(candidates) == 1:  # np.tile's result, without its overhead (this runs per expert and node)
        picks = np.full(q, candidates[0], dtype=candidates.dtype)
    else:
        picks = np.tile(candidates, q) if q else candidates[:0]
    if r:
        picks = np.concatenate([picks, rng.choice(candidates, size=r, replace=False)])
    return rng.permutation(picks) if len(picks) > 1 else picks


def _missing_by_node(missing: np.ndarray, gpn: int):
    """``expert -> [(node, [GPUs of that node without a copy]), ...]`` (ascending), from
    ``missing`` bool [G, E]; one bit per GPU of a node where a node's GPUs fit in an int64."""
    num_gpus, num_experts = missing.shape
    if gpn >= 63:  # nodes of 63+ GPUs (one NVLink domain): numpy per node
        per = missing.T.reshape(num_experts, -1, gpn)
        return lambda e: [(int(n), (n * gpn + np.flatnonzero(per[e, n])).tolist())
                          for n in np.flatnonzero(per[e].any(axis=1))]
    bits = (missing.T.reshape(num_experts, -1, gpn) * np.left_shift(1, np.arange(gpn, dtype=np.int64))).sum(axis=2)
    return lambda e: [(node, [node * gpn + lane for lane in range(gpn) if b >> lane & 1])
                      for node, b in enumerate(bits[e].tolist()) if b]


def _ascend_table(placement: Placement) -> np.ndarray:
    """vllm-ascend: rank ``g`` sends expert ``e`` to its replica ``g % n`` (ascending slots)."""
    log2phy, cnt = placement.log2phy(), placement.logcnt()  # [L, E, X], [L, E]
    ranks = np.arange(placement.num_gpus)[None, :, None]
    pick = ranks % cnt[:, None, :]  # [L, G, E]
    layer = np.arange(placement.num_layers)[:, None, None]
    expert = np.arange(placement.num_experts)[None, None, :]
    return log2phy[layer, expert, pick]


def dispatch_table(placement: Placement, topology: Topology, rule: str = "nearest",
                   seed: int = DEFAULT_DISPATCH_SEED, *, model: ModelSpec | None = None) -> np.ndarray:
    """The replica each rank sends each logical expert to, for the rank-based rules.

    Returns int64 ``[L, G, E]``: ``table[l, g, e]`` is the slot that tokens on GPU ``g`` use for
    logical expert ``e`` at MoE layer ``l``. ``model`` gives ``sglang-static`` the dense layers
    its random stream runs through (without it every layer is taken as a MoE layer). For the
    position-based rules use :func:`select_slots`. Tables are cached (small LRU).
    """
    _check_rule(rule)
    if rule in POSITION_RULES:
        raise InvalidInputError(f"the {rule} rule chooses replicas by token position, not by rank",
                                source="--dispatch")
    if placement.num_gpus != topology.num_gpus:
        raise InvalidInputError(f"placement spans {placement.num_gpus} GPUs, cluster has "
                                f"{topology.num_gpus}", source="placement")
    full, rows = hidden_layer_map(placement, model if rule == "sglang-static" else None)
    key = (rule, seed, topology.num_gpus, topology.gpus_per_node, placement.slots_per_gpu,
           full.shape, full.tobytes(), rows.tobytes())
    with _TABLE_LOCK:  # callers may score placements from several threads
        if key in _TABLE_CACHE:
            _TABLE_CACHE.move_to_end(key)
            return _TABLE_CACHE[key]
    if rule == "sglang-static":
        table = sglang_static_table(full, topology.num_gpus, topology.num_nodes, seed,
                                    placement.num_experts)
        table = np.ascontiguousarray(table[rows])
    elif rule == "vllm-ascend":
        table = _ascend_table(placement)
    else:
        table = _nearest_table(placement, topology, seed)
    table.setflags(write=False)
    with _TABLE_LOCK:
        _TABLE_CACHE[key] = table
        if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    return table


def default_home_ranks(token_index: np.ndarray, num_gpus: int) -> np.ndarray:
    """Round-robin home ranks by token index. Shape: int64 [T]."""
    return np.asarray(token_index, dtype=np.int64) % num_gpus


def sample_home_ranks(stats, num_gpus: int) -> np.ndarray:
    """Home rank of each token of a stats' sample, int64 [S]: the source's, else round-robin by
    its token index (:func:`default_home_ranks`)."""
    raw = np.asarray(stats.sample_home_rank, dtype=np.int64)
    return np.where(raw >= 0, raw, default_home_ranks(stats.sample_token_index, num_gpus))


def select_slots(placement: Placement, topology: Topology, expert_ids: np.ndarray, *,
                 home_rank: np.ndarray | None = None, token_index: np.ndarray | None = None,
                 rule: str = "nearest", seed: int = DEFAULT_DISPATCH_SEED,
                 table: np.ndarray | None = None, model: ModelSpec | None = None) -> np.ndarray:
    """Physical slot of every (token, layer, k) under ``rule``.

    ``expert_ids``: int [T, L, K] logical ids. ``home_rank``: int [T] (default: round-robin by
    ``token_index``, which defaults to ``arange(T)`` and is the row for the position rules).
    Returns int64 [T, L, K].
    """
    _check_rule(rule)
    ids = np.asarray(expert_ids, dtype=np.int64)
    t, num_layers, _ = ids.shape
    if num_layers != placement.num_layers:
        raise InvalidInputError(f"routing has {num_layers} layers, placement {placement.num_layers}",
                                source="placement")
    if token_index is None:
        token_index = np.arange(t)
    layer = np.arange(num_layers)[None, :, None]
    if rule in POSITION_RULES:
        log2phy, cnt = placement.log2phy(), placement.logcnt()
        rep = replica_index(np.asarray(token_index, dtype=np.int64)[:, None, None], cnt[layer, ids], rule)
        return log2phy[layer, ids, rep]
    if home_rank is None:
        home_rank = default_home_ranks(token_index, placement.num_gpus)
    if table is None:
        table = dispatch_table(placement, topology, rule, seed, model=model)
    # table[layer, home, ids] as one flat take (half the time of three broadcast index arrays)
    g, e = table.shape[1], table.shape[2]
    base = (np.arange(num_layers, dtype=np.int64)[None, :] * g
            + np.asarray(home_rank, dtype=np.int64)[:, None]) * e  # [T, L]
    return np.take(np.ascontiguousarray(table).reshape(-1), ids + base[:, :, None])


def slot_load(load: np.ndarray, placement: Placement, topology: Topology, rule: str = "nearest",
              seed: int = DEFAULT_DISPATCH_SEED, table: np.ndarray | None = None,
              model: ModelSpec | None = None) -> np.ndarray:
    """Expected token-slots served by each slot when home ranks (or rows) are uniform.

    ``load``: [L, E] token-slots per logical expert. Returns float64 [L, P]. Exact for a trace
    whose tokens are spread evenly over home ranks independently of their routing; for the
    position rules, the even split over replicas that uniform rows give.
    """
    _check_rule(rule)
    load = np.asarray(load, dtype=np.float64)
    num_layers, num_slots = placement.num_layers, placement.num_slots
    out = np.zeros((num_layers, num_slots), dtype=np.float64)
    if rule in POSITION_RULES:
        cnt = placement.logcnt()
        p2l = placement.physical_to_logical
        rows = np.arange(num_layers)[:, None]
        return load[rows, p2l] / cnt[rows, p2l]
    if table is None:
        table = dispatch_table(placement, topology, rule, seed, model=model)
    num_gpus = placement.num_gpus
    layer = np.repeat(np.arange(num_layers), num_gpus * placement.num_experts)
    share = np.broadcast_to(load[:, None, :] / num_gpus, table.shape).ravel()
    # np.add.at's sum, an order of magnitude faster (bincount adds in index order, as add.at does)
    out += np.bincount(layer * num_slots + table.ravel(), weights=share,
                       minlength=num_layers * num_slots).reshape(num_layers, num_slots)
    return out
