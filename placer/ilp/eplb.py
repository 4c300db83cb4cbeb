"""DeepSeek's expert-parallel load balancer (EPLB) in numpy, vectorised across layers.

A re-implementation of ``eplb.py`` from deepseek-ai/EPLB @ d52c72d5 (MIT licence) with the same
semantics and outputs; see docs/reference/placement.md section 3.

- :func:`replicate_experts`: every redundant slot goes to the expert with the largest
  per-replica load ``w / cnt`` (lowest expert id on ties, as ``torch.max`` returns the first max).
- :func:`balanced_packing`: items sorted by weight, descending; each goes to the lightest pack
  that still has room (lowest pack id on ties, as Python's ``min`` returns the first minimum).
- :func:`rebalance_experts`: the hierarchical policy (groups to nodes, replication inside each
  node, replicas to the node's GPUs) when ``num_groups % num_nodes == 0``, otherwise the same
  routine with one group and one node (the "global" policy).

Arithmetic follows the reference: the load is cast to float32; group loads, per-replica loads
``w / cnt`` and the running pack loads are float32, pack loads accumulated in item order.

**Ties.** The reference sorts with ``torch.sort(descending=True)``, which does not promise a
stable order for equal weights (on CPU it is ``std::sort``: stable for at most 16 items, not
beyond). Here equal weights are taken lowest index first (``np.argsort(-w, kind="stable")``),
so the result is deterministic. On inputs without equal weights the two sorts agree. The
replicas of one expert always carry equal weights ``w / cnt``; their order only decides which
replica *rank* lands in which slot, so ``phy2log`` and ``logcnt`` agree with the reference even
then, while the order of an expert's slots in ``log2phy`` may differ.

**Group sums.** Step 1 sums each group's loads in float32 with numpy's pairwise summation;
torch's CPU reduction rounds differently, so the two can differ in the last bit. This can
change the outcome only when two group (or node) loads tie to within a float32 ulp, and never
for integer loads whose group sums stay below 2**24.
"""

from __future__ import annotations

import numpy as np

from placer.errors import InvalidInputError
from placer.ilp.base import PlacementProblem, register
from placer.ilp.distinct import separate_copies
from placer.types import Placement, SolveResult

__all__ = ["balanced_packing", "gpu_load_ratio", "rebalance_experts",
           "rebalance_experts_hierarchical", "replicate_experts", "solve_eplb"]


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of permutations ``perm [X, n]``: ``inv[x, perm[x, j]] = j``."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1], dtype=perm.dtype),
                                                 perm.shape), axis=1)
    return inv


