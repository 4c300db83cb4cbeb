"""Routing of one step's batch into per-layer token counts between GPUs.

Two paths give the same :class:`Traffic` record:

- token level (:func:`token_traffic`): exact, from every token's top-k logical ids and home
  rank, through the shared dispatch rule (``placer.metrics.dispatch``). Used for trace replay and to
  cross-check the count level on small cases.
- count level (:func:`sample_traffic`): per-token expectations measured once on a pool of
  tokens (:func:`routing_rates`), scaled by the step's tokens per rank, with the step's
  per-expert fluctuation drawn from a multinomial. Costs a few array operations per step
  whatever the batch size.

Counts are tokens, not bytes: the network model applies the kernel's byte accounting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placer._numba import njit
from placer.errors import InvalidInputError
from placer.metrics.core import first_of_run
from placer.metrics.dispatch import DEFAULT_DISPATCH_SEED, dispatch_table, select_slots
from placer.types import POSITION_RULES, Placement, Topology


@dataclass(frozen=True)
class Traffic:
    """Per-MoE-layer routing of a batch (float64 token counts).

    ``src [L, G]``: tokens whose experts are dispatched from each GPU (the home rank; under
    context-coherent execution the GPU holding the token's state). ``tokens [L, G, G]``:
    distinct tokens sent g -> d, d != g (a token goes to a rank once however many of its experts
    live there). ``nodes [L, G, N]``: distinct tokens sent from g to each remote node (0 for
    g's own node). ``pairs [L, G, G]``: token-expert pairs g -> d, the diagonal served locally.
    ``slots [L, P]``: pairs served by each physical slot. ``moves [L, G, G]`` (context-coherent
    only): tokens whose state moves from g to d on entering the layer.
    """

    src: np.ndarray
    tokens: np.ndarray
    nodes: np.ndarray
    pairs: np.ndarray | None
    slots: np.ndarray
    moves: np.ndarray | None = None

    @property
    def num_tokens(self) -> float:
        return float(self.src[0].sum())


def _slots_of(placement: Placement, topology: Topology, ids: np.ndarray, home: np.ndarray,
              index: np.ndarray, execution: str, dispatch: str, seed: int,
              table: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Physical slot of every (token, layer, k) and the GPU each layer dispatches from.

    Returns ``slots`` int64 [T, L, K] and ``src`` int64 [T, L].
    """
    t, num_layers, _ = ids.shape
    if execution == "standard" or dispatch in POSITION_RULES:
        slots = select_slots(placement, topology, ids, home_rank=home, token_index=index, rule=dispatch,
                             seed=seed, table=table)
        if execution == "standard":
            return slots, np.broadcast_to(home[:, None], (t, num_layers))
        return slots, slots[:, :, 0] // placement.slots_per_gpu
    # Context-coherent: the top-1 replica is chosen from where the state is, the others from there.
    assert table is not None
    spg = placement.slots_per_gpu
    slots = np.empty(ids.shape, dtype=np.int64)
    src = np.empty((t, num_layers), dtype=np.int64)
    loc = home
    for layer in range(num_layers):
        slots[:, layer, 0] = table[layer, loc, ids[:, layer, 0]]
        loc = slots[:, layer, 0] // spg
        src[:, layer] = loc
        slots[:, layer, 1:] = table[layer, loc[:, None], ids[:, layer, 1:]]
    return slots, src


def token_traffic(placement: Placement, topology: Topology, ids: np.ndarray, home: np.ndarray, *,
                  execution: str = "standard", dispatch: str = "nearest", seed: int = DEFAULT_DISPATCH_SEED,
                  index: np.ndarray | None = None, table: np.ndarray | None = None) -> Traffic:
    """Exact :class:`Traffic` of a batch. ``ids``: int [T, L, K] logical, top-1 first; ``home``: int [T]."""
    ids = np.asarray(ids, dtype=np.int64)
    home = np.asarray(home, dtype=np.int64)
    t, num_layers, k = ids.shape
    g_count, gpn, num_slots = placement.num_gpus, topology.gpus_per_node, placement.num_slots
    n_nodes = topology.num_nodes
    if index is None:
        index = np.arange(t)
    if table is None and dispatch not in POSITION_RULES:
        table = dispatch_table(placement, topology, dispatch, seed)
    slots, src = _slots_of(placement, topology, ids, home, index, execution, dispatch, seed, table)
    gpu = slots // placement.slots_per_gpu
    layer = np.arange(num_layers)[None, :]
    src_layer = src + layer * g_count  # [T, L]: row of the (layer, source GPU)
    moves = None
    if execution == "standard":
        dest = gpu
    else:
        dest = gpu[:, :, 1:]
        prev = np.concatenate([home[:, None], src[:, :-1]], axis=1)
        moved = prev != src
        flat = ((prev + layer * g_count) * g_count + src)[moved]
        moves = np.bincount(flat, minlength=num_layers * g_count * g_count).reshape(num_layers, g_count, g_count)
    size = num_layers * g_count * g_count
    row = src_layer[:, :, None]
    pairs_flat = (row * g_count + gpu).ravel() if execution == "standard" else np.concatenate(
        [(src_layer * g_count + src).ravel(), (row * g_count + dest).ravel()])
    pairs = np.bincount(pairs_flat, minlength=size).reshape(num_layers, g_count, g_count)
    ds = np.sort(dest, axis=-1)
    first = first_of_run(ds)
    keep = first & (ds != src[:, :, None])
    tokens = np.bincount((row * g_count + ds)[keep], minlength=size).reshape(num_layers, g_count, g_count)
    ns = ds // gpn
    node_first = first_of_run(ns) & (ns != (src // gpn)[:, :, None])
    nodes = np.bincount((row * n_nodes + ns)[node_first], minlength=num_layers * g_count * n_nodes)
    slot_pairs = np.bincount((slots + layer[:, :, None] * num_slots).ravel(),
                             minlength=num_layers * num_slots).reshape(num_layers, num_slots)
    src_counts = np.bincount(src_layer.ravel(), minlength=num_layers * g_count).reshape(num_layers, g_count)
    f = np.float64
    return Traffic(src=src_counts.astype(f), tokens=tokens.astype(f),
                   nodes=nodes.reshape(num_layers, g_count, n_nodes).astype(f), pairs=pairs.astype(f),
                   slots=slot_pairs.astype(f), moves=None if moves is None else moves.astype(f))


@dataclass(frozen=True)
class RoutingRates:
    """Per-token expectations of a placement, measured on a pool of tokens.

    ``tokens``, ``pairs`` [L, G, G], ``nodes`` [L, G, N] and ``slots`` [L, G, P] are per token
    dispatched from GPU g. Standard execution: ``src_share`` is None (the step's home ranks
    give the sources). Context-coherent: ``src_share [L, G]`` is the fraction of tokens whose
    state is on g at layer l and ``moves [L, G, G]`` the fraction moving g -> d.
    """

    execution: str
    tokens: np.ndarray
    nodes: np.ndarray
    pairs: np.ndarray
    slots: np.ndarray
    src_share: np.ndarray | None = None
    moves: np.ndarray | None = None


def _per_source(total: np.ndarray, src: np.ndarray) -> np.ndarray:
    den = src.reshape(src.shape + (1,) * (total.ndim - 2))
    return np.divide(total, den, out=np.zeros_like(total), where=den > 0)


def routing_rates(placement: Placement, topology: Topology, pool: np.ndarray, *, execution: str = "standard",
                  dispatch: str = "nearest", seed: int = DEFAULT_DISPATCH_SEED,
                  table: np.ndarray | None = None) -> RoutingRates:
    """Measure :class:`RoutingRates` on ``pool``: int [S, L, K] logical ids, top-1 first.

    Standard execution evaluates every pool token at every home rank (routing does not depend
    on where a token lives), so the rates are unbiased for any mix of home ranks. ``table``: the
    dispatch table when already computed. Context-coherent execution follows each pool token from
    a round-robin home, since where its state lives depends on its routing.
    """
    pool = np.asarray(pool, dtype=np.int64)
    s, num_layers, k = pool.shape
    if s == 0:
        raise InvalidInputError("the routing pool is empty", source="routing")
    g_count, gpn = placement.num_gpus, topology.gpus_per_node
    if table is None and dispatch not in POSITION_RULES:
        table = dispatch_table(placement, topology, dispatch, seed)
    num_slots = placement.num_slots
    if execution != "standard":
        tr = token_traffic(placement, topology, pool, np.arange(s) % g_count, execution=execution,
                           dispatch=dispatch, seed=seed, table=table)
        # Slot pairs by source GPU: recompute per source from the pool's own paths.
        sl, src = _slots_of(placement, topology, pool, np.arange(s) % g_count, np.arange(s), execution,
                            dispatch, seed, table)
        flat = ((src[:, :, None] + np.arange(num_layers)[None, :, None] * g_count) * num_slots + sl).ravel()
        slots = np.bincount(flat, minlength=num_layers * g_count * num_slots).reshape(
            num_layers, g_count, num_slots).astype(np.float64)
        assert tr.pairs is not None  # token_traffic always counts the pairs
        return RoutingRates(execution=execution, tokens=_per_source(tr.tokens, tr.src),
                            nodes=_per_source(tr.nodes, tr.src), pairs=_per_source(tr.pairs, tr.src),
                            slots=_per_source(slots, tr.src), src_share=tr.src / s, moves=tr.moves / s)
    if table is None:  # position rules: the replica depends on the token's position, not its home
        slots_of = select_slots(placement, topology, pool, token_index=np.arange(s), rule=dispatch, seed=seed)
        tokens, nodes, pairs, slots = _rates_by_position(slots_of, placement.slots_per_gpu, g_count, gpn, num_slots)
    else:
        tokens, nodes, pairs, slots = _rates_by_home(pool, table, placement.slots_per_gpu, gpn, num_slots)
    tokens /= s
    nodes /= s
    pairs /= s
    slots /= s
    return RoutingRates(execution=execution, tokens=tokens, nodes=nodes, pairs=pairs, slots=slots)


@njit
def _rates_by_home(pool, table, spg, gpn, num_slots):  # pragma: no cover - numba
    """Counts of every pool token evaluated at every home rank (standard execution).

    ``pool`` int64 [S, L, K], ``table`` int64 [L, G, E]. Returns float64 ``tokens`` [L, G, G]
    (distinct destination ranks other than the home), ``nodes`` [L, G, N] (distinct remote
    nodes), ``pairs`` [L, G, G] and ``slots`` [L, G, P], summed over the pool. A layer whose
    dispatch rows are the same for every home (no replicas) is counted once and copied.
    """
    s_count, num_layers, k = pool.shape
    g_count = table.shape[1]
    n_nodes = g_count // gpn
    tokens = np.zeros((num_layers, g_count, g_count))
    nodes = np.zeros((num_layers, g_count, n_nodes))
    pairs = np.zeros((num_layers, g_count, g_count))
    slots = np.zeros((num_layers, g_count, num_slots))
    seen_gpu = np.full(g_count, -1, np.int64)
    seen_node = np.full(n_nodes, -1, np.int64)
    hits = np.zeros(g_count)
    node_hits = np.zeros(n_nodes)
    stamp = 0
    for layer in range(num_layers):
        same = True
        for g in range(1, g_count):
            for e in range(table.shape[2]):
                if table[layer, g, e] != table[layer, 0, e]:
                    same = False
                    break
            if not same:
                break
        homes = 1 if same else g_count
        for g in range(homes):
            row = table[layer, g]
            hits[:] = 0.0
            node_hits[:] = 0.0
            for t in range(s_count):
                stamp += 1
                for j in range(k):
                    slot = row[pool[t, layer, j]]
                    slots[layer, g, slot] += 1.0
                    d = slot // spg
                    if seen_gpu[d] != stamp:
                        seen_gpu[d] = stamp
                        hits[d] += 1.0
                        m = d // gpn
                        if seen_node[m] != stamp:
                            seen_node[m] = stamp
                            node_hits[m] += 1.0
            targets = range(g_count) if same else range(g, g + 1)
            for h in targets:
                if h != g:
                    slots[layer, h] = slots[layer, g]
                for d in range(g_count):
                    tokens[layer, h, d] = 0.0 if d == h else hits[d]
                for m in range(n_nodes):
                    nodes[layer, h, m] = 0.0 if m == h // gpn else node_hits[m]
        for h in range(g_count):
            for p in range(num_slots):
                pairs[layer, h, p // spg] += slots[layer, h, p]
    return tokens, nodes, pairs, slots


def _rates_by_position(slots_of: np.ndarray, spg: int, g_count: int, gpn: int, num_slots: int):
    """As :func:`_rates_by_home` when the replica depends on the token only (``slots_of`` [S, L, K])."""
    s, num_layers, _ = slots_of.shape
    n_nodes = g_count // gpn
    gpu = slots_of // spg
    gs = np.sort(gpu, axis=-1)
    first = first_of_run(gs)
    lay = np.arange(num_layers)[None, :, None]
    hits = np.bincount((lay * g_count + gs)[first], minlength=num_layers * g_count).reshape(num_layers, g_count)
    ns = gs // gpn
    node_hits = np.bincount((lay * n_nodes + ns)[first_of_run(ns)], minlength=num_layers * n_nodes).reshape(
        num_layers, n_nodes)
    pair_hits = np.bincount((lay * g_count + gpu).ravel(), minlength=num_layers * g_count).reshape(num_layers, g_count)
    slot_hits = np.bincount((lay * num_slots + slots_of).ravel(), minlength=num_layers * num_slots).reshape(
        num_layers, num_slots)
    tokens = np.repeat(hits[:, None, :], g_count, axis=1).astype(np.float64)
    tokens[:, np.arange(g_count), np.arange(g_count)] = 0.0
    nodes = np.repeat(node_hits[:, None, :], g_count, axis=1).astype(np.float64)
    nodes[:, np.arange(g_count), np.arange(g_count) // gpn] = 0.0
    pairs = np.repeat(pair_hits[:, None, :], g_count, axis=1).astype(np.float64)
    slots = np.repeat(slot_hits[:, None, :], g_count, axis=1).astype(np.float64)
    return tokens, nodes, pairs, slots


def sample_traffic(rates: RoutingRates, placement: Placement, topology: Topology, tokens_per_rank: np.ndarray,
                   rng: np.random.Generator | None, *, with_pairs: bool = True) -> Traffic:
    """Count-level :class:`Traffic` of a step with ``tokens_per_rank`` float [G] tokens per home rank.

    Expected counts are ``tokens x rates``; with ``rng`` the step's pairs per expert are drawn
    from a multinomial over the layer's expert shares, and the traffic into each GPU (node) is
    scaled by its realised / expected pairs. Without ``rng`` the expectation is returned.
    ``with_pairs=False`` leaves ``pairs`` out (only the low-latency kernel needs them).
    """
    n = np.asarray(tokens_per_rank, dtype=np.float64)
    total = float(n.sum())
    num_layers, g_count, num_slots = rates.slots.shape
    if rates.src_share is None:
        src = np.broadcast_to(n, (num_layers, g_count))
    else:
        src = total * rates.src_share
    slots = np.einsum("lg,lgp->lp", src, rates.slots)  # [L, P]
    factor_gpu = np.ones((num_layers, g_count))
    if rng is not None and total > 0:
        p2l = placement.physical_to_logical
        flat = (np.arange(num_layers)[:, None] * placement.num_experts + p2l).ravel()
        expected = np.bincount(flat, slots.ravel(), minlength=num_layers * placement.num_experts).reshape(
            num_layers, placement.num_experts)
        n_pairs = expected.sum(axis=1)
        share = np.divide(expected, n_pairs[:, None], out=np.zeros_like(expected), where=n_pairs[:, None] > 0)
        drawn = _draw_counts(expected, share, rng)
        f_expert = np.divide(drawn, expected, out=np.ones_like(expected), where=expected > 0)
        realised = slots * f_expert[np.arange(num_layers)[:, None], p2l]
        spg = placement.slots_per_gpu
        exp_gpu = slots.reshape(num_layers, g_count, spg).sum(axis=2)
        real_gpu = realised.reshape(num_layers, g_count, spg).sum(axis=2)
        factor_gpu = np.divide(real_gpu, exp_gpu, out=np.ones_like(exp_gpu), where=exp_gpu > 0)
        gpn = topology.gpus_per_node
        exp_node = exp_gpu.reshape(num_layers, -1, gpn).sum(axis=2)
        factor_node = np.divide(real_gpu.reshape(num_layers, -1, gpn).sum(axis=2), exp_node,
                                out=np.ones_like(exp_node), where=exp_node > 0)
        slots = realised
    else:
        factor_node = np.ones((num_layers, topology.num_nodes))
    scale = src[:, :, None]
    fg = factor_gpu[:, None, :]

    def scaled(rate: np.ndarray, by: np.ndarray) -> np.ndarray:
        out = np.multiply(rate, scale)
        out *= by
        return out

    return Traffic(src=np.array(src), tokens=scaled(rates.tokens, fg), nodes=scaled(rates.nodes, factor_node[:, None, :]),
                   pairs=scaled(rates.pairs, fg) if with_pairs else None, slots=slots,
                   moves=None if rates.moves is None else total * rates.moves * fg)


SMALL_COUNT = 30.0


def _draw_counts(expected: np.ndarray, share: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pairs per expert of one step, float [L, E]: the multinomial of each layer's pairs.

    Counts expected below :data:`SMALL_COUNT` are drawn from a Poisson, the others from the
    multinomial's normal approximation (mean ``n p``, variance ``n p (1 - p)``); each layer is
    then rescaled to its total. Exact moments at a fraction of the multinomial's cost.
    """
    small = expected < SMALL_COUNT
    drawn = np.empty_like(expected)
    drawn[small] = rng.poisson(expected[small])
    big = ~small
    e = expected[big]
    drawn[big] = np.maximum(e + np.sqrt(e * (1.0 - share[big])) * rng.standard_normal(e.shape), 0.0)
    total, got = expected.sum(axis=1, keepdims=True), drawn.sum(axis=1, keepdims=True)
    return drawn * np.divide(total, got, out=np.ones_like(total), where=got > 0)
