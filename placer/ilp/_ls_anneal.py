"""Annealing driver kernels of the ``placer`` local search (one layer; see :mod:`._ls_kernel`).

:func:`init_state` builds a layer's incremental state from a slot map; :func:`anneal` runs
simulated annealing iterations with incremental deltas; :func:`token_counts_direct` is the
from-scratch reference of the per-token expected sends (tests). The load terms come from
:mod:`placer.ilp._ls_load` (:func:`_contrib` per changed expert, the expected busiest GPU).
"""

from __future__ import annotations

import math

import numpy as np

from placer.ilp._ls_kernel import _njit, _traffic
from placer.ilp._ls_load import expected_max, expert_contrib


@_njit
def _contrib(L, wk, src, row, c, le, out, var):
    expert_contrib(src, row, c, le, L.rank_load[row], L.node_load[row], L.rank_sq[row], L.node_sq[row],
                   L.noise[row], L.dispatch, wk.hold_n, wk.copy_n, wk.hold_w, wk.hold_s, wk.mark, out, var)


@_njit
def load_terms(gload, gvar, scale):
    """(expected max, std) of the GPUs' load as time, ``gload * scale`` (``scale``:
    Dispatch.time_scale), the max over the deal's variance ``gvar`` (:func:`expected_max`), the
    std of the expected loads."""
    G = gload.shape[0]
    s = 0.0
    for g in range(G):
        s += gload[g] * scale[g]
    mean = s / G
    v = 0.0
    for g in range(G):
        d = gload[g] * scale[g] - mean
        v += d * d
    return expected_max(gload, gvar, scale), math.sqrt(v / G)


@_njit
def energy(mx, sd, traffic, w):
    """(primary, energy) of a layer state under the :class:`~placer.ilp._ls_kernel.Weights` ``w``."""
    primary = w.w_bal * mx + traffic + w.pen * max(0.0, mx - w.cap)
    return primary, primary + w.lam * w.w_bal * sd


@_njit
def init_state(p2l, L, st, wk):
    """Build ``st`` from the slot map ``p2l``; returns (traffic, maxload, std).

    ``traffic`` includes the movement term (``L.move_cost`` summed over the (GPU, expert) pairs
    held; 0 without one)."""
    E = L.num_experts
    P = L.num_slots
    cnt, cslot = st.cnt, st.cslot
    for e in range(E):
        cnt[e] = 0
    for p in range(P):
        e = p2l[p]
        cslot[e, cnt[e]] = p
        cnt[e] += 1
    gload, contrib, gvar, cvar = st.gload, st.contrib, st.gvar, st.cvar
    gload[:] = 0.0
    gvar[:] = 0.0
    for e in range(E):
        contrib[e, :] = 0.0
        cvar[e, :] = 0.0
        _contrib(L, wk, cslot, e, cnt[e], L.load[e], contrib[e], cvar[e])
        for g in range(gload.shape[0]):
            gload[g] += contrib[e, g]
            gvar[g] += cvar[e, g]
    st.rc[:] = 0
    st.ru[:] = 0
    st.rp[:] = 1.0
    traffic = _traffic(np.int64(1), np.int64(0), np.int64(0), np.bool_(True), L, st, wk)  # typed args, not literals: one compilation
    hold = st.hold
    hold[:, :] = 0
    sg = L.dispatch.slot_gpu
    for p in range(P):
        g = sg[p]
        e = p2l[p]
        if hold[g, e] == 0:
            traffic += L.move_cost[g, e]
        hold[g, e] += 1
    mx, sd = load_terms(gload, gvar, L.dispatch.time_scale)
    return traffic, mx, sd


@_njit
def _move_delta(L, hold, p1, a, b, g2, swap):
    """Change of the movement term when slot ``p1`` (expert ``a``) takes ``b`` and, for a swap,
    the slot on GPU ``g2`` (expert ``b``) takes ``a``."""
    mc = L.move_cost
    g1 = L.dispatch.slot_gpu[p1]
    d = 0.0
    if hold[g1, a] == 1:
        d -= mc[g1, a]
    if hold[g1, b] == 0:
        d += mc[g1, b]
    if swap:
        if hold[g2, b] == 1:
            d -= mc[g2, b]
        if hold[g2, a] == 0:
            d += mc[g2, a]
    return d


@_njit
def _remove(e, p, cnt, cslot):
    c = cnt[e]
    for j in range(c):
        if cslot[e, j] == p:
            cslot[e, j] = cslot[e, c - 1]
            break
    cnt[e] = c - 1