def balanced_packing(weight: np.ndarray, num_packs: int,
                     keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pack the n items of each row into ``num_packs`` packs of exactly n / num_packs items.

    Greedy: items in descending weight order (ties: lowest index first), each into the lightest
    pack with room left (ties: lowest pack index). Runs all rows at once, one step per item.

    Parameters
    ----------
    weight : float [X, n]
    num_packs : int, dividing n
    keys : int [X, n] or None
        Not in the reference. Items with equal keys (copies of one expert) avoid sharing a pack:
        each goes to the lightest pack with room that holds no item of its key, or, when every
        pack with room does, to the lightest with room (:func:`placer.ilp.distinct.separate_copies`
        repairs those afterwards).

    Returns
    -------
    pack_index : int64 [X, n]
        Pack of each item.
    rank_in_pack : int64 [X, n]
        Position of each item inside its pack (order of arrival).
    """
    num_rows, num_items = weight.shape
    if num_packs < 1 or num_items % num_packs:
        raise InvalidInputError(f"{num_items} items do not split evenly into {num_packs} packs",
                                source="eplb")
    per_pack = num_items // num_packs
    if per_pack == 1:
        pack_index = np.broadcast_to(np.arange(num_items, dtype=np.int64), weight.shape).copy()
        return pack_index, np.zeros(weight.shape, dtype=np.int64)

    w = np.asarray(weight, dtype=np.float32)
    order = np.argsort(-w, axis=1, kind="stable")
    sorted_w = np.take_along_axis(w, order, axis=1)
    base = np.arange(num_rows) * num_packs  # flat offset of each row's packs
    pack_load = np.zeros(num_rows * num_packs, dtype=np.float32)
    key = np.zeros((num_rows, num_packs), dtype=np.float32)  # pack_load, +inf once full
    key_flat = key.reshape(-1)
    pack_items = np.zeros(num_rows * num_packs, dtype=np.int64)
    pack_of_sorted = np.empty((num_items, num_rows), dtype=np.int64)
    rank_of_sorted = np.empty((num_items, num_rows), dtype=np.int64)
    sorted_w_t = np.ascontiguousarray(sorted_w.T)
    inf = np.float32(np.inf)
    rows = np.arange(num_rows)
    if keys is not None:
        sorted_k_t = np.ascontiguousarray(np.take_along_axis(np.asarray(keys, dtype=np.int64), order, axis=1).T)
        has = np.zeros((num_rows, num_packs, int(sorted_k_t.max()) + 1), dtype=bool)
    for j in range(num_items):
        if keys is None:
            pack = key.argmin(axis=1)
        else:
            free = np.where(has[rows, :, sorted_k_t[j]], inf, key)
            pack = np.where(np.isinf(free).all(axis=1), key.argmin(axis=1), free.argmin(axis=1))
            has[rows, pack, sorted_k_t[j]] = True
        flat = base + pack
        count = pack_items[flat]
        pack_of_sorted[j] = pack
        rank_of_sorted[j] = count
        load = pack_load[flat] + sorted_w_t[j]
        pack_load[flat] = load
        count += 1
        pack_items[flat] = count
        key_flat[flat] = np.where(count < per_pack, load, inf)
    pack_of_sorted = pack_of_sorted.T
    rank_of_sorted = rank_of_sorted.T
    pack_index = np.empty_like(pack_of_sorted)
    rank_in_pack = np.empty_like(rank_of_sorted)
    np.put_along_axis(pack_index, order, pack_of_sorted, axis=1)
    np.put_along_axis(rank_in_pack, order, rank_of_sorted, axis=1)
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int,
                      max_count: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spread ``num_log`` experts over ``num_phy`` replicas, minimising the max per-replica load.

    Slot i < num_log holds expert i; each later slot goes to ``argmax(w / cnt)`` (ties: lowest
    expert id). All rows at once, one step per redundant slot.

    Parameters
    ----------
    weight : float [X, num_log]
    num_phy : int >= num_log
    max_count : int or None
        Not in the reference: no expert gets more copies (the GPUs they must sit on apart).

    Returns
    -------
    phy2log : int64 [X, num_phy]
    rank : int64 [X, num_phy]
        Replica rank of each slot (0 for the expert's first slot).
    logcnt : int64 [X, num_log]
        Replicas per expert.
    """
    num_rows, num_log = weight.shape
    if num_phy < num_log:
        raise InvalidInputError(f"{num_phy} slots cannot hold {num_log} experts", source="eplb")
    w = np.asarray(weight, dtype=np.float32)
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (num_rows, 1))
    rank = np.zeros((num_rows, num_phy), dtype=np.int64)
    logcnt = np.ones((num_rows, num_log), dtype=np.int64)
    share = w.copy()  # w / logcnt, kept up to date one entry per row and step
    rows = np.arange(num_rows)
    if max_count is not None and num_phy > max_count * num_log:
        raise InvalidInputError(f"{num_phy} slots cannot hold {num_log} experts with at most {max_count} "
                                "copies each", source="eplb")
    for i in range(num_log, num_phy):
        idx = share.argmax(axis=1)
        count = logcnt[rows, idx]
        phy2log[:, i] = idx
        rank[:, i] = count
        logcnt[rows, idx] = count + 1
        share[rows, idx] = w[rows, idx] / (count + 1).astype(np.float32)
        if max_count is not None:
            share[rows, idx] = np.where(count + 1 >= max_count, -np.inf, share[rows, idx])
    return phy2log, rank, logcnt


