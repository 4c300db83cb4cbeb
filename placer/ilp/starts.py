"""The starting placements of the ``placer`` method: EPLB, contiguous and, under the rules
with fixed dispatch tables (``sglang-static``, ``vllm-ascend``), :func:`coordinated_map`, which
keeps redundant slots on cold experts on distinct GPUs and nodes."""

from __future__ import annotations

import numpy as np

from placer.ilp.base import PlacementProblem
from placer.ilp.clustered import clustered_map
from placer.ilp.distinct import separate_by_load
from placer.ilp.eplb import rebalance_experts, rebalance_experts_hierarchical
from placer.ilp.simple import contiguous_map


def coordinated_map(load: np.ndarray, num_gpus: int, gpus_per_node: int, slots_per_gpu: int) -> np.ndarray:
    """A start whose static-dispatch tables stay balanced under SGLang's uncoordinated spread.

    ``load``: [L, E]. Returns int64 [L, G * slots_per_gpu]. The redundant slots hold extra
    copies of the coldest experts (round robin when there are more slots than experts); every
    copy is an item carrying its expert's load split evenly over its copies. The items are
    packed heaviest first, never onto a GPU that holds the expert already nor onto a node
    holding one of its copies while there are nodes left (so the ranks of each node reach a copy
    on their node and SGLang's table is deterministic there), in four ways, and each layer keeps
    the one with the lighter busiest GPU: each item to the least-loaded GPU with room (good when
    a few experts are hot); in rounds of G items, one per GPU, least-loaded GPU first (good when
    loads are flat: the last light items are not all left to the last GPUs with room); every
    expert's first copy by its whole load before the extra copies; and the first copies by LPT,
    the extra copies then filling the rooms left (:func:`_pack_fill`, which prefers but does not
    force another node).
    When only GPUs breaking the rule have room, an expert of similar load (single-copy ones
    first) that the rule lets into the room moves there, and the copy takes its slot.

    Under ``sglang-static`` the ranks without a local or same-node replica draw from per-rank
    random streams that do not coordinate; with the extra copies on cold experts those draws
    move little load.
    """
    load = np.asarray(load, dtype=np.float64)
    num_layers, num_experts = load.shape
    num_slots = num_gpus * slots_per_gpu
    node = np.arange(num_gpus) // gpus_per_node
    out = np.empty((num_layers, num_slots), dtype=np.int64)
    for layer in range(num_layers):
        row = load[layer]
        copies = np.ones(num_experts, dtype=np.int64)
        cold = np.argsort(row, kind="stable")
        for i in range(num_slots - num_experts):
            copies[cold[i % num_experts]] += 1
        share = row / copies
        items = sorted(((share[e], int(e)) for e in range(num_experts) for _ in range(copies[e])),
                       key=lambda item: (-item[0], item[1]))
        firsts = sorted(((share[e], int(e)) for e in range(num_experts)), key=lambda it: (-row[it[1]], it[1]))
        extras = [(share[e], int(e)) for e in range(num_experts) for _ in range(copies[e] - 1)]
        extras.sort(key=lambda item: (-item[0], item[1]))
        packs = [_pack(items, share, copies, node, slots_per_gpu, False),
                 _pack(items, share, copies, node, slots_per_gpu, True),
                 _pack(firsts + extras, share, copies, node, slots_per_gpu, False),
                 _pack_fill(firsts, extras, share, node, slots_per_gpu)]
        # Two copies on one GPU waste a slot (and vllm-ascend mis-routes them): such a packing is
        # kept only when every packing has one.
        held, _ = min(packs, key=lambda pack: (any(len(set(h)) < len(h) for h in pack[0]), pack[1].max()))
        out[layer] = np.concatenate(held)
    return out


def _pack_fill(firsts: list[tuple[float, int]], extras: list[tuple[float, int]], share: np.ndarray,
               node: np.ndarray, slots_per_gpu: int) -> tuple[list[list[int]], np.ndarray]:
    """The fourth packing of :func:`coordinated_map`: first copies heaviest first onto the
    least-loaded GPU with room, then the extra copies, coldest first, into the rooms left, on
    another node than the expert's first copy where one has room (no moves)."""
    num_gpus = len(node)
    held: list[list[int]] = [[] for _ in range(num_gpus)]
    gpu_load = np.zeros(num_gpus)
    home = {}
    for w, e in firsts:
        g = min((h for h in range(num_gpus) if len(held[h]) < slots_per_gpu), key=lambda h: (gpu_load[h], h))
        held[g].append(e)
        gpu_load[g] += w
        home[e] = g
    for w, e in sorted(extras, key=lambda item: (item[0], item[1])):
        free = [h for h in range(num_gpus) if len(held[h]) < slots_per_gpu and e not in held[h]] or \
            [h for h in range(num_gpus) if len(held[h]) < slots_per_gpu]
        other = [h for h in free if node[h] != node[home[e]]]
        g = min(other or free, key=lambda h: (gpu_load[h], h))
        held[g].append(e)
        gpu_load[g] += w
    return held, gpu_load


