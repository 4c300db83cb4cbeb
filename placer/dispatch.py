"""Replica dispatch: which physical slot serves a token's logical expert.

One rule is used by metrics, solvers, simulator and runtime alike, so load and traffic are
always computed under the same choice of replica.

- ``nearest`` (default; SGLang's static dispatch in current versions): a replica on the
  token's own GPU, else one on the same node, else a seeded fair spread over all replicas.
  Each (rank, logical expert) pair has one fixed replica.
- ``sglang-legacy``: a replica on the same GPU, else a fair spread over all replicas.
- ``vllm``: replica chosen by token position modulo replica count.

"Fair spread" follows SGLang's ``_fair_choices``: the ranks that need a remote replica are
dealt to the candidates in equal numbers (the remainder to a seeded random subset), then
shuffled. It reproduces SGLang's balanced counts, not its exact random stream.
"""

from __future__ import annotations

import numpy as np

from placer.errors import InvalidInputError
from placer.types import DISPATCH_RULES, Placement, Topology

DEFAULT_DISPATCH_SEED = 42


def _check_rule(rule: str) -> None:
    if rule not in DISPATCH_RULES:
        raise InvalidInputError(f"unknown dispatch rule {rule!r}; known: {', '.join(DISPATCH_RULES)}",
                                source="--dispatch")


def _fair(candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    q, r = divmod(count, len(candidates))
    picks = np.concatenate([np.tile(candidates, q), rng.choice(candidates, size=r, replace=False)])
    return rng.permutation(picks)


def dispatch_table(placement: Placement, topology: Topology, rule: str = "nearest",
                   seed: int = DEFAULT_DISPATCH_SEED) -> np.ndarray:
    """The replica each rank sends each logical expert to, for the rank-based rules.

    Returns int64 ``[L, G, E]``: ``table[l, g, e]`` is the slot that tokens on GPU ``g`` use for
    logical expert ``e`` at layer ``l``. For ``vllm`` (position-based) use :func:`select_slots`.
    """
    _check_rule(rule)
    if rule == "vllm":
        raise InvalidInputError("the vllm rule chooses replicas by token position, not by rank",
                                source="--dispatch")
    if placement.num_gpus != topology.num_gpus:
        raise InvalidInputError(f"placement spans {placement.num_gpus} GPUs, cluster has "
                                f"{topology.num_gpus}", source="placement")
    num_layers, num_gpus, num_experts = placement.num_layers, placement.num_gpus, placement.num_experts
    gpu_of_slot = placement.gpu_of_slot()
    node_of_gpu = np.arange(num_gpus) // topology.gpus_per_node
    node_of_slot = node_of_gpu[gpu_of_slot]
    cnt = placement.logcnt()
    rng = np.random.default_rng(seed)
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
        for expert in np.flatnonzero(~single):
            column = table[layer, :, expert]
            candidates = np.flatnonzero(p2l == expert)
            if rule == "nearest":
                for node in np.unique(node_of_gpu[column < 0]):
                    local = candidates[node_of_slot[candidates] == node]
                    need = np.flatnonzero((column < 0) & (node_of_gpu == node))
                    if len(local) and len(need):
                        column[need] = _fair(local, len(need), rng)
            need = np.flatnonzero(column < 0)
            if len(need):
                column[need] = _fair(candidates, len(need), rng)
    return table


def default_home_ranks(token_index: np.ndarray, num_gpus: int) -> np.ndarray:
    """Round-robin home ranks by token index. Shape: int64 [T]."""
    return np.asarray(token_index, dtype=np.int64) % num_gpus


def select_slots(placement: Placement, topology: Topology, expert_ids: np.ndarray, *,
                 home_rank: np.ndarray | None = None, token_index: np.ndarray | None = None,
                 rule: str = "nearest", seed: int = DEFAULT_DISPATCH_SEED,
                 table: np.ndarray | None = None) -> np.ndarray:
    """Physical slot of every (token, layer, k) under ``rule``.

    ``expert_ids``: int [T, L, K] logical ids. ``home_rank``: int [T] (default: round-robin by
    ``token_index``, which defaults to ``arange(T)``). Returns int64 [T, L, K].
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
    if rule == "vllm":
        log2phy, cnt = placement.log2phy(), placement.logcnt()
        rep = np.asarray(token_index, dtype=np.int64)[:, None, None] % cnt[layer, ids]
        return log2phy[layer, ids, rep]
    if home_rank is None:
        home_rank = default_home_ranks(token_index, placement.num_gpus)
    if table is None:
        table = dispatch_table(placement, topology, rule, seed)
    return table[layer, np.asarray(home_rank, dtype=np.int64)[:, None, None], ids]


def slot_load(load: np.ndarray, placement: Placement, topology: Topology, rule: str = "nearest",
              seed: int = DEFAULT_DISPATCH_SEED, table: np.ndarray | None = None) -> np.ndarray:
    """Expected token-slots served by each slot when home ranks (or positions) are uniform.

    ``load``: [L, E] token-slots per logical expert. Returns float64 [L, P]. Exact for a trace
    whose tokens are spread evenly over home ranks independently of their routing.
    """
    _check_rule(rule)
    load = np.asarray(load, dtype=np.float64)
    num_layers, num_slots = placement.num_layers, placement.num_slots
    out = np.zeros((num_layers, num_slots), dtype=np.float64)
    if rule == "vllm":
        cnt = placement.logcnt()
        p2l = placement.physical_to_logical
        rows = np.arange(num_layers)[:, None]
        return load[rows, p2l] / cnt[rows, p2l]
    if table is None:
        table = dispatch_table(placement, topology, rule, seed)
    num_gpus = placement.num_gpus
    layer = np.repeat(np.arange(num_layers), num_gpus * placement.num_experts)
    share = np.broadcast_to(load[:, None, :] / num_gpus, table.shape).ravel()
    np.add.at(out, (layer, table.ravel()), share)
    return out
