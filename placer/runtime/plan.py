"""The live re-placement planner: which expert weights move where, and when, for one change of placement.

Pure numpy (plus the relabel of :mod:`placer.ilp.movement`, on OR-tools' linear sum
assignment; the plan's records are in :mod:`placer.runtime.migration`). Given the placement that runs now (``old``)
and the one a solver asked for (``new``), :func:`plan_migration`:

1. **Relabels** ``new`` without changing what it means: one permutation of nodes, then of GPUs
   inside each node, the same for every layer (a GPU's identity cannot differ per layer), chosen
   to keep the most expert weights in place: an assignment of nodes whose weights are optimal
   assignments of GPUs inside each node pair, hence optimal among node-structure-preserving
   relabels (suggested in deepseek-ai/EPLB#25; vLLM and SGLang do not do it).
2. **Keeps slots within a rank**: an expert a GPU holds before and after stays in its slot
   (vLLM's ``preserve_intragpu_slots``).
3. **Chooses sources**: an expert already on the GPU is a local copy (no network); otherwise one
   transfer per (layer, GPU, expert) from a same-node holder if any, preferring a peer the GPU
   already exchanges with in that layer, then the least-busy sender; further slots of that
   expert on the GPU are local copies of the received one.
4. **Schedules rounds** in which every rank exchanges with at most one peer (greedy edge
   colouring, largest exchanges first), optionally ``max_experts_per_round`` per pair.
5. **Bounds staging, commits per layer**: a received expert waits in staging until its layer
   commits (the map switch all ranks make at one step boundary; then staged experts and local
   copies are written into the slots). Consecutive layers share rounds while every rank's staged
   bytes fit ``staging_bytes``; each layer commits after its last transfer's round. So staged
   bytes, and a fortiori bytes in flight per round, stay within the headroom.

Every transfer reads the old content of its layer, which is untouched until that layer commits.
:func:`apply_plan` replays a plan against ``old`` and checks all of this; :func:`plan_files`
writes the relabelled placement back, so what runs is what the file says.

Shapes: ``physical_to_logical: [L, P]``, ``P = G * S`` slots, slot ``p`` on GPU ``p // S``,
GPU ``g`` on node ``g // gpus_per_node``; transfers ``[X]``, local copies ``[Y]``.
"""

from __future__ import annotations

import os

import numpy as np

from placer.errors import InvalidInputError
from placer.runtime.migration import LocalCopies, MigrationPlan, Transfers, frozen_array
from placer.types import Placement, Topology
from placer.validate import check_placement

__all__ = ["LocalCopies", "MigrationPlan", "Transfers", "apply_plan", "naive_bytes", "plan_files",
           "plan_migration"]


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def naive_bytes(old: Placement, new: Placement, expert_bytes: float) -> float:
    """Bytes of the naive plan: every slot whose content changes is transferred, no relabel."""
    return float(np.count_nonzero(old.physical_to_logical != new.physical_to_logical) * expert_bytes)


def _check_inputs(old: Placement, new: Placement, topology: Topology, expert_bytes: float,
                  staging_bytes: float, max_experts_per_round: int | None) -> None:
    def bad(message: str) -> InvalidInputError:
        return InvalidInputError(message, source="migration")
    if old.physical_to_logical.shape != new.physical_to_logical.shape:
        raise bad(f"old placement has shape {old.physical_to_logical.shape} (layers, slots), new has "
                  f"{new.physical_to_logical.shape}")
    if old.slots_per_gpu != new.slots_per_gpu or old.num_experts != new.num_experts:
        raise bad(f"old placement has {old.slots_per_gpu} slots per GPU and {old.num_experts} experts, "
                  f"new has {new.slots_per_gpu} and {new.num_experts}")
    if old.num_gpus != topology.num_gpus:
        raise bad(f"placements span {old.num_gpus} GPUs, cluster has {topology.num_gpus}")
    if not np.isfinite(expert_bytes) or expert_bytes <= 0:
        raise bad(f"expert_bytes must be positive, got {expert_bytes}")
    if not np.isfinite(staging_bytes) or staging_bytes < 0:
        raise bad(f"staging_bytes must be non-negative, got {staging_bytes}")
    if max_experts_per_round is not None and max_experts_per_round < 1:
        raise bad(f"max_experts_per_round must be at least 1, got {max_experts_per_round}")


