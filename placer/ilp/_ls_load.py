"""The load model's kernels (numba): one expert's expected per-GPU load and its variance over
the dispatch rule's deal, the busiest GPU's expected load, and both for whole placements.

:func:`expert_contrib` is what the local search (:mod:`placer.ilp._ls_anneal`) re-evaluates for
the (at most two) experts a move changes; :func:`gpu_load_moments` and :func:`expected_max` score
whole placements once numba's cache holds them (:mod:`placer.ilp.load_model` has their numpy
forms, held equal by property tests, and explains the model).
"""

from __future__ import annotations

import math

import numpy as np

from placer.ilp._ls_kernel import _njit, make_dispatch

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@_njit
def deal_variance(n, s, ss, c, h):
    """Variance of the load a GPU holding ``h`` of ``c`` candidate copies receives when ``n``
    ranks, whose loads sum to ``s`` and their squares to ``ss``, are dealt evenly at random: each
    copy gets ``n // c`` ranks and a random ``n % c`` of the copies one more
    (:func:`placer.metrics.dispatch._fair_into`), which ranks at random. The GPU's count ``M``
    has mean ``h n / c`` and a hypergeometric variance ``h f (1 - f) (c - h) / (c - 1)`` (``f``
    the remainder's share); given ``M`` its load is a sample of ``M`` of the ``n`` loads without
    replacement, variance ``M (n - M) s2 / (n - 1)`` (``s2`` their population variance); plus the
    mean load squared times the count's variance. Arguments as floats (one compiled signature).
    """
    if n <= 0.0 or h <= 0.0 or c <= h:
        return 0.0
    f = n / c - math.floor(n / c)
    vm = h * f * (1.0 - f) * (c - h) / (c - 1.0)
    m = h * n / c
    xb = s / n
    s2 = max(ss / n - xb * xb, 0.0)
    v = xb * xb * vm
    if n > 1.0:
        v += (n * m - m * m - vm) * s2 / (n - 1.0)
    return max(v, 0.0)


@_njit
def expert_contrib(src, row, c, le, rl, nl, sq, nsq, kap, dp, hold_n, copy_n, hold_w, hold_s, mark, out, var):
    """Add the expected per-GPU load of an expert with copies ``src[row, :c]`` and load ``le``,
    of which ``rl`` float [G] starts on each rank (its home tokens) and ``nl`` float [N] on each
    node, to ``out`` [G], and its variance to ``var`` [G]: over the deal (:func:`deal_variance`;
    ``sq`` [G] / ``nsq`` [N] the squares of ``rl`` and their sums per node) and, where ``rl`` is
    estimated from a sample (``kap`` > 0, :func:`placer.ilp.load_model.rank_loads`), the
    estimate's: a GPU taking a share ``w_r`` of each rank's part has ``kap * (sum_r w_r**2 rl[r] -
    (sum_r w_r rl[r])**2 / le)`` (multinomial counts of a fixed total).

    ``dp`` a :class:`Dispatch`; ``hold_n``/``copy_n``/``mark`` int [N]/[N]/[G] and
    ``hold_w``/``hold_s`` float [N] are zero workspaces (left zero).
    """
    G, N, gpn, rule = dp.num_gpus, dp.num_nodes, dp.gpus_per_node, dp.rule
    sg, gn = dp.slot_gpu, dp.gpu_node
    if rule == 2:
        for j in range(c):
            out[sg[src[row, j]]] += le / c
        return
    holders = 0
    held = 0.0
    for j in range(c):
        g = sg[src[row, j]]
        n = gn[g]
        copy_n[n] += 1
        if mark[g] == 0:  # a holder serves its own home tokens
            holders += 1
            hold_n[n] += 1
            hold_w[n] += rl[g]
            hold_s[n] += sq[g]
            held += rl[g]
            out[g] += rl[g]
        mark[g] += 1  # the GPU's copies
    if rule == 0:
        rest_n = 0.0  # the ranks of nodes without a copy, dealt together over all copies
        rest_s = 0.0
        rest_ss = 0.0
        for n in range(N):
            if gpn - hold_n[n] > 0:  # the node's other ranks: over its copies, else over all
                need = max(nl[n] - hold_w[n], 0.0)
                if copy_n[n] > 0:
                    add = need / copy_n[n]
                    for j in range(c):
                        g = sg[src[row, j]]
                        if gn[g] == n:
                            out[g] += add
                else:
                    add = need / c
                    for j in range(c):
                        out[sg[src[row, j]]] += add
                    rest_n += gpn
                    rest_s += need
                    rest_ss += max(nsq[n] - hold_s[n], 0.0)
        for j in range(c):  # the variance, once per GPU (mark: its copies; negated when done)
            g = sg[src[row, j]]
            h = float(mark[g])
            if h <= 0.0:
                continue
            mark[g] = -mark[g]
            n = gn[g]
            need = max(nl[n] - hold_w[n], 0.0)
            local = h / copy_n[n] if gpn - hold_n[n] > 0 else 0.0  # the GPU's share of each dealt rank
            v = deal_variance(float(gpn - hold_n[n]), need, max(nsq[n] - hold_s[n], 0.0), float(copy_n[n]), h)
            if rest_n > 0.0:
                v += deal_variance(rest_n, rest_s, rest_ss, float(c), h)
            if kap > 0.0 and le > 0.0:
                m = rl[g] + local * need + h * rest_s / c
                q = rl[g] + local * local * need + (h / c) * (h / c) * rest_s
                v += kap * max(q - m * m / le, 0.0)
            var[g] += v
    elif G - holders > 0:
        add = max(le - held, 0.0) / c
        for j in range(c):
            out[sg[src[row, j]]] += add
    for j in range(c):
        g = sg[src[row, j]]
        mark[g] = 0
        hold_n[gn[g]] = 0
        copy_n[gn[g]] = 0
        hold_w[gn[g]] = 0.0
        hold_s[gn[g]] = 0.0