def _pack(items: list[tuple[float, int]], share: np.ndarray, copies: np.ndarray, node: np.ndarray,
          slots_per_gpu: int, rounds: bool) -> tuple[list[list[int]], np.ndarray]:
    """One packing of :func:`coordinated_map`: (experts held by each GPU, GPU loads)."""
    num_gpus = len(node)
    num_nodes = int(node[-1]) + 1
    held: list[list[int]] = [[] for _ in range(num_gpus)]
    gpu_load = np.zeros(num_gpus)

    def allowed(g: int, e: int) -> bool:
        if e in held[g]:
            return False
        used = {int(node[h]) for h in range(num_gpus) if e in held[h]}
        return len(used) >= num_nodes or int(node[g]) not in used

    def movable(x: int, src: int, dst: int) -> bool:
        held[src].remove(x)
        ok = allowed(dst, x)
        held[src].append(x)
        return ok

    def free_gpus() -> list[int]:
        return sorted((g for g in range(num_gpus) if len(held[g]) < slots_per_gpu), key=lambda h: (gpu_load[h], h))

    step = num_gpus if rounds else 1
    for start in range(0, len(items), step):
        order = free_gpus()
        for w, e in items[start:start + step]:
            order = [g for g in order if len(held[g]) < slots_per_gpu] or free_gpus()
            ok = [g for g in order if allowed(g, e)]
            if ok:
                g = ok[0]
            else:  # repair: move a similar expert from an allowed GPU into the room
                room = order[0]
                swaps = [(copies[x] > 1, abs(share[x] - w), h, x) for h in range(num_gpus)
                         if h != room and allowed(h, e) for x in held[h] if movable(x, h, room)]
                order.remove(room)
                if not swaps:  # nothing to trade: take the room as it is
                    held[room].append(e)
                    gpu_load[room] += w
                    continue
                _, _, g, x = min(swaps)
                held[g].remove(x)
                gpu_load[g] -= share[x]
                held[room].append(x)
                gpu_load[room] += share[x]
            held[g].append(e)
            gpu_load[g] += w
            if g in order:
                order.remove(g)
    return held, gpu_load


def start_maps(problem: PlacementProblem) -> dict[str, np.ndarray]:
    """The placer method's starting maps, int64 [L, P] by name: ``eplb`` (first), ``contiguous``,
    ``clustered`` (:func:`placer.ilp.clustered.clustered_map`) on several nodes with a token
    sample of top-k > 1, and ``coordinated`` under the fixed-table rules with redundant slots."""
    topo, model = problem.topology, problem.model
    if problem.distinct_per_gpu:
        groups, nodes = (model.num_groups, topo.num_nodes) if model.num_groups % topo.num_nodes == 0 else (1, 1)
        eplb, _, _ = rebalance_experts_hierarchical(np.asarray(problem.stats.load, np.float32), problem.num_slots,
                                                    groups, nodes, topo.num_gpus, distinct=True)
    else:
        eplb, _, _ = rebalance_experts(problem.stats.load, problem.num_slots, model.num_groups,
                                       topo.num_nodes, topo.num_gpus)
    starts = {"eplb": eplb.astype(np.int64),
              "contiguous": contiguous_map(model.num_moe_layers, model.num_experts, problem.num_slots).astype(np.int64)}
    stats = problem.stats
    if topo.num_nodes > 1 and stats.sample_size > 0 and stats.sample_ids is not None and stats.top_k > 1:
        starts["clustered"] = clustered_map(stats.sample_ids, stats.load, topo.num_gpus, topo.gpus_per_node,
                                            problem.slots_per_gpu)
    if problem.dispatch in ("sglang-static", "vllm-ascend") and problem.num_redundant > 0:
        starts["coordinated"] = coordinated_map(problem.stats.load, topo.num_gpus, topo.gpus_per_node,
                                                problem.slots_per_gpu)
    if problem.distinct_per_gpu:  # every start obeys the constraint the search keeps
        for name, start in starts.items():
            starts[name] = separate_by_load(start, problem.slots_per_gpu, problem.stats.load)
    return starts
