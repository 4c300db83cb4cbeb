"""The ``clustered`` start of the ``placer`` method: experts routed together share a node, and
the hottest experts sit on every node.

Under the ``nearest`` rules a token's dispatch crosses to every node holding one of its experts
but not its own, and an expert with a copy on every node never crosses. Routers co-activate
experts in clusters (a token's experts mostly come from one set of a few experts, layer after
layer; ExFlow and MoETuner exploit the same), so a node that holds whole clusters serves
most of a token's experts from one place, and copies of the hottest experts on every node take
them off the network and split their load evenly. EPLB's packing sees only the loads.
"""

from __future__ import annotations

import numpy as np

CLUSTER_LIFT = 2.0
"""Two experts join one cluster only where the sample routes them together at least this many
times as often as independent routing would (``C[a, b] * S / (n_a * n_b)``)."""


CLUSTER_LOAD_SHARE = 0.5
"""A cluster carries at most this share of a node's part of the load the hot experts leave
(heavier clusters stay split: the nodes could not be balanced around them)."""


def clustered_map(sample_ids: np.ndarray, load: np.ndarray, num_gpus: int, gpus_per_node: int,
                  slots_per_gpu: int, lift: float = CLUSTER_LIFT) -> np.ndarray:
    """Slot map int64 [L, G * slots_per_gpu] (slot p on GPU p // slots_per_gpu).

    ``sample_ids`` int [S, L, K]: a token sample's experts per layer; ``load`` [L, E]: each
    expert's load. Per layer, with ``N`` nodes and ``R`` redundant slots:

    1. the ``R // (N - 1)`` hottest experts get a copy on every node;
    2. clusters of the others: expert pairs in descending order of co-activation (tokens routed
       to both) join, union-find, where their lift is at least ``lift``, the merged cluster has
       at most ``E // N`` experts and :data:`CLUSTER_LOAD_SHARE` of a node's part of the load;
    3. clusters, heaviest first, onto the least-loaded node with room for the whole cluster
       (a node holds ``ceil(E' / N)`` of the ``E'`` other experts), else expert by expert; then
       whole clusters swap between the heaviest node and another while that lowers the heavier;
    4. the slots left: the experts of highest load per copy, each onto the lightest node with
       room that lacks it;
    5. on each node, its copies (each ``load / copies``) heaviest first onto its least-loaded
       GPU with room that does not hold the expert yet (any GPU with room when none).
    """
    sample_ids = np.asarray(sample_ids)
    load = np.asarray(load, dtype=np.float64)
    num_layers, num_experts = load.shape
    if sample_ids.ndim != 3 or sample_ids.shape[1] != num_layers:
        raise ValueError(f"sample_ids must be [S, {num_layers}, K], got {list(sample_ids.shape)}")
    if num_gpus % gpus_per_node or num_gpus * slots_per_gpu < num_experts:
        raise ValueError(f"{num_gpus} GPUs in nodes of {gpus_per_node} with {slots_per_gpu} slots "
                         f"each cannot hold {num_experts} experts")
    return np.stack([_layer(sample_ids[:, layer].astype(np.int64), load[layer], num_gpus, gpus_per_node,
                            slots_per_gpu, lift) for layer in range(num_layers)])


def _clusters(ids: np.ndarray, num_experts: int, size: int, lift: float, weights: np.ndarray,
              most: float) -> list[list[int]]:
    """Experts [S, K] of one layer's tokens -> clusters of at most ``size`` experts and, by
    ``weights`` [E], of at most ``most`` in all (step 2)."""
    e = num_experts
    k = ids.shape[1]
    pairs = (ids[:, :, None] * e + ids[:, None, :]).ravel()
    co = np.bincount(pairs, minlength=e * e).reshape(e, e).astype(np.float64)
    count = np.bincount(ids.ravel(), minlength=e).astype(np.float64)
    a, b = np.triu_indices(e, 1)
    weight = co[a, b]
    keep = (weight > 0) & (weight * len(ids) >= lift * count[a] * count[b])
    a, b, weight = a[keep], b[keep], weight[keep]
    order = np.lexsort((b, a, -weight))  # heaviest pair first; ties by index
    parent = np.arange(e)
    members = np.ones(e, dtype=np.int64)
    mass = np.asarray(weights, dtype=np.float64).copy()

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    if k > 1:
        for i in order.tolist():
            x, y = root(int(a[i])), root(int(b[i]))
            if x != y and members[x] + members[y] <= size and mass[x] + mass[y] <= most:
                parent[y] = x
                members[x] += members[y]
                mass[x] += mass[y]
    groups: dict[int, list[int]] = {}
    for x in range(e):
        groups.setdefault(root(x), []).append(x)
    return list(groups.values())