def _arrange(old_row: list[int], want: list[int]) -> tuple[list[int], list[int]]:
    """Lay the experts ``want`` (requested slot order) into a GPU's slots ``old_row``.

    An expert already in a slot stays there; the rest fill the freed slots in requested order.
    Returns (new content per local slot, local slot of each requested slot).
    """
    pending: dict[int, list[int]] = {}
    for i, e in enumerate(want):
        pending.setdefault(e, []).append(i)
    row = [-1] * len(old_row)
    local = [-1] * len(want)
    for s, e in enumerate(old_row):
        if pending.get(e):
            i = pending[e].pop(0)
            row[s], local[i] = e, s
    free = iter(s for s in range(len(old_row)) if row[s] < 0)
    for i in sorted(i for rest in pending.values() for i in rest):
        s = next(free)
        row[s], local[i] = want[i], s
    return row, local


def plan_migration(old: Placement, new: Placement, topology: Topology, *, expert_bytes: float,
                   staging_bytes: float | None = None,
                   max_experts_per_round: int | None = None) -> MigrationPlan:
    """Plan the live move from ``old`` to ``new`` with the fewest transferred expert weights.

    Parameters
    ----------
    old, new : Placement
        ``physical_to_logical: [L, P]`` each, same shape, slots per GPU and experts.
    topology : Topology
        Gives nodes and GPUs per node; its GPU count must match the placements'.
    expert_bytes : float
        Bytes of one expert's weights (``ModelSpec.expert_weight_bytes``).
    staging_bytes : float, optional
        Staging headroom per rank: bytes received and not yet committed. Default: one layer of
        the rank's slots, ``slots_per_gpu * expert_bytes`` (vLLM's buffer).
    max_experts_per_round : int, optional
        Cap on the experts one pair of ranks exchanges in one round (chunked P2P).

    Returns
    -------
    MigrationPlan
        With ``plan.new`` the relabelled target (validated by ``check_placement``).

    Raises
    ------
    InvalidInputError
        Placements of different shapes, a cluster of another size, non-positive sizes, or a
        layer whose transfers into one rank exceed the staging headroom (named by layer, rank
        and experts).

    Notes
    -----
    Relabel: ``N**2`` assignments of ``gpus_per_node`` GPUs plus one of ``N`` nodes, over
    ``[G, G]`` overlap counts from ``[L, G, E]`` copy counts. The rest is one pass over the
    ``L * G`` (layer, GPU) pairs. The round count is at most twice the peer degree minus one
    per layer group (greedy colouring).

    Examples
    --------
    >>> from placer.types import Placement, Topology
    >>> old = Placement([[0, 1, 2, 3]], slots_per_gpu=2, num_experts=4)
    >>> new = Placement([[2, 3, 0, 1]], slots_per_gpu=2, num_experts=4)
    >>> plan = plan_migration(old, new, Topology("t", 1, 2), expert_bytes=1.0)
    >>> plan.new.physical_to_logical.tolist(), plan.bytes_moved, plan.naive_bytes
    ([[0, 1, 2, 3]], 0.0, 4.0)
    """
    if staging_bytes is None:
        staging_bytes = old.slots_per_gpu * float(expert_bytes)
    _check_inputs(old, new, topology, expert_bytes, staging_bytes, max_experts_per_round)
    num_layers, num_slots = old.physical_to_logical.shape
    spg, gpn, num_gpus = old.slots_per_gpu, topology.gpus_per_node, old.num_gpus
    old_p2l = old.physical_to_logical
    from placer.ilp.movement import copies_per_gpu, relabel_gpus  # deferred: placer.ilp init, 0.5 s

    c_old = copies_per_gpu(old_p2l, num_gpus, old.num_experts)
    c_new = copies_per_gpu(new.physical_to_logical, num_gpus, new.num_experts)
    gpu_relabel, node_relabel = relabel_gpus(c_old, c_new, topology.num_nodes, gpn)

    p2l = np.empty_like(old_p2l)
    slot_map = np.empty((num_layers, num_slots), np.int64)
    req = new.physical_to_logical.tolist()
    olds = old_p2l.tolist()
    for layer in range(num_layers):
        for j in range(num_gpus):
            g = int(gpu_relabel[j])
            row, local = _arrange(olds[layer][g * spg:(g + 1) * spg], req[layer][j * spg:(j + 1) * spg])
            p2l[layer, g * spg:(g + 1) * spg] = row
            slot_map[layer, j * spg:(j + 1) * spg] = np.asarray(local) + g * spg
    relabelled = check_placement(Placement(p2l, spg, old.num_experts), topology=topology)

    rows, copies = _sources(old_p2l, p2l, c_old, spg, gpn)
    rounds, commit = _schedule(rows, num_layers, num_gpus, expert_bytes, staging_bytes,
                               max_experts_per_round)
    t = np.asarray(rows, np.int64).reshape(-1, 6)
    transfers = Transfers(t[:, 0], t[:, 1], t[:, 2], t[:, 3], t[:, 4], t[:, 5],
                          np.full(len(t), float(expert_bytes)), rounds)
    c = np.asarray(copies, np.int64).reshape(-1, 5)
    return MigrationPlan(
        new=relabelled, gpu_relabel=frozen_array(gpu_relabel, np.int64),
        node_relabel=frozen_array(node_relabel, np.int64), slot_map=frozen_array(slot_map, np.int64),
        kept=frozen_array(p2l == old_p2l, bool), transfers=transfers,
        local_copies=LocalCopies(c[:, 0], c[:, 1], c[:, 2], c[:, 3], c[:, 4]),
        commit_round=frozen_array(commit, np.int64), expert_bytes=float(expert_bytes),
        staging_bytes=float(staging_bytes), naive_bytes=naive_bytes(old, new, expert_bytes),
        gpus_per_node=gpn)