@_njit
def _replace(e, old, new, cnt, cslot):
    for j in range(cnt[e]):
        if cslot[e, j] == old:
            cslot[e, j] = new
            return


@_njit
def anneal(it0, it1, total, rand, temp0, temp_ratio, p_swap, p_guided, p2l, best_p2l, L, st, wk,
           score):
    """Simulated annealing iterations ``it0..it1-1`` of ``total`` (geometric cooling).

    Moves: with probability ``p_swap`` a uniform swap of two slots on different GPUs, with
    ``p_guided`` a swap that brings a slot's expert into the node of a co-activated partner
    (drawn from ``L.cdf``; onto the partner's GPU when the cluster is one NVLink domain), else a redundant slot moves to another expert (uniform, or a partner
    of an expert of the slot's node). ``rand`` float64 [total, 6] uniforms; ``score`` float64
    [6]: traffic, maxload, std, energy, best primary, best energy (read and updated). ``best_p2l`` receives the best state by
    primary (energy breaks ties). ``temp0 < 0`` is probe mode: moves are evaluated, none is
    applied, the positive energy changes go to ``wk.pbuf`` and their count is returned (else
    the accepted count). The traffic in ``score`` includes the movement term (:func:`init_state`).
    """
    G = L.dispatch.num_gpus
    E = L.num_experts
    P = L.num_slots
    wts = L.weights
    sg = L.dispatch.slot_gpu
    cnt, cslot, contrib, gload, cvar, gvar = st.cnt, st.cslot, st.contrib, st.gload, st.cvar, st.gvar
    ca, cb, newload, va, vb, newvar = wk.ca, wk.cb, wk.newload, wk.va, wk.vb, wk.newvar
    probe = temp0 < 0.0
    traffic = score[0]
    en = score[3]
    accepted = 0
    pos_n = 0
    S = L.slots_per_node
    spg = P // G
    one_node = L.dispatch.num_nodes == 1
    gn = L.dispatch.gpu_node
    cdf = L.cdf
    distinct = L.distinct
    has_traffic = wts.w_nv != 0.0 or wts.w_rdma != 0.0
    has_move = L.has_move
    hold = st.hold
    for it in range(it0, it1):
        r = rand[it]
        kind = 0 if r[0] < p_swap else (1 if r[0] < p_swap + p_guided else 2)
        p1 = min(int(r[1] * P), P - 1)
        a = p2l[p1]
        p2 = p1
        swap = kind != 2
        if kind == 0:
            p2 = min(int(r[2] * P), P - 1)
        elif kind == 1:
            # guided swap: move a next to (a copy of) a partner f drawn by co-activation
            f = min(np.searchsorted(cdf[a], r[2], side="right"), E - 1)
            if f == a:
                continue
            pf = cslot[f, min(int(r[4] * cnt[f]), cnt[f] - 1)]
            if one_node:  # one NVLink domain: next to the partner on its GPU
                p2 = sg[pf] * spg + min(int(r[5] * spg), spg - 1)
            else:
                p2 = gn[sg[pf]] * S + min(int(r[5] * S), S - 1)
        if swap:
            b = p2l[p2]
            if sg[p1] == sg[p2] or a == b:
                continue
            if distinct and (_holds(cslot, cnt, a, sg[p2], sg) or _holds(cslot, cnt, b, sg[p1], sg)):
                continue
        else:
            if cnt[a] < 2:
                continue
            if r[4] < 0.5:
                b = min(int(r[2] * E), E - 1)
            else:
                # guided re-replication: a partner of an expert of the slot's node
                p3 = gn[sg[p1]] * S + min(int(r[5] * S), S - 1)
                x = p2l[p3]
                b = min(np.searchsorted(cdf[x], r[2], side="right"), E - 1)
            if b == a:
                continue
            if distinct and _holds(cslot, cnt, b, sg[p1], sg):
                continue
        ca_n = cnt[a]
        cb_n = cnt[b]
        for j in range(ca_n):
            wk.olds[0, j] = cslot[a, j]
        for j in range(cb_n):
            wk.olds[1, j] = cslot[b, j]
        wk.oldc[0] = ca_n
        wk.oldc[1] = cb_n
        if swap:
            _replace(a, p1, p2, cnt, cslot)
            _replace(b, p2, p1, cnt, cslot)
        else:
            _remove(a, p1, cnt, cslot)
            cslot[b, cnt[b]] = p1
            cnt[b] += 1
        ca[:] = 0.0
        cb[:] = 0.0
        va[:] = 0.0
        vb[:] = 0.0
        _contrib(L, wk, cslot, a, cnt[a], L.load[a], ca, va)
        _contrib(L, wk, cslot, b, cnt[b], L.load[b], cb, vb)
        for g in range(G):
            newload[g] = gload[g] - contrib[a, g] - contrib[b, g] + ca[g] + cb[g]
            newvar[g] = gvar[g] - cvar[a, g] - cvar[b, g] + va[g] + vb[g]
        mx, sd = load_terms(newload, newvar, L.dispatch.time_scale)
        delta = 0.0
        if has_traffic:
            delta = _traffic(np.int64(0), a, b, np.bool_(False), L, st, wk)
        if has_move:
            delta += _move_delta(L, hold, p1, a, b, sg[p2], swap)
        new_traffic = traffic + delta
        primary, new_en = energy(mx, sd, new_traffic, wts)
        d = new_en - en
        if probe:
            if d > 0.0 and pos_n < wk.pbuf.shape[0]:
                wk.pbuf[pos_n] = d
                pos_n += 1
            take = False
        else:
            temp = temp0 * temp_ratio ** ((it % total) / total)
            take = d <= 0.0 or (temp > 0.0 and r[3] < math.exp(-d / temp))
        if take:
            accepted += 1
            if has_traffic:
                _traffic(np.int64(0), a, b, np.bool_(True), L, st, wk)
            p2l[p1] = b
            hold[sg[p1], a] -= 1
            hold[sg[p1], b] += 1
            if swap:
                p2l[p2] = a
                hold[sg[p2], b] -= 1
                hold[sg[p2], a] += 1
            for g in range(G):  # loops, not slice copies: those compile a formatted error (seconds)
                contrib[a, g] = ca[g]
                contrib[b, g] = cb[g]
                gload[g] = newload[g]
                cvar[a, g] = va[g]
                cvar[b, g] = vb[g]
                gvar[g] = newvar[g]
            traffic = new_traffic
            en = new_en
            if primary < score[4] - 1e-12 * abs(score[4]) or (primary <= score[4] and new_en < score[5]):
                score[4] = primary
                score[5] = new_en
                for p in range(P):
                    best_p2l[p] = p2l[p]
        else:
            cnt[a] = ca_n
            cnt[b] = cb_n
            for j in range(ca_n):
                cslot[a, j] = wk.olds[0, j]
            for j in range(cb_n):
                cslot[b, j] = wk.olds[1, j]
    mx, sd = load_terms(gload, gvar, L.dispatch.time_scale)
    score[0] = traffic
    score[1] = mx
    score[2] = sd
    score[3] = en
    if probe:
        return float(pos_n)
    return float(accepted)