def _layer(ids: np.ndarray, load: np.ndarray, num_gpus: int, gpn: int, spg: int, lift: float) -> np.ndarray:
    e = len(load)
    nodes = num_gpus // gpn
    redundant = num_gpus * spg - e
    # 1. the hottest experts on every node: their load splits evenly over the nodes
    hot = np.argsort(-load, kind="stable")[:min(e, redundant // (nodes - 1))] if nodes > 1 else np.zeros(0, np.int64)
    everywhere = np.zeros(e, dtype=bool)
    everywhere[hot] = True
    held: list[list[int]] = [list(range(nodes)) if everywhere[x] else [] for x in range(e)]
    # 2-3. the other experts' clusters onto nodes, by the load they keep
    rest = e - len(hot)
    first_cap = -(-rest // nodes)  # ceil: first copies of the other experts per node
    node_load = np.full(nodes, load[hot].sum() / nodes)
    firsts = np.zeros(nodes, dtype=np.int64)
    kept = np.where(everywhere, 0.0, load)
    clusters = [[x for x in c if not everywhere[x]]
                for c in _clusters(ids, e, max(1, e // nodes), lift, kept, CLUSTER_LOAD_SHARE * kept.sum() / nodes)]
    clusters = sorted((c for c in clusters if c), key=lambda c: (-load[c].sum(), c[0]))
    whole_on: dict[int, int] = {}  # cluster index -> its node, for the clusters placed whole
    for i, c in enumerate(clusters):
        whole = [n for n in range(nodes) if firsts[n] + len(c) <= first_cap]
        if whole:
            n = min(whole, key=lambda n: (node_load[n], n))
            for x in c:
                held[x].append(n)
            node_load[n] += load[c].sum()
            firsts[n] += len(c)
            whole_on[i] = n
            continue
        for x in sorted(c, key=lambda x: (-load[x], x)):
            n = min((n for n in range(nodes) if firsts[n] < first_cap), key=lambda n: (node_load[n], n))
            held[x].append(n)
            node_load[n] += load[x]
            firsts[n] += 1
    _balance(held, clusters, whole_on, load, node_load, firsts, first_cap)
    # 4. the rooms left: the experts of highest load per copy, on the lightest node without one
    room = gpn * spg - firsts - len(hot)
    while room.sum() > 0:
        copies = np.array([len(h) for h in held], dtype=np.float64)
        x = int(np.argmax(np.where(copies < nodes, load / copies, -1.0))) if (copies < nodes).any() \
            else int(np.argmax(load / copies))
        free = [n for n in range(nodes) if room[n] > 0 and n not in held[x]] or \
            [n for n in range(nodes) if room[n] > 0]
        n = min(free, key=lambda n: (node_load[n], n))
        node_load[held[x]] -= load[x] / copies[x] - load[x] / (copies[x] + 1)
        held[x].append(n)
        node_load[n] += load[x] / (copies[x] + 1)
        room[n] -= 1
    # 5. each node's copies onto its GPUs
    out = np.empty(num_gpus * spg, dtype=np.int64)
    for n in range(nodes):
        items = sorted(((load[x] / len(held[x]), x) for x in range(e) for m in held[x] if m == n),
                       key=lambda item: (-item[0], item[1]))
        gpu_load = np.zeros(gpn)
        slots: list[list[int]] = [[] for _ in range(gpn)]
        for w, x in items:
            free = [g for g in range(gpn) if len(slots[g]) < spg]
            g = min([g for g in free if x not in slots[g]] or free, key=lambda g: (gpu_load[g], g))
            slots[g].append(x)
            gpu_load[g] += w
        for g in range(gpn):
            base = (n * gpn + g) * spg
            out[base:base + spg] = slots[g]
    return out


def _balance(held: list[list[int]], clusters: list[list[int]], where: dict[int, int], load: np.ndarray,
             node_load: np.ndarray, firsts: np.ndarray, first_cap: int) -> None:
    """Swap clusters placed whole (``where``: cluster index -> node) between the heaviest node
    and another while that lowers the heavier of the two (in place)."""
    weight = {i: float(load[clusters[i]].sum()) for i in where}
    for _ in range(4 * len(where)):
        h = int(np.argmax(node_load))
        best, pick = node_load[h], None
        for i in [i for i in where if where[i] == h]:
            for j, m in where.items():
                if m == h:
                    continue
                size = len(clusters[j]) - len(clusters[i])
                if firsts[h] + size > first_cap or firsts[m] - size > first_cap:
                    continue
                d = weight[i] - weight[j]
                worse = max(node_load[h] - d, node_load[m] + d)
                if worse < best - 1e-12:
                    best, pick = worse, (i, j, m, d, size)
        if pick is None:
            return
        i, j, m, d, size = pick
        for x in clusters[i]:
            held[x][-1] = m
        for x in clusters[j]:
            held[x][-1] = h
        where[i], where[j] = m, h
        node_load[h] -= d
        node_load[m] += d
        firsts[h] += size
        firsts[m] -= size
