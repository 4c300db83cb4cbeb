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
- GPU load is the expected :func:`placer.metrics.dispatch.slot_load` (home ranks uniform).

Per token type and GPU (node) the state keeps the number of the token's experts that surely use
it, the number that may, and the product of ``1 - p`` over the latter, so a move re-evaluates
only the tokens of the (at most two) changed experts and, per token, only the GPUs and nodes
those experts' distributions touch.

Energy of a layer: ``w_bal * maxload + traffic + pen * max(0, maxload - cap)`` (the *primary*,
what is optimised) plus ``lam * w_bal * std(load)``, a small smooth term that guides the
annealer across the plateaus of the max. The best state is the one with the lowest primary
(the smooth term only breaks ties). Traffic per token = ``sum_x W[h, x] q_x + sum_n V[h, n]
q_n`` with ``q`` the probability that GPU ``x`` (node ``n``) receives the token: ``W`` is
``w_nv`` for other ranks of the home node and for remote ranks other than the landing GPU (the
one with home's local index), ``V`` is ``w_rdma`` for remote nodes (DeepEP normal kernels).

Moves: swap the experts of two slots on different GPUs; move a redundant slot (one whose
expert has >= 2 copies) to another expert.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from placer._numba import HAVE_NUMBA  # noqa: F401  (re-exported: joint.py reports the backend)
from placer._numba import njit as _njit

# vllm-ascend (replica ``rank % copies``, a fixed table) is searched with the uniform model of the
# position rules: over uniform home ranks it spreads an expert's load evenly over its copies.
RULE_CODES = {"nearest": 0, "sglang-static": 0, "sglang-dynamic": 2, "vllm": 2, "vllm-ascend": 2}
# Scalars of a layer problem, packed in one float64 array ``prm`` (numba-friendly):
# 0 G, 1 N, 2 gpn, 3 spg, 4 E, 5 P, 6 K, 7 rule, 8 w_bal, 9 w_nv, 10 w_rdma, 11 lam, 12 pen, 13 cap,
# 14 distinct (1: no move may put two copies of one expert on one GPU)
NPARAM = 15


class Layer(NamedTuple):
    """Static data of one layer search."""

    ids: np.ndarray       # int64 [U, K] token types' experts
    home: np.ndarray      # int64 [U]
    wt: np.ndarray        # float64 [U] share of the sample
    load: np.ndarray      # float64 [E] token-slots per batch token
    tok_ptr: np.ndarray   # int64 [E + 1] CSR: token types of each expert
    tok_idx: np.ndarray   # int64 [U * K]
    slot_gpu: np.ndarray  # int64 [P]
    gpu_node: np.ndarray  # int64 [G]
    W: np.ndarray         # float64 [G, G] cost of home h's token reaching GPU x
    V: np.ndarray         # float64 [G, N] cost of home h's token reaching node n
    cdf: np.ndarray       # float64 [E, E] row e: cumulative co-activation share of e's partners
    prm: np.ndarray       # float64 [NPARAM]


class State(NamedTuple):
    """Incremental state: copy lists, expected loads, per-token reach of GPUs and nodes."""

    cnt: np.ndarray      # int64 [E] copies per expert
    cslot: np.ndarray    # int64 [E, maxc] slots of each expert (first cnt[e] valid)
    contrib: np.ndarray  # float64 [E, G] expected load each expert puts on each GPU
    gload: np.ndarray    # float64 [G]
    gc: np.ndarray       # int32 [U, G] experts surely sent to GPU x
    gu: np.ndarray       # int32 [U, G] experts maybe sent to GPU x
    gp: np.ndarray       # float64 [U, G] prod (1 - p) over the latter
    nc: np.ndarray       # int32 [U, N] same per node
    nu: np.ndarray       # int32 [U, N]
    np_: np.ndarray      # float64 [U, N]


class Work(NamedTuple):
    """Scratch arrays."""

    og: np.ndarray       # int64 [G] distribution support
    op: np.ndarray       # float64 [G]
    on: np.ndarray       # int64 [N]
    opn: np.ndarray      # float64 [N]
    gmark: np.ndarray    # int64 [G]
    nmark: np.ndarray    # int64 [N]
    lc: np.ndarray       # int64 [G] local copies of a token's state
    lu: np.ndarray
    lp: np.ndarray       # float64 [G]
    lnc: np.ndarray      # int64 [N]
    lnu: np.ndarray
    lnp: np.ndarray      # float64 [N]
    tgl: np.ndarray      # int64 [G] touched GPUs
    tnl: np.ndarray      # int64 [N] touched nodes
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


def make_layer(ids, home, wt, load, prm: np.ndarray) -> Layer:
    g, n, gpn, spg, e, p = (int(x) for x in prm[:6])
    flat = ids.ravel()
    order = np.argsort(flat, kind="stable")
    ptr = np.zeros(e + 1, np.int64)
    np.cumsum(np.bincount(flat, minlength=e), out=ptr[1:])
    gpus = np.arange(g)
    node = gpus // gpn
    same_node = node[:, None] == node[None, :]
    landing = (gpus[:, None] % gpn) == (gpus[None, :] % gpn)
    w = np.where(same_node | ~landing, prm[9], 0.0)
    np.fill_diagonal(w, 0.0)
    v = np.where(node[:, None] == np.arange(n)[None, :], 0.0, prm[10])
    return Layer(np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(home, np.int64),
                 np.ascontiguousarray(wt, np.float64), np.ascontiguousarray(load, np.float64), ptr,
                 (order // max(ids.shape[1], 1)).astype(np.int64), np.arange(p, dtype=np.int64) // spg,
                 node.astype(np.int64), w, v, partner_cdf(ids, wt, e), prm)


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
    u, g, n = num_types, num_gpus, num_nodes
    return State(np.zeros(num_experts, np.int64), np.zeros((num_experts, maxc), np.int64),
                 np.zeros((num_experts, g)), np.zeros(g), np.zeros((u, g), np.int32),
                 np.zeros((u, g), np.int32), np.ones((u, g)), np.zeros((u, n), np.int32),
                 np.zeros((u, n), np.int32), np.ones((u, n)))


def make_work(num_experts: int, num_slots: int, num_gpus: int, num_nodes: int, num_types: int,
              probe: int = 256) -> Work:
    maxc = num_slots - num_experts + 1
    g, n = num_gpus, num_nodes
    z = np.zeros
    return Work(z(g, np.int64), z(g), z(n, np.int64), z(n), z(g, np.int64), z(n, np.int64),
                z(g, np.int64), z(g, np.int64), z(g), z(n, np.int64), z(n, np.int64), z(n),
                z(g, np.int64), z(n, np.int64), z(n, np.int64), z(n, np.int64), z(g, np.int64),
                z(num_types, np.int64), z(1, np.int64), z((2, maxc), np.int64), z(2, np.int64),
                z(g), z(g), z(g), z(max(probe, 1)))


@_njit
def expert_contrib(src, row, c, le, G, N, gpn, rule, sg, gn, hold_n, copy_n, mark, out):
    """Add the expected per-GPU load of an expert with copies ``src[row, :c]`` and load ``le``.

    ``hold_n``/``copy_n`` [N] and ``mark`` [G] are zero workspaces (left zero).
    """
    share = le / G
    if rule == 2:
        for j in range(c):
            out[sg[src[row, j]]] += le / c
        return
    holders = 0
    for j in range(c):
        g = sg[src[row, j]]
        n = gn[g]
        copy_n[n] += 1
        if mark[g] == 0:
            mark[g] = 1
            holders += 1
            hold_n[n] += 1
            out[g] += share
    if rule == 0:
        for n in range(N):
            need = gpn - hold_n[n]
            if need > 0:
                if copy_n[n] > 0:
                    add = need * share / copy_n[n]
                    for j in range(c):
                        g = sg[src[row, j]]
                        if gn[g] == n:
                            out[g] += add
                else:
                    add = need * share / c
                    for j in range(c):
                        out[sg[src[row, j]]] += add
    else:
        need = G - holders
        if need > 0:
            add = need * share / c
            for j in range(c):
                out[sg[src[row, j]]] += add
    for j in range(c):
        g = sg[src[row, j]]
        mark[g] = 0
        hold_n[gn[g]] = 0
        copy_n[gn[g]] = 0


@_njit
def _contrib(L, wk, src, row, c, le, out):
    prm = L.prm
    expert_contrib(src, row, c, le, int(prm[0]), int(prm[1]), int(prm[2]), int(prm[7]), L.slot_gpu,
                   L.gpu_node, wk.hold_n, wk.copy_n, wk.mark, out)


@_njit
def _q(c, u, p):
    if c > 0:
        return 1.0
    if u > 0:
        return 1.0 - p
    return 0.0


@_njit
def _tokens(mode, a, b, write, ids, home, wt, tok_ptr, tok_idx, sg, gn, W, V, rule,
            cnt, cslot, olds, oldc, gc, gu, gp, nc, nu, npp,
            og, op, on, opn, gmark, nmark, lc, lu, lp, lnc, lnu, lnp, tgl, tnl, stamp, ticket):
    """Weighted traffic change of token types when expert distributions change.

    ``mode`` 0: a move changed experts ``a`` and ``b`` (old copy lists in ``olds``/``oldc`` rows
    0 and 1, new ones in ``cnt``/``cslot``); the tokens of ``a`` and ``b`` are re-evaluated.
    ``mode`` 1: every token type gets all its experts added to an empty state (build). With
    ``write`` the per-token state is updated. Everything is inline: calls with dozens of array
    arguments cost more than the work per token.
    """
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
                if ha:
                    ent_src[nent] = 0
                    ent_row[nent] = 0
                    ent_sign[nent] = -1
                    ent_src[nent + 1] = 1
                    ent_row[nent + 1] = a
                    ent_sign[nent + 1] = 1
                    nent += 2
                if hb:
                    ent_src[nent] = 0
                    ent_row[nent] = 1
                    ent_sign[nent] = -1
                    ent_src[nent + 1] = 1
                    ent_row[nent + 1] = b
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
                # distribution of this expert for home h
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
                # per node
                kn = 0
                for i in range(m):
                    n = gn[og[i]]
                    found = False
                    for j in range(kn):
                        if on[j] == n:
                            opn[j] += op[i]
                            found = True
                            break
                    if not found:
                        on[kn] = n
                        opn[kn] = op[i]
                        kn += 1
                if kn == 1:
                    opn[0] = 1.0
                # apply to the token's local copy
                for i in range(m):
                    g = og[i]
                    pr = op[i]
                    if gmark[g] != tick:
                        gmark[g] = tick
                        tgl[ng] = g
                        ng += 1
                        lc[g] = gc[t, g]
                        lu[g] = gu[t, g]
                        lp[g] = gp[t, g]
                    if pr >= 1.0:
                        lc[g] += sign
                    else:
                        lu[g] += sign
                        if lu[g] == 0:
                            lp[g] = 1.0
                        elif sign > 0:
                            lp[g] *= 1.0 - pr
                        else:
                            lp[g] /= 1.0 - pr
                for i in range(kn):
                    n = on[i]
                    pr = opn[i]
                    if nmark[n] != tick:
                        nmark[n] = tick
                        tnl[nn] = n
                        nn += 1
                        lnc[n] = nc[t, n]
                        lnu[n] = nu[t, n]
                        lnp[n] = npp[t, n]
                    if pr >= 1.0:
                        lnc[n] += sign
                    else:
                        lnu[n] += sign
                        if lnu[n] == 0:
                            lnp[n] = 1.0
                        elif sign > 0:
                            lnp[n] *= 1.0 - pr
                        else:
                            lnp[n] /= 1.0 - pr
            d = 0.0
            for i in range(ng):
                g = tgl[i]
                w = W[h, g]
                if w != 0.0:
                    d += w * (_q(lc[g], lu[g], lp[g]) - _q(gc[t, g], gu[t, g], gp[t, g]))
                if write:
                    gc[t, g] = lc[g]
                    gu[t, g] = lu[g]
                    gp[t, g] = lp[g]
            for i in range(nn):
                n = tnl[i]
                v = V[h, n]
                if v != 0.0:
                    d += v * (_q(lnc[n], lnu[n], lnp[n]) - _q(nc[t, n], nu[t, n], npp[t, n]))
                if write:
                    nc[t, n] = lnc[n]
                    nu[t, n] = lnu[n]
                    npp[t, n] = lnp[n]
            delta += wt[t] * d
    return delta


@_njit
def _traffic(mode, a, b, write, L, st, wk):
    """:func:`_tokens` on a layer's arrays (returns the weighted traffic change)."""
    return _tokens(mode, a, b, write, L.ids, L.home, L.wt, L.tok_ptr, L.tok_idx, L.slot_gpu, L.gpu_node,
                   L.W, L.V, int(L.prm[7]), st.cnt, st.cslot, wk.olds, wk.oldc, st.gc, st.gu, st.gp,
                   st.nc, st.nu, st.np_, wk.og, wk.op, wk.on, wk.opn, wk.gmark, wk.nmark, wk.lc, wk.lu,
                   wk.lp, wk.lnc, wk.lnu, wk.lnp, wk.tgl, wk.tnl, wk.stamp, wk.ticket)
