"""Numba kernels of the ``placer`` local search: one MoE layer, incremental delta evaluation.

The search model of a layer (the "expected dispatch" model):

- tokens start on their home rank (the stats' sample); the rule maps (rank, expert) to a
  *distribution* over the expert's copies, the expectation of :mod:`placer.metrics.dispatch` over its
  seeded fair spread: ``nearest`` uses the home GPU's copy, else the home node's copies
  uniformly, else all copies uniformly; ``sglang-static`` is searched with
  ``nearest``'s model (it differs only where a node holds several but not all copies: SGLang
  then takes the first of them, and its fair spreads are per-rank streams, so the final metrics
  use the exact tables); the position rules ``sglang-dynamic`` and ``vllm`` all copies
  uniformly (averaged over rows). The fair spread
  gives every needing rank each candidate with probability 1 / #candidates, and the choices for
  different experts are independent, so per token ``E[#distinct GPUs used] = sum_x 1 - prod_k
  (1 - p_k(x))`` (nodes alike) is exact in expectation. Where no random choice is involved (no
  replicas, or replicas every rank reaches deterministically) the model equals the metrics.
- GPU load is expected over the same fair spread, with each expert's tokens starting on the
  ranks the sample has them on (``rank_load``; where there is no sample, home ranks uniform:
  :func:`placer.metrics.dispatch.slot_load`'s expectation), so the load and the sends read one
  set of tokens. The spread deals whole ranks, so a copy's load varies with the deal: each
  copy's variance (:func:`placer.ilp._ls_load.deal_variance`, from the dealt ranks' loads and their squares
  ``rank_sq``) adds to its GPU's, and the busiest GPU's load is the *expected maximum* over the
  deal, GPUs as independent normals (Clark's approximation,
  :func:`placer.ilp._ls_load.expected_max`): balancing the expected loads alone leaves many
  GPUs level, and the deal then lifts the maximum of them well above the expected one (on the
  Kimi-K2 shape with 128 GPUs by about 0.02 max/mean, twice as much as on EPLB's placement).

Per token type and GPU (node) the state keeps the number of the token's experts that surely use
it, the number that may, and the product of ``1 - p`` over the latter, so a move re-evaluates
only the tokens of the (at most two) changed experts and, per token, only the GPUs and nodes
those experts' distributions touch.

Energy of a layer (``maxload`` that expected maximum): ``w_bal * maxload + traffic + pen * max(0, maxload - cap)`` (the *primary*,
what is optimised) plus ``lam * w_bal * std(load)``, a small smooth term that guides the
annealer across the plateaus of the max. The best state is the one with the lowest primary
(the smooth term only breaks ties). Traffic per token = ``sum_x cost[h, x] q_x`` over GPUs ``x``
and nodes (``x = G + n``) with ``q`` the probability that ``x`` receives the token: ``w_nv``
for other ranks of the home node and for remote ranks other than the landing GPU (the one with
home's local index), ``w_rdma`` for remote nodes (DeepEP normal kernels), else 0.

Moves: swap the experts of two slots on different GPUs; move a redundant slot (one whose
expert has >= 2 copies) to another expert.

Movement (re-placement from a running placement, :func:`placer.ilp.movement.solve_from`): the
layer's ``move_cost[g, e]`` is added to the traffic term once per (GPU ``g``, expert ``e``) the
state holds, 0 where the running placement holds it, so a move pays for the weights it brings.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from placer._numba import HAVE_NUMBA  # noqa: F401  (re-exported: joint.py reports the backend)
from placer._numba import njit as _njit

# vllm-ascend (replica ``rank % copies``, a fixed table) is searched with the uniform model of the
# position rules: over uniform home ranks it spreads an expert's load evenly over its copies.
RULE_CODES = {"nearest": 0, "sglang-static": 0, "sglang-dynamic": 2, "vllm": 2, "vllm-ascend": 2}

# The kernels take named tuples (numba types them field by field, arrays and scalars alike):
# :class:`Dispatch` (topology and rule), :class:`Weights` (objective), :class:`Layer` (the
# layer's problem arrays, with the two), :class:`State` (the incremental search state) and
# :class:`Work` (scratch). Their scalar fields are always Python ``int`` / ``float`` / ``bool``
# (the constructors below convert), so each kernel compiles once.


class Dispatch(NamedTuple):
    """How a token reaches the copies of an expert: the rule and the topology."""

    rule: int              # RULE_CODES value
    num_gpus: int          # G
    num_nodes: int         # N
    gpus_per_node: int
    slot_gpu: np.ndarray   # int64 [P] GPU of each slot
    gpu_node: np.ndarray   # int64 [G] node of each GPU
    time_scale: np.ndarray  # float64 [G] a GPU's load as time (Topology.time_scale; all 1: equal GPUs)


class Weights(NamedTuple):
    """Energy of a layer (``maxload`` that expected maximum): ``w_bal * maxload + traffic + pen * max(0, maxload - cap)`` (primary)
    plus ``lam * w_bal * std(load)``; traffic weighs NVLink sends by ``w_nv``, RDMA by ``w_rdma``."""

    w_bal: float
    w_nv: float
    w_rdma: float
    lam: float
    pen: float
    cap: float


class Layer(NamedTuple):
    """Static data of one layer search (the problem arrays, with its dispatch and weights)."""

    ids: np.ndarray       # int64 [U, K] token types' experts
    home: np.ndarray      # int64 [U]
    wt: np.ndarray        # float64 [U] share of the sample
    load: np.ndarray      # float64 [E] token-slots per batch token
    rank_load: np.ndarray  # float64 [E, G] the part of it whose tokens start on each rank
    node_load: np.ndarray  # float64 [E, N] the same per node
    rank_sq: np.ndarray   # float64 [E, G] the square of each rank's part (an unbiased estimate)
    node_sq: np.ndarray   # float64 [E, N] its sum per node
    noise: np.ndarray     # float64 [E] sampling noise of rank_load (variance per unit, 0: exact)
    tok_ptr: np.ndarray   # int64 [E + 1] CSR: token types of each expert
    tok_idx: np.ndarray   # int64 [U * K]
    cost: np.ndarray      # float64 [G, G + N] cost of home h's token reaching GPU x / node x - G
    cdf: np.ndarray       # float64 [E, E] row e: cumulative co-activation share of e's partners
    num_experts: int      # E
    num_slots: int        # P
    slots_per_node: int
    distinct: bool        # no move may put two copies of one expert on one GPU
    dispatch: Dispatch
    weights: Weights
    move_cost: np.ndarray  # float64 [G, E] cost of GPU g holding expert e (0: held now; movement)
    has_move: bool        # move_cost has a nonzero entry


class State(NamedTuple):
    """Incremental state: copy lists, expected loads, per-token reach of GPUs and nodes.

    The reach arrays index GPUs ``x < G`` and nodes ``G + n`` alike (one code path for both).
    """

    cnt: np.ndarray      # int64 [E] copies per expert
    cslot: np.ndarray    # int64 [E, maxc] slots of each expert (first cnt[e] valid)
    contrib: np.ndarray  # float64 [E, G] expected load each expert puts on each GPU
    gload: np.ndarray    # float64 [G]
    cvar: np.ndarray     # float64 [E, G] variance of that load over the deal
    gvar: np.ndarray     # float64 [G]
    rc: np.ndarray       # int32 [U, G + N] experts surely sent to GPU (node) x
    ru: np.ndarray       # int32 [U, G + N] experts maybe sent to x
    rp: np.ndarray       # float64 [U, G + N] prod (1 - p) over the latter
    hold: np.ndarray     # int64 [G, E] copies of each expert on each GPU


class Work(NamedTuple):
    """Scratch arrays."""

    og: np.ndarray       # int64 [G + N] distribution support: GPUs, then their nodes (G + n)
    op: np.ndarray       # float64 [G + N] its probabilities
    seen: np.ndarray     # int64 [G + N] tick of the last touch
    lc: np.ndarray       # int64 [G + N] local copy of a token's reach
    lu: np.ndarray       # int64 [G + N]
    lp: np.ndarray       # float64 [G + N]
    touched: np.ndarray  # int64 [G + N] touched GPUs from 0, touched nodes from G
    hold_n: np.ndarray   # int64 [N]
    copy_n: np.ndarray   # int64 [N]
    mark: np.ndarray     # int64 [G]
    stamp: np.ndarray    # int64 [U]
    ticket: np.ndarray   # int64 [1] running stamp counter
    olds: np.ndarray     # int64 [2, maxc] copy lists before a move
    oldc: np.ndarray     # int64 [2]
    ca: np.ndarray       # float64 [G]
    cb: np.ndarray
    newload: np.ndarray
    pbuf: np.ndarray     # float64 [probe] positive energy changes seen in probe mode
    hold_w: np.ndarray   # float64 [N]
    hold_s: np.ndarray   # float64 [N]
    va: np.ndarray       # float64 [G]
    vb: np.ndarray
    newvar: np.ndarray


def make_dispatch(rule: str, num_gpus: int, num_nodes: int, gpus_per_node: int, slots_per_gpu: int,
                  num_slots: int, time_scale: np.ndarray | None = None) -> Dispatch:
    """The :class:`Dispatch` of ``num_slots`` slots, ``slots_per_gpu`` per GPU, under ``rule``;
    ``time_scale`` float [G] (default all 1): a GPU's load as time (GPUs of different speeds)."""
    scale = np.ones(int(num_gpus)) if time_scale is None else np.ascontiguousarray(time_scale, np.float64)
    return Dispatch(RULE_CODES[rule], int(num_gpus), int(num_nodes), int(gpus_per_node),
                    np.arange(num_slots, dtype=np.int64) // int(slots_per_gpu),
                    np.arange(num_gpus, dtype=np.int64) // int(gpus_per_node), scale)


def make_layer(ids, home, wt, load, num_experts: int, slots_per_gpu: int, dispatch: Dispatch,
               weights: Weights, distinct: bool, move_cost: np.ndarray | None = None,
               link_scale: np.ndarray | None = None, rank_load: np.ndarray | None = None,
               rank_sq: np.ndarray | None = None, noise: np.ndarray | None = None) -> Layer:
    """A :class:`Layer`; ``rank_load`` float [E, G] (default ``load / G`` on every rank): the part
    of each expert's load whose tokens start on each rank; ``rank_sq`` float [E, G] (default
    ``rank_load ** 2``): the square of each part, for the deal's variance (where the parts are
    scaled up from a sample, :func:`placer.ilp.load_model.rank_loads` removes the sample's own
    noise); ``noise`` float [E] (default 0): the sampling noise of ``rank_load``
    (:func:`placer.ilp.load_model.rank_loads`); ``move_cost`` float [G, E] (default
    none): the movement term, the cost of GPU g holding expert e, added to the energy once per
    (GPU, expert) held (see
    :func:`placer.ilp._ls_anneal.init_state`); ``link_scale`` float [G, G] (default all 1): each
    rank pair's cost relative to its tier (:func:`placer.ilp.objective.link_scale`): a send from
    home to a rank of its node, a forward from the landing GPU, and the RDMA send to it, each
    times its own pair's scale."""
    e, g, n, gpn = int(num_experts), dispatch.num_gpus, dispatch.num_nodes, dispatch.gpus_per_node
    mc = np.zeros((g, e)) if move_cost is None else np.ascontiguousarray(move_cost, np.float64)
    if mc.shape != (g, e):
        raise ValueError(f"move_cost must be [{g}, {e}], got {list(mc.shape)}")
    load = np.ascontiguousarray(load, np.float64)
    rl = (np.repeat(load[:, None] / g, g, axis=1) if rank_load is None
          else np.ascontiguousarray(rank_load, np.float64))
    if rl.shape != (e, g):
        raise ValueError(f"rank_load must be [{e}, {g}], got {list(rl.shape)}")
    sq = rl * rl if rank_sq is None else np.ascontiguousarray(rank_sq, np.float64)
    if sq.shape != (e, g):
        raise ValueError(f"rank_sq must be [{e}, {g}], got {list(sq.shape)}")
    kap = np.zeros(e) if noise is None else np.ascontiguousarray(noise, np.float64)
    if kap.shape != (e,):
        raise ValueError(f"noise must be [{e}], got {list(kap.shape)}")
    flat = ids.ravel()
    order = np.argsort(flat, kind="stable")
    ptr = np.zeros(e + 1, np.int64)
    np.cumsum(np.bincount(flat, minlength=e), out=ptr[1:])
    gpus = np.arange(g)
    node = dispatch.gpu_node
    same_node = node[:, None] == node[None, :]
    landing = (gpus[:, None] % gpn) == (gpus[None, :] % gpn)
    w = np.where(same_node | ~landing, weights.w_nv, 0.0)  # NVLink: other ranks but the landing GPU
    np.fill_diagonal(w, 0.0)
    v = np.where(node[:, None] == np.arange(n)[None, :], 0.0, weights.w_rdma)  # RDMA: remote nodes
    if link_scale is not None:
        land = node[None, :] * gpn + (gpus % gpn)[:, None]  # [h, x]: home h's landing GPU in x's node
        w = w * np.where(same_node, link_scale, link_scale[land, gpus[None, :]])
        v = v * link_scale[gpus[:, None], np.arange(n)[None, :] * gpn + (gpus % gpn)[:, None]]
    return Layer(np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(home, np.int64),
                 np.ascontiguousarray(wt, np.float64), load, rl,
                 np.ascontiguousarray(rl.reshape(e, n, gpn).sum(axis=2)), sq,
                 np.ascontiguousarray(sq.reshape(e, n, gpn).sum(axis=2)), kap, ptr,
                 (order // max(ids.shape[1], 1)).astype(np.int64), np.ascontiguousarray(np.hstack([w, v])),
                 partner_cdf(ids, wt, e), e, int(dispatch.slot_gpu.shape[0]), int(slots_per_gpu) * gpn,
                 bool(distinct), dispatch, weights, mc, bool((mc != 0).any()))


def partner_cdf(ids: np.ndarray, wt: np.ndarray, num_experts: int) -> np.ndarray:
    """Row ``e``: cumulative share of the token weight ``e`` shares with each other expert.

    Rows of experts that never fire with another are uniform. Shape float64 [E, E].
    """
    e = num_experts
    co = np.zeros((e, e))
    k = ids.shape[1]
    for i in range(k):
        for j in range(i + 1, k):
            np.add.at(co, (ids[:, i], ids[:, j]), wt)
    co += co.T
    tot = co.sum(axis=1, keepdims=True)
    co = np.where(tot > 0, co / np.where(tot > 0, tot, 1.0), 1.0 / e)
    cdf = np.cumsum(co, axis=1)
    cdf[:, -1] = 1.0
    return cdf


def make_state(num_experts: int, num_slots: int, num_gpus: int, num_nodes: int, num_types: int) -> State:
    maxc = num_slots - num_experts + 1
    u, x = num_types, num_gpus + num_nodes
    return State(np.zeros(num_experts, np.int64), np.zeros((num_experts, maxc), np.int64),
                 np.zeros((num_experts, num_gpus)), np.zeros(num_gpus), np.zeros((num_experts, num_gpus)),
                 np.zeros(num_gpus), np.zeros((u, x), np.int32),
                 np.zeros((u, x), np.int32), np.ones((u, x)), np.zeros((num_gpus, num_experts), np.int64))


def make_work(num_experts: int, num_slots: int, num_gpus: int, num_nodes: int, num_types: int,
              probe: int = 256) -> Work:
    maxc = num_slots - num_experts + 1
    g, n, x = num_gpus, num_nodes, num_gpus + num_nodes
    z = np.zeros
    return Work(z(x, np.int64), z(x), z(x, np.int64), z(x, np.int64), z(x, np.int64), z(x), z(x, np.int64),
                z(n, np.int64), z(n, np.int64), z(g, np.int64), z(num_types, np.int64), z(1, np.int64),
                z((2, maxc), np.int64), z(2, np.int64), z(g), z(g), z(g), z(max(probe, 1)), z(n), z(n), z(g), z(g),
                z(g))


@_njit
def _q(c, u, p):
    if c > 0:
        return 1.0
    if u > 0:
        return 1.0 - p
    return 0.0


@_njit
def _traffic(mode, a, b, write, L, st, wk):
    """Weighted traffic change of token types when expert distributions change.

    ``mode`` 0: a move changed experts ``a`` and ``b`` (old copy lists in ``wk.olds``/``wk.oldc``
    rows 0 and 1, new ones in ``st.cnt``/``st.cslot``); the tokens of ``a`` and ``b`` are
    re-evaluated. ``mode`` 1: every token type gets all its experts added to an empty state
    (build). With ``write`` the per-token state is updated. Everything is inline: a call per
    touched GPU costs more than its work.
    """
    ids, home, wt, tok_ptr, tok_idx, cost = L.ids, L.home, L.wt, L.tok_ptr, L.tok_idx, L.cost
    G, rule, sg, gn = L.dispatch.num_gpus, L.dispatch.rule, L.dispatch.slot_gpu, L.dispatch.gpu_node
    cnt, cslot, olds, oldc, rc, ru, rp = st.cnt, st.cslot, wk.olds, wk.oldc, st.rc, st.ru, st.rp
    og, op, seen, lc, lu, lp, touched = wk.og, wk.op, wk.seen, wk.lc, wk.lu, wk.lp, wk.touched
    stamp, ticket = wk.stamp, wk.ticket
    K = ids.shape[1]
    U = ids.shape[0]
    delta = 0.0
    ticket[0] += 1
    mark = ticket[0]
    ent_src = np.empty(2 * K + 4, np.int64)  # 0: olds, 1: cslot
    ent_row = np.empty(2 * K + 4, np.int64)
    ent_sign = np.empty(2 * K + 4, np.int64)
    nlist = 2 if mode == 0 else 1
    for x in range(nlist):
        if mode == 0:
            e0 = a if x == 0 else b
            q0 = tok_ptr[e0]
            q1 = tok_ptr[e0 + 1]
        else:
            q0 = 0
            q1 = U
        for q in range(q0, q1):
            t = tok_idx[q] if mode == 0 else q
            if mode == 0:
                if stamp[t] == mark:
                    continue
                stamp[t] = mark
            nent = 0
            if mode == 0:
                ha = False
                hb = False
                for k in range(K):
                    f = ids[t, k]
                    if f == a:
                        ha = True
                    elif f == b:
                        hb = True
                for y in range(2):  # a, then b: the old copy list out, the new one in
                    if ha if y == 0 else hb:
                        ent_src[nent] = 0
                        ent_row[nent] = y
                        ent_sign[nent] = -1
                        ent_src[nent + 1] = 1
                        ent_row[nent + 1] = a if y == 0 else b
                        ent_sign[nent + 1] = 1
                        nent += 2
            else:
                for k in range(K):
                    ent_src[nent] = 1
                    ent_row[nent] = ids[t, k]
                    ent_sign[nent] = 1
                    nent += 1
            ticket[0] += 1
            tick = ticket[0]
            h = home[t]
            nh = gn[h]
            ng = 0
            nn = 0
            for z in range(nent):
                src = olds if ent_src[z] == 0 else cslot
                row = ent_row[z]
                c = oldc[row] if ent_src[z] == 0 else cnt[row]
                sign = ent_sign[z]
                # distribution of this expert for home h: GPUs og[:m] with probabilities op[:m]
                m = 0
                held = False
                if rule != 2:
                    for j in range(c):
                        if sg[src[row, j]] == h:
                            held = True
                            break
                if held:
                    og[0] = h
                    op[0] = 1.0
                    m = 1
                else:
                    local = 0
                    if rule == 0:
                        for j in range(c):
                            if gn[sg[src[row, j]]] == nh:
                                local += 1
                    inv = 1.0 / local if local > 0 else 1.0 / c
                    for j in range(c):
                        g = sg[src[row, j]]
                        if local > 0 and gn[g] != nh:
                            continue
                        found = False
                        for i in range(m):
                            if og[i] == g:
                                op[i] += inv
                                found = True
                                break
                        if not found:
                            og[m] = g
                            op[m] = inv
                            m += 1
                    if m == 1:
                        op[0] = 1.0
                # per node: og[m:m + kn] = G + node, op the node's probability
                kn = 0
                for i in range(m):
                    n = G + gn[og[i]]
                    found = False
                    for j in range(m, m + kn):
                        if og[j] == n:
                            op[j] += op[i]
                            found = True
                            break
                    if not found:
                        og[m + kn] = n
                        op[m + kn] = op[i]
                        kn += 1
                if kn == 1:
                    op[m] = 1.0
                # apply to the token's local copy (GPUs and nodes alike)
                for i in range(m + kn):
                    y = og[i]
                    pr = op[i]
                    if seen[y] != tick:
                        seen[y] = tick
                        if y < G:
                            touched[ng] = y
                            ng += 1
                        else:
                            touched[G + nn] = y
                            nn += 1
                        lc[y] = rc[t, y]
                        lu[y] = ru[t, y]
                        lp[y] = rp[t, y]
                    if pr >= 1.0:
                        lc[y] += sign
                    else:
                        lu[y] += sign
                        if lu[y] == 0:
                            lp[y] = 1.0
                        elif sign > 0:
                            lp[y] *= 1.0 - pr
                        else:
                            lp[y] /= 1.0 - pr
            d = 0.0
            for side in range(2):  # the touched GPUs, then the touched nodes
                i0 = 0 if side == 0 else G
                for i in range(i0, i0 + (ng if side == 0 else nn)):
                    y = touched[i]
                    w = cost[h, y]
                    if w != 0.0:
                        d += w * (_q(lc[y], lu[y], lp[y]) - _q(rc[t, y], ru[t, y], rp[t, y]))
                    if write:
                        rc[t, y] = lc[y]
                        ru[t, y] = lu[y]
                        rp[t, y] = lp[y]
            delta += wt[t] * d
    return delta