def _sources(old_p2l: np.ndarray, p2l: np.ndarray, c_old: np.ndarray, spg: int,
             gpn: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Transfers (layer, slot, dst, src, src_slot, expert) and local copies (layer, slot, gpu,
    src_slot, expert) that turn ``old_p2l`` into ``p2l`` (both [L, P])."""
    transfers: list[tuple[int, ...]] = []
    copies: list[tuple[int, ...]] = []
    num_layers, num_slots = p2l.shape
    num_gpus = num_slots // spg
    for layer in range(num_layers):
        olds, news = old_p2l[layer].tolist(), p2l[layer].tolist()
        first_slot: dict[tuple[int, int], int] = {}
        for p in range(num_slots - 1, -1, -1):
            first_slot[(p // spg, olds[p])] = p
        sends = [0] * num_gpus
        peers: set[tuple[int, int]] = set()
        for g in range(num_gpus):
            holder: dict[int, int] = {}  # expert -> slot of g holding it after the commit
            for s in range(g * spg, (g + 1) * spg):
                if olds[s] == news[s]:
                    holder.setdefault(news[s], s)
            for s in range(g * spg, (g + 1) * spg):
                e = news[s]
                if olds[s] == e:
                    continue
                if e in holder:
                    copies.append((layer, s, g, holder[e], e))
                    continue
                src = _pick_source(np.flatnonzero(c_old[layer, :, e]), g, gpn, sends, peers)
                sends[src] += 1
                peers.add((min(g, src), max(g, src)))
                transfers.append((layer, s, g, src, first_slot[(src, e)], e))
                holder[e] = s
    return transfers, copies


def _pick_source(holders: np.ndarray, dst: int, gpn: int, sends: list[int],
                 peers: set[tuple[int, int]]) -> int:
    """Same node first; then a peer ``dst`` already exchanges with; then the least-busy sender."""
    near = holders[holders // gpn == dst // gpn]
    pool = (near if len(near) else holders).tolist()
    return min(pool, key=lambda h: ((min(h, dst), max(h, dst)) not in peers, sends[h], h))


def _schedule(rows: list[tuple[int, ...]], num_layers: int, num_gpus: int, expert_bytes: float,
              staging_bytes: float, max_per_round: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Round of every transfer [X] and commit round of every layer [L]."""
    t = np.asarray(rows, np.int64).reshape(-1, 6)
    layer, slot, dst, src, expert = t[:, 0], t[:, 1], t[:, 2], t[:, 3], t[:, 5]
    cap = int(np.floor(staging_bytes / expert_bytes + 1e-9))
    need = np.zeros((num_layers, num_gpus), np.int64)
    np.add.at(need, (layer, dst), 1)
    if need.size and need.max() > cap:
        bad_l, bad_g = (int(x) for x in np.argwhere(need > cap)[0])
        sel = (layer == bad_l) & (dst == bad_g)
        raise InvalidInputError(
            f"layer {bad_l}: rank {bad_g} must receive {int(need[bad_l, bad_g])} experts "
            f"({', '.join(map(str, expert[sel].tolist()))} from ranks "
            f"{', '.join(map(str, src[sel].tolist()))}) before the layer commits, but the staging "
            f"headroom holds {cap} ({staging_bytes / 1e6:.1f} MB at {expert_bytes / 1e6:.1f} MB "
            "each)", source="staging_bytes")
    rounds = np.full(len(t), -1, np.int64)
    commit = np.full(num_layers, -1, np.int64)
    offset, start = 0, 0
    while start < num_layers:
        stop, staged = start, np.zeros(num_gpus, np.int64)
        while stop < num_layers and np.all(staged + need[stop] <= cap):
            staged += need[stop]
            stop += 1
        members = np.flatnonzero((layer >= start) & (layer < stop))
        offset += _colour(members, src, dst, slot, rounds, offset, max_per_round)
        for lay in range(start, stop):
            mine = rounds[layer == lay]
            commit[lay] = mine.max() if len(mine) else -1
        start = stop
    return rounds, commit


def _colour(members: np.ndarray, src: np.ndarray, dst: np.ndarray, slot: np.ndarray,
            rounds: np.ndarray, offset: int, max_per_round: int | None) -> int:
    """Greedy edge colouring: each rank exchanges with one peer per round. Returns rounds used."""
    pairs: dict[tuple[int, int], list[int]] = {}
    for i in members.tolist():
        pairs.setdefault((min(src[i], dst[i]), max(src[i], dst[i])), []).append(i)
    chunk = max_per_round or max((len(v) for v in pairs.values()), default=1)
    edges = [(pair, items[k:k + chunk]) for pair, items in pairs.items()
             for k in range(0, len(items), chunk)]
    edges.sort(key=lambda e: (-len(e[1]), e[0], slot[e[1][0]]))
    busy: dict[int, set[int]] = {}
    used = 0
    for (a, b), items in edges:
        taken = busy.setdefault(a, set()) | busy.setdefault(b, set())
        r = next(r for r in range(len(taken) + 1) if r not in taken)
        busy[a].add(r)
        busy[b].add(r)
        rounds[items] = offset + r
        used = max(used, r + 1)
    return used


# --------------------------------------------------------------------------------------------
# Replay and files
# --------------------------------------------------------------------------------------------


def apply_plan(old: Placement, plan: MigrationPlan) -> Placement:
    """Replay ``plan`` on ``old`` round by round, checking it, and return what ends up running.

    Checks, naming the layer, expert and ranks on failure: every transfer's source slot holds
    the expert when it is read (its layer has not committed yet), every rank exchanges with at
    most one peer per round, the bytes staged on a rank never exceed ``plan.staging_bytes``, and
    every local copy reads a slot that holds the expert after its layer's transfers landed.
    The result equals ``plan.new`` for a plan made from ``old``. Raises InvalidInputError.
    """
    def bad(message: str) -> InvalidInputError:
        return InvalidInputError(message, source="plan")
    t, c, spg = plan.transfers, plan.local_copies, old.slots_per_gpu
    if old.physical_to_logical.shape != plan.new.physical_to_logical.shape:
        raise bad(f"plan is for shape {plan.new.physical_to_logical.shape}, placement has "
                  f"{old.physical_to_logical.shape}")
    state = old.physical_to_logical.copy()
    staged = np.zeros(old.num_gpus)
    pending: dict[int, list[int]] = {}  # layer -> transfers received, not committed
    committed = np.zeros(old.num_layers, bool)

    def commit(layer: int) -> None:
        for i in pending.pop(layer, []):
            state[layer, t.slot[i]] = t.expert[i]
            staged[t.dst_gpu[i]] -= t.bytes[i]
        for k in np.flatnonzero(c.layer == layer).tolist():
            s, src, e = int(c.slot[k]), int(c.src_slot[k]), int(c.expert[k])
            if src // spg != c.gpu[k] or s // spg != c.gpu[k] or state[layer, src] != e:
                raise bad(f"layer {layer}: local copy of expert {e} on rank {int(c.gpu[k])} reads slot "
                          f"{src}, which holds expert {int(state[layer, src])}")
            state[layer, s] = e
        committed[layer] = True

    for layer in np.flatnonzero(plan.commit_round < 0).tolist():
        commit(layer)
    for r in range(plan.num_rounds):
        peer: dict[int, int] = {}
        for i in np.flatnonzero(t.round == r).tolist():
            layer, e, a, b = int(t.layer[i]), int(t.expert[i]), int(t.src_gpu[i]), int(t.dst_gpu[i])
            where = f"layer {layer}: round {r}: expert {e} from rank {a} to rank {b}"
            if committed[layer]:
                raise bad(f"{where}: the layer has already committed")
            if t.src_slot[i] // spg != a or t.slot[i] // spg != b or a == b:
                raise bad(f"{where}: slots {int(t.src_slot[i])} -> {int(t.slot[i])} are not on those ranks")
            if state[layer, t.src_slot[i]] != e:
                raise bad(f"{where}: the source slot holds expert {int(state[layer, t.src_slot[i]])}")
            for x, y in ((a, b), (b, a)):
                if peer.setdefault(x, y) != y:
                    raise bad(f"{where}: rank {x} already exchanges with rank {peer[x]} in this round")
            staged[b] += t.bytes[i]
            if staged[b] > plan.staging_bytes * (1 + 1e-9):
                raise bad(f"{where}: rank {b} stages {staged[b] / 1e6:.1f} MB, over the "
                          f"{plan.staging_bytes / 1e6:.1f} MB headroom")
            pending.setdefault(layer, []).append(i)
        for layer in np.flatnonzero(plan.commit_round == r).tolist():
            commit(layer)
    if not committed.all():
        raise bad(f"layer {int(np.argmin(committed))} never commits")
    return Placement(state, old.slots_per_gpu, old.num_experts)


def plan_files(old_path: str | os.PathLike[str], new_path: str | os.PathLike[str],
               out_path: str | os.PathLike[str] | None = None, *, expert_bytes: float | None = None,
               staging_bytes: float | None = None,
               max_experts_per_round: int | None = None) -> MigrationPlan:
    """Plan the move between two native placement files and write the relabelled target.

    The relabelled placement goes to ``out_path`` (default: back to ``new_path``) with the new
    file's metadata and is read back and compared: what runs is what the file says.
    ``expert_bytes`` defaults to the model's. Raises InvalidInputError when the files are for
    different models or clusters.
    """
    from placer.io.placements import (  # deferred: the file readers (0.2 s), only for plan_files
        read_placement_json,
        write_placement_json,
    )

    old_f, new_f = read_placement_json(old_path), read_placement_json(new_path)
    for what in ("model", "topology"):
        if getattr(old_f, what) != getattr(new_f, what):
            raise InvalidInputError(f"the placements are for different {what}s", source=str(new_path))
    if expert_bytes is None and not old_f.model.sizes_known:
        raise InvalidInputError(f"model {old_f.model.name} has unknown sizes; give expert_bytes",
                                source="expert_bytes")
    expert_bytes = old_f.model.expert_weight_bytes if expert_bytes is None else expert_bytes
    plan = plan_migration(old_f.placement, new_f.placement, old_f.topology, expert_bytes=expert_bytes,
                          staging_bytes=staging_bytes, max_experts_per_round=max_experts_per_round)
    out = new_path if out_path is None else out_path
    write_placement_json(out, plan.new, model=new_f.model, topology=new_f.topology,
                         dispatch=new_f.dispatch, method=new_f.method, status=new_f.status,
                         solve_seconds=new_f.solve_seconds, metrics=new_f.metrics)
    back = read_placement_json(out).placement
    if not np.array_equal(back.physical_to_logical, plan.new.physical_to_logical):
        raise RuntimeError(f"{out}: the placement read back differs from the one written")
    return plan