def rebalance_experts_hierarchical(weight: np.ndarray, num_physical_experts: int, num_groups: int,
                                   num_nodes: int, num_gpus: int,
                                   distinct: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hierarchical EPLB: groups to nodes, replication within nodes, replicas to GPUs.

    ``weight`` float32 [L, E]. Returns phy2log int64 [L, P], phyrank int64 [L, P] and
    logcnt int64 [L, E]; slot p lives on GPU ``p // (P / num_gpus)``.

    ``distinct`` (not in the reference; vllm-ascend's constraint): no GPU holds two copies of
    one expert. An expert gets at most as many copies as its node has GPUs, the packing skips
    GPUs that hold the expert already, and :func:`placer.ilp.distinct.separate_copies` swaps
    away the few duplicates the greedy packing cannot avoid.
    """
    num_layers, num_logical = weight.shape
    _check_sizes(num_logical, num_physical_experts, num_groups, num_nodes, num_gpus)
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_physical_experts // num_gpus
    log_per_node = num_logical // num_nodes

    # Step 1: pack groups onto nodes.
    tokens_per_group = weight.reshape(num_layers, num_groups, group_size).sum(axis=-1,
                                                                             dtype=np.float32)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
                + np.arange(group_size, dtype=np.int64)).reshape(num_layers, num_logical)
    mlog2log = _inverse(log2mlog)

    # Step 2: replicate experts within each node; rows are (layer, node).
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, log_per_node)
    gpus_per_node = num_gpus // num_nodes
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes,
                                                   gpus_per_node if distinct else None)

    # Step 3: pack each node's replicas onto its GPUs by per-replica load.
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt.astype(np.float32), phy2mlog,
                                        axis=1)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, gpus_per_node, phy2mlog if distinct else None)
    pphy2phy = _inverse(pack_index * phy_per_gpu + rank_in_pack)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1)
                 + np.arange(0, num_logical, log_per_node, dtype=np.int64)[None, :, None]
                 ).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=1)
    if distinct:
        share = weight.astype(np.float64) / logcnt
        pphy2log, pphyrank = separate_copies(pphy2log, phy_per_gpu, share, gpus_per_node, pphyrank)
    return pphy2log, pphyrank, logcnt


def _check_sizes(num_logical: int, num_physical: int, num_groups: int, num_nodes: int,
                 num_gpus: int) -> None:
    problems = []
    if min(num_groups, num_nodes, num_gpus) < 1:
        problems.append("num_groups, num_nodes and num_gpus must be positive")
    elif num_logical % num_groups:
        problems.append(f"num_groups={num_groups} must divide {num_logical} experts")
    elif num_groups % num_nodes:
        problems.append(f"num_nodes={num_nodes} must divide num_groups={num_groups}")
    elif num_gpus % num_nodes:
        problems.append(f"num_nodes={num_nodes} must divide num_gpus={num_gpus}")
    elif num_physical % num_gpus:
        problems.append(f"num_replicas={num_physical} must be a multiple of num_gpus={num_gpus}")
    elif num_physical < num_logical:
        problems.append(f"num_replicas={num_physical} is below the {num_logical} experts")
    if problems:
        raise InvalidInputError(problems[0], source="eplb")


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek EPLB: replicate and place experts to balance the per-GPU load of every layer.

    Parameters
    ----------
    weight : float or int [L, E]
        Load per logical expert (e.g. token counts); cast to float32 as in the reference.
    num_replicas : int
        P, physical experts (slots) per layer; a multiple of ``num_gpus`` and >= E.
    num_groups : int
        Expert groups (group-limited routing); divides E.
    num_nodes, num_gpus : int
        Cluster shape; ``num_nodes`` divides ``num_gpus``. The hierarchical policy applies when
        ``num_groups % num_nodes == 0``, otherwise the global one (one group, one node).

    Returns
    -------
    phy2log : int64 [L, P]
        Logical expert of each slot; slot p lives on GPU ``p // (P / num_gpus)`` (the
        :class:`placer.types.Placement` convention).
    log2phy : int64 [L, E, P - E + 1]
        Slots of each logical expert indexed by replica rank, padded with -1.
    logcnt : int64 [L, E]
        Replicas per logical expert (>= 1, sums to P).
    """
    w = np.asarray(weight)
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise InvalidInputError(f"weight must be [layers, experts], got shape {w.shape}",
                                source="eplb")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.all(np.isfinite(w)):
        raise InvalidInputError("weight contains NaN or infinite values (after the float32 cast)",
                                source="eplb")
    if min(num_groups, num_nodes, num_gpus) < 1:
        raise InvalidInputError("num_groups, num_nodes and num_gpus must be positive, got "
                                f"{num_groups}, {num_nodes}, {num_gpus}", source="eplb")
    num_layers, num_logical = w.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(w, num_replicas, num_groups,
                                                                  num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(w, num_replicas, 1, 1, num_gpus)
    max_cnt = num_replicas - num_logical + 1
    log2phy = np.full((num_layers, num_logical * max_cnt), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * max_cnt + phyrank,
                      np.broadcast_to(np.arange(num_replicas, dtype=np.int64),
                                      (num_layers, num_replicas)), axis=1)
    return phy2log, log2phy.reshape(num_layers, num_logical, max_cnt), logcnt


def gpu_load_ratio(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """Per-layer max/mean GPU load when each expert's load is split evenly over its replicas.

    ``weight`` [L, E], ``phy2log`` [L, P]. Returns float64 [L] (1.0 for an all-zero layer).
    """
    w = np.asarray(weight, dtype=np.float64)
    num_layers, num_logical = w.shape
    cnt = np.zeros((num_layers, num_logical), dtype=np.int64)
    np.add.at(cnt, (np.repeat(np.arange(num_layers), phy2log.shape[1]), phy2log.ravel()), 1)
    share = np.take_along_axis(w / np.maximum(cnt, 1), phy2log, axis=1)
    gpu = share.reshape(num_layers, num_gpus, -1).sum(axis=2)
    mean = gpu.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, gpu.max(axis=1) / mean, 1.0)


@register("eplb")
def solve_eplb(problem: PlacementProblem, *, time_limit_s: float | None = None, seed: int = 0) -> SolveResult:
    """DeepSeek EPLB on the problem's expert loads (deterministic; time limit and seed unused).

    With ``problem.distinct_per_gpu`` (vllm-ascend) copies of one expert land on distinct GPUs
    (see :func:`rebalance_experts_hierarchical`); the placement then differs from the reference's.

    Hierarchical policy when the model's ``num_groups`` is a multiple of the node count,
    global otherwise. The objective is the median over layers of the max/mean GPU load with
    each expert's load split evenly over its replicas.
    """
    topo = problem.topology
    load = problem.stats.load
    num_groups, num_nodes = problem.model.num_groups, topo.num_nodes
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1  # the global policy, as rebalance_experts falls back to
    phy2log, phyrank, _ = rebalance_experts_hierarchical(
        np.ascontiguousarray(load, dtype=np.float32), problem.num_slots, num_groups, num_nodes, topo.num_gpus,
        distinct=bool(problem.distinct_per_gpu))
    placement = Placement(phy2log, problem.slots_per_gpu, problem.model.num_experts, phyrank)
    ratio = gpu_load_ratio(load, phy2log, topo.num_gpus)
    hierarchical = problem.model.num_groups % topo.num_nodes == 0
    return SolveResult(placement=placement, status="feasible", objective=float(np.median(ratio)),
                       terms={"max_over_mean_median": float(np.median(ratio)),
                              "max_over_mean_max": float(ratio.max()),
                              "max_over_mean_mean": float(ratio.mean()),
                              "hierarchical": float(hierarchical)},
                       method="eplb", backend="numpy")