@_njit
def _holds(cslot, cnt, e, g, sg):
    """Whether GPU ``g`` holds a copy of expert ``e``."""
    for j in range(cnt[e]):
        if sg[cslot[e, j]] == g:
            return True
    return False


@_njit
def token_counts_direct(t, p2l, L):
    """Reference: expected (nvlink, rdma) sends of token ``t`` computed from scratch (tests)."""
    G = L.dispatch.num_gpus
    N = L.dispatch.num_nodes
    P = L.num_slots
    rule = L.dispatch.rule
    gpn = L.dispatch.gpus_per_node
    sg, gn = L.dispatch.slot_gpu, L.dispatch.gpu_node
    h = L.home[t]
    nh = gn[h]
    gprod = np.ones(G)
    nprod = np.ones(N)
    for k in range(L.ids.shape[1]):
        e = L.ids[t, k]
        gm = np.zeros(G)
        c = 0
        held = False
        local = 0
        for p in range(P):
            if p2l[p] == e:
                c += 1
                g = sg[p]
                held = held or g == h
                if gn[g] == nh:
                    local += 1
        for p in range(P):
            if p2l[p] == e:
                g = sg[p]
                if rule != 2 and held:
                    gm[h] = 1.0
                elif rule == 0 and local > 0:
                    if gn[g] == nh:
                        gm[g] += 1.0 / local
                else:
                    gm[g] += 1.0 / c
        nm = np.zeros(N)
        for g in range(G):
            gprod[g] *= 1.0 - min(gm[g], 1.0)
            nm[gn[g]] += gm[g]
        for n in range(N):
            nprod[n] *= 1.0 - min(nm[n], 1.0)
    nv = 0.0
    for g in range(G):
        if g != h and (gn[g] == nh or g % gpn != h % gpn):
            nv += 1.0 - gprod[g]
    rdma = 0.0
    for n in range(N):
        if n != nh:
            rdma += 1.0 - nprod[n]
    return nv, rdma