@_njit
def expected_max(load, var, scale):
    """Expected busiest-GPU load as time: Clark's (1961) approximation of ``E[max_g X_g]`` for
    independent normals ``X_g`` of mean ``load[g] * scale[g]`` and variance ``var[g] * scale[g]**2``
    (the max of two normals in closed form, moment-matched to a normal, folded over the GPUs in
    order). GPUs more than 5 standard deviations below the largest mean are left out; without
    variance it is the largest mean exactly.
    """
    G = load.shape[0]
    top = load[0] * scale[0]
    for g in range(1, G):
        top = max(top, load[g] * scale[g])
    m = top
    v = -1.0  # nothing folded yet
    for g in range(G):
        s = scale[g]
        mu = load[g] * s
        vg = max(var[g], 0.0) * s * s
        if mu + 5.0 * math.sqrt(vg) < top:
            continue
        if v < 0.0:
            m, v = mu, vg
            continue
        a2 = v + vg
        if a2 <= 0.0:
            if mu > m:
                m = mu
            continue
        a = math.sqrt(a2)
        al = (m - mu) / a
        p1 = 0.5 * math.erfc(-al * _SQRT_HALF)
        p2 = 0.5 * math.erfc(al * _SQRT_HALF)
        ph = math.exp(-0.5 * al * al) * _INV_SQRT_2PI
        e1 = m * p1 + mu * p2 + a * ph
        e2 = (m * m + v) * p1 + (mu * mu + vg) * p2 + (m + mu) * a * ph
        m = e1
        v = max(e2 - e1 * e1, 0.0)
    return m


@_njit
def _gpu_load_moments(p2l, load, rank, node, sq, nsq, noise, dp):
    num_layers, num_slots = p2l.shape
    num_experts = load.shape[1]
    out = np.zeros((num_layers, dp.num_gpus))
    var = np.zeros((num_layers, dp.num_gpus))
    cslot = np.zeros((num_experts, num_slots - num_experts + 1), np.int64)
    cnt = np.zeros(num_experts, np.int64)
    hold_n = np.zeros(dp.num_nodes, np.int64)
    copy_n = np.zeros(dp.num_nodes, np.int64)
    hold_w = np.zeros(dp.num_nodes)
    hold_s = np.zeros(dp.num_nodes)
    mark = np.zeros(dp.num_gpus, np.int64)
    for layer in range(num_layers):
        cnt[:] = 0
        for p in range(num_slots):
            e = p2l[layer, p]
            cslot[e, cnt[e]] = p
            cnt[e] += 1
        for e in range(num_experts):
            expert_contrib(cslot, e, cnt[e], load[layer, e], rank[layer, e], node[layer, e], sq[layer, e],
                           nsq[layer, e], noise[layer, e], dp, hold_n, copy_n, hold_w, hold_s, mark, out[layer],
                           var[layer])
    return out, var


def gpu_load_moments(p2l: np.ndarray, load: np.ndarray, num_gpus: int, num_nodes: int, gpus_per_node: int,
                     slots_per_gpu: int, rule: str, rank_load: np.ndarray | None = None,
                     rank_sq: np.ndarray | None = None,
                     noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-GPU load [L, G] expected over the rule's random fair spread, each expert's tokens
    starting on the ranks ``rank_load`` float [L, E, G] gives (default: uniform over the ranks),
    and its variance [L, G]: over the spread (``rank_sq`` [L, E, G], default ``rank_load ** 2``:
    :func:`deal_variance`) and of ``rank_load``'s estimate (``noise`` [L,
    E], default 0: :func:`placer.ilp.load_model.rank_loads`).

    With uniform home ranks the load equals :func:`placer.metrics.dispatch.slot_load` summed per GPU
    whenever the rule makes no random choice (e.g. no replicas; always for ``vllm``), and its
    mean over dispatch seeds otherwise.
    """
    def own(a):  # C-contiguous and writable: one compiled signature (shares are read-only)
        return np.require(a, np.float64, ("C", "W"))

    p2l = np.require(p2l, np.int64, ("C", "W"))
    load = own(load)
    dp = make_dispatch(rule, num_gpus, num_nodes, gpus_per_node, slots_per_gpu, p2l.shape[1])
    rank = np.repeat(load[:, :, None] / num_gpus, num_gpus, axis=2) if rank_load is None else own(rank_load)
    sq = rank * rank if rank_sq is None else own(rank_sq)
    shape = (*load.shape, num_nodes, gpus_per_node)
    node = np.ascontiguousarray(rank.reshape(shape).sum(axis=3))
    nsq = np.ascontiguousarray(sq.reshape(shape).sum(axis=3))
    kap = np.zeros(load.shape) if noise is None else own(noise)
    return _gpu_load_moments(p2l, load, rank, node, sq, nsq, kap, dp)

