"""The load model of the ``placer`` search, in numpy: expected GPU loads, their variance over the
dispatch rule's random deal, and the expected busiest GPU.

The search kernels (:mod:`placer.ilp._ls_load`, used incrementally by
:mod:`placer.ilp._ls_anneal`) compute the same quantities; these numpy forms score whole placements without compiling
anything (a cold numba cache costs no compile time), and property tests hold the two equal.

- :func:`gpu_load_moments`: per GPU, the load expected over the rule's fair spread and its
  variance. ``nearest`` deals whole ranks to an expert's copies (a random ``n // c`` or ``n // c
  + 1`` of the ``n`` ranks that need one to each of its ``c`` copies), so a copy's load is the sum
  of a random subset of the ranks' loads (:func:`deal_variance`).
- :func:`expected_max`: the busiest GPU's expected load, GPUs as independent normals (Clark's
  approximation). Balancing the expected loads alone leaves many GPUs level and the deal lifts
  the maximum of them: on a 20,000-token Kimi-K2 trace over 128 GPUs in 16 nodes (synthetic),
  the median layer's max/mean over 8 dispatch seeds was 0.018 above the max of the expected
  loads for placer's placement and 0.011 for EPLB's; this model was within 0.003 of both.
- :func:`rank_loads`: each expert's load split over the ranks its tokens start on, as the stats'
  token sample has them, the squares of those parts with the sample's own noise taken out (the
  deal's variance is the spread of the ranks' loads on the whole trace, not on the sample), and
  that noise.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import numpy as np

from placer._numba import cache_holds
from placer.ilp import _ls_load as LK
from placer.ilp._ls_kernel import RULE_CODES
from placer.metrics.dispatch import sample_home_ranks

__all__ = ["RankLoads", "deal_variance", "expected_max", "gpu_load_moments", "moments_numpy", "rank_loads"]

MAX_SIGMAS = 5.0
"""GPUs whose mean is more than this many standard deviations below the largest mean are left
out of :func:`expected_max` (the kernel's cut too)."""
_ERFC = np.frompyfunc(math.erfc, 1, 1)


def deal_variance(n: np.ndarray, s: np.ndarray, ss: np.ndarray, c: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Variance of the load a GPU holding ``h`` of ``c`` candidate copies receives when ``n`` ranks,
    whose loads sum to ``s`` and their squares to ``ss``, are dealt evenly at random (elementwise;
    0 where ``n`` or ``h`` is 0 or ``h >= c``). The numpy form of
    :func:`placer.ilp._ls_load.deal_variance`."""
    n, c, h = (np.asarray(x, np.float64) for x in (n, c, h))
    ok = (n > 0) & (h > 0) & (c > h)
    nn, cc, hh = np.where(ok, n, 1.0), np.where(ok, c, 2.0), np.where(ok, h, 1.0)
    f = nn / cc - np.floor(nn / cc)
    vm = hh * f * (1.0 - f) * (cc - hh) / (cc - 1.0)  # the GPU's count's variance
    m = hh * nn / cc
    xb = s / nn
    s2 = np.maximum(ss / nn - xb * xb, 0.0)
    v = xb * xb * vm + np.where(nn > 1, (nn * m - m * m - vm) * s2 / np.maximum(nn - 1.0, 1.0), 0.0)
    return np.where(ok, np.maximum(v, 0.0), 0.0)


def gpu_load_moments(p2l: np.ndarray, load: np.ndarray, num_gpus: int, num_nodes: int, gpus_per_node: int,
                     slots_per_gpu: int, rule: str, rank_load: np.ndarray | None = None,
                     rank_sq: np.ndarray | None = None,
                     noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-GPU load [L, G] expected over the rule's random fair spread, and its variance [L, G]
    over the deal and, with ``noise`` [L, E] (:func:`rank_loads`; default 0), of the estimate
    (:func:`moments_numpy`): compiled (:func:`placer.ilp._ls_load.gpu_load_moments`, about 20
    times faster on DeepSeek-V3's shape) once numba's cache holds the kernel, else in numpy, so
    that a cold cache compiles nothing inside a solve's time limit."""
    if cache_holds(LK._gpu_load_moments):
        return LK.gpu_load_moments(p2l, load, num_gpus, num_nodes, gpus_per_node, slots_per_gpu, rule, rank_load,
                                  rank_sq, noise)
    return moments_numpy(p2l, load, num_gpus, num_nodes, gpus_per_node, slots_per_gpu, rule, rank_load, rank_sq,
                         noise)


def moments_numpy(p2l: np.ndarray, load: np.ndarray, num_gpus: int, num_nodes: int, gpus_per_node: int,
                  slots_per_gpu: int, rule: str, rank_load: np.ndarray | None = None,
                  rank_sq: np.ndarray | None = None,
                  noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gpu_load_moments` in numpy.

    ``p2l`` int [L, P], ``load`` [L, E] token-slots per expert, ``rank_load`` [L, E, G] the part
    of it whose tokens start on each rank (:func:`rank_loads`; default ``load / G`` on every
    rank), ``rank_sq`` [L, E, G] the squares of those parts (:func:`rank_loads`; default
    ``rank_load ** 2``). Each GPU holding an expert serves its own home tokens of it from a local
    copy; the other ranks' tokens spread over copies: ``nearest``/``sglang-static`` first over
    the copies in the home node (the node's other ranks dealt to them), the ranks of nodes
    without a copy dealt over all copies together; the position rules (``rule`` code 2) evenly
    over all copies, without variance (averaged over rows). Equal to the kernel (property test).
    """
    code = RULE_CODES[rule]
    p2l = np.asarray(p2l, dtype=np.int64)
    load = np.asarray(load, dtype=np.float64)
    num_layers, num_slots = p2l.shape
    num_experts = load.shape[1]
    g, n, gpn = num_gpus, num_nodes, gpus_per_node
    slot_gpu = np.arange(num_slots) // slots_per_gpu
    copies = np.zeros((num_layers, num_experts, g))  # copies of each expert per GPU
    np.add.at(copies, (np.arange(num_layers)[:, None], p2l, slot_gpu[None, :]), 1.0)
    total = copies.sum(axis=2, keepdims=True)  # c: copies of the expert
    per_copy = np.divide(load[:, :, None], total, out=np.zeros_like(total), where=total > 0)
    if code == 2:
        return (copies * per_copy).sum(axis=1), np.zeros((num_layers, g))
    share = (np.broadcast_to((load / g)[:, :, None], copies.shape) if rank_load is None
             else np.asarray(rank_load, dtype=np.float64))  # each rank's home tokens of the expert
    sq = share * share if rank_sq is None else np.asarray(rank_sq, dtype=np.float64)
    holds = copies > 0
    assert code == 0, rule  # the kernel's only other code
    out = np.where(holds, share, 0.0)
    by_node = copies.reshape(num_layers, num_experts, n, gpn)
    copy_n = by_node.sum(axis=3)  # [L, E, N]
    ranks_n = gpn - holds.reshape(num_layers, num_experts, n, gpn).sum(axis=3)  # ranks without a copy
    need = np.where(holds, 0.0, share).reshape(num_layers, num_experts, n, gpn).sum(axis=3)  # non-holders' load
    need_sq = np.maximum(np.where(holds, 0.0, sq).reshape(num_layers, num_experts, n, gpn).sum(axis=3), 0.0)
    local = np.divide(need, copy_n, out=np.zeros_like(copy_n), where=copy_n > 0)
    out += (by_node * local[:, :, :, None]).reshape(num_layers, num_experts, g)
    none = copy_n == 0  # nodes without a copy
    spill = (need * none).sum(axis=2, keepdims=True)
    out += copies * np.divide(spill, total, out=np.zeros_like(total), where=total > 0)

    def per_gpu(x):  # [L, E, N] -> [L, E, G], each GPU its node's
        return np.repeat(x, gpn, axis=2)

    ranks_g, need_g, copy_g = per_gpu(ranks_n), per_gpu(need), per_gpu(copy_n)
    rest = [(x * none).sum(axis=2, keepdims=True) for x in (ranks_n, need_sq)]
    var = (deal_variance(ranks_g, need_g, per_gpu(need_sq), copy_g, copies)
           + deal_variance(rest[0], spill, rest[1], total, copies))
    if noise is not None:  # the estimate's: kap (sum_r w_r**2 x_r - (sum_r w_r x_r)**2 / load)
        in_node = np.divide(copies, copy_g, out=np.zeros_like(copies), where=(ranks_g > 0) & (copy_g > 0))
        to_all = np.divide(copies, total, out=np.zeros_like(copies), where=total > 0)
        m = share + in_node * need_g + to_all * spill
        q = share + in_node * in_node * need_g + to_all * to_all * spill
        le = load[:, :, None]
        est = np.maximum(q - np.divide(m * m, le, out=np.zeros_like(m), where=le > 0), 0.0)
        var += np.where(le > 0, np.asarray(noise, np.float64)[:, :, None] * est, 0.0)
    var = np.where(holds, var, 0.0)
    return out.sum(axis=1), var.sum(axis=1)


def expected_max(load: np.ndarray, var: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Per row, the busiest GPU's expected load as time: Clark's (1961) approximation of
    ``E[max_g X_g]`` for independent normals of mean ``load * scale`` and variance ``var *
    scale**2`` (``load``, ``var`` float [L, G]; ``scale`` [G], default 1), GPUs folded in order,
    those more than :data:`MAX_SIGMAS` below the largest mean left out. Without variance, the
    largest mean exactly. The numpy form of :func:`placer.ilp._ls_load.expected_max`. [L]"""
    s = np.ones(load.shape[1]) if scale is None else np.asarray(scale, np.float64)
    mu = np.asarray(load, np.float64) * s[None, :]
    v_all = np.maximum(np.asarray(var, np.float64), 0.0) * (s * s)[None, :]
    top = mu.max(axis=1)
    keep = mu + MAX_SIGMAS * np.sqrt(v_all) >= top[:, None]
    m, v = top.copy(), np.full(top.shape, -1.0)  # v < 0: nothing folded yet
    for g in range(mu.shape[1]):
        rows = np.flatnonzero(keep[:, g])
        if rows.size == 0:
            continue
        mg, vg = mu[rows, g], v_all[rows, g]
        first = v[rows] < 0.0
        m1, v1 = np.where(first, mg, m[rows]), np.where(first, vg, v[rows])
        a2 = v1 + vg
        fold = ~first & (a2 > 0.0)
        a = np.sqrt(np.where(fold, a2, 1.0))
        al = (m1 - mg) / a
        p1 = 0.5 * _ERFC(-al * math.sqrt(0.5)).astype(np.float64)
        p2 = 0.5 * _ERFC(al * math.sqrt(0.5)).astype(np.float64)
        ph = np.exp(-0.5 * al * al) / math.sqrt(2.0 * math.pi)
        e1 = m1 * p1 + mg * p2 + a * ph
        e2 = (m1 * m1 + v1) * p1 + (mg * mg + vg) * p2 + (m1 + mg) * a * ph
        const = ~first & ~fold  # two constants: the larger
        m[rows] = np.where(fold, e1, np.where(const, np.maximum(m1, mg), m1))
        v[rows] = np.where(fold, np.maximum(e2 - e1 * e1, 0.0), v1)
    return m


class RankLoads(NamedTuple):
    """Each expert's load split over the ranks its tokens start on, from the stats' token sample
    (:func:`rank_loads`)."""

    shares: np.ndarray   # float64 [L, E, G] the parts (they sum to ``stats.load``)
    squares: np.ndarray  # float64 [L, E, G] their squares less the sample's own noise
    noise: np.ndarray    # float64 [L, E] kappa: a part x estimated from the sample varies by kappa * x


_LOADS: dict[int, tuple[weakref.ref, int, RankLoads]] = {}


def rank_loads(stats, num_gpus: int) -> RankLoads | None:
    """:class:`RankLoads` of ``stats`` on ``num_gpus`` ranks; None without a token sample (home
    ranks uniform).

    ``shares``: each expert's load (``stats.load``) split over the ranks in the proportions of the
    sample (home ranks as the metrics take them: the sample's, else round-robin by token index),
    the tokens the traffic terms count; an expert the sample never routes to is spread evenly.
    ``noise``: ``kappa = k - 1`` per expert, ``k = load / count`` (its load over its count in the
    sample): the sample is a random subset of the tokens ``load`` counts, so a part ``x`` estimated
    from it has variance about ``kappa * x`` (0 when the sample is every token). ``squares``:
    ``shares ** 2 - kappa * shares``, whose sum over a set of ranks is unbiased for the whole
    trace's (the deal's variance reads it). The last stats object's are kept (a solve asks once
    per placement it scores).
    """
    if (stats.sample_size == 0 or stats.sample_ids is None or stats.sample_token_index is None
            or stats.sample_home_rank is None):
        return None
    hit = _LOADS.get(id(stats))
    if hit is not None and hit[0]() is stats and hit[1] == num_gpus:
        return hit[2]
    ids = stats.sample_ids.astype(np.int64)  # [S, L, K]
    home = sample_home_ranks(stats, num_gpus)
    num_layers, num_experts = stats.load.shape
    cell = (np.arange(num_layers)[None, :, None] * num_experts + ids) * num_gpus + home[:, None, None]
    counts = np.bincount(cell.ravel(), minlength=num_layers * num_experts * num_gpus).astype(np.float64)
    counts = counts.reshape(num_layers, num_experts, num_gpus)
    seen = counts.sum(axis=2, keepdims=True)
    frac = np.where(seen > 0, counts / np.where(seen > 0, seen, 1.0), 1.0 / num_gpus)
    load = stats.load.astype(np.float64)[:, :, None]
    shares = load * frac
    kappa = np.maximum(np.where(seen > 0, load / np.where(seen > 0, seen, 1.0), 1.0) - 1.0, 0.0)
    out = RankLoads(shares, shares * shares - shares * kappa, np.ascontiguousarray(kappa[:, :, 0]))
    for a in out:
        a.setflags(write=False)
    _LOADS.clear()  # the last stats object only
    _LOADS[id(stats)] = (weakref.ref(stats), num_gpus, out)
    return out

