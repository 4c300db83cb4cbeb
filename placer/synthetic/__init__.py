"""Deterministic synthetic routing traces for any :class:`~placer.types.ModelSpec` shape.

The generator is a small "model" of a router:

- every MoE layer ``l`` has base expert popularities ``p_l = softmax(sigma_l * z_l)`` (lognormal
  popularity; ``sigma_l`` is the profile's ``skew`` with some per-layer spread);
- every layer's experts fall into clusters of ``m = num_successors``; the *favoured successors*
  of expert ``i`` at layer ``l`` are the members of its cluster at layer ``l + 1`` (so experts
  that share a cluster share successors, and a token's expert set keeps its cluster from layer
  to layer); a token draws its layer-``l + 1`` experts from the mixture
  ``q(j) = (1 - a_l) p_{l+1}(j) + a_l s_src(j)``, where ``a_l`` is the profile's ``affinity``,
  ``s_src`` the successor weights of a source expert of layer ``l``: its top-1 with probability
  ``source_top1``, else one of its K experts by gate weight;
- a token's K experts are K draws from ``q`` without replacement (Plackett-Luce), so column 0 is
  the first draw, the top-1 expert; gate weights are descending and sum to 1 per token-layer;
- group-limited models (DeepSeek-V3: ``num_groups > 1`` and ``topk_groups < num_groups``) keep
  each token's experts inside ``topk_groups`` groups: the groups of its first draws, later draws
  in other groups are rejected (groups are ``E / num_groups`` consecutive experts); their
  clusters span ``max(1, topk_groups // 2)`` groups;
- ``drift`` rotates the popularity logits slowly along the token stream.

The "model" (popularities, successors, drift directions) is drawn from the profile's
``structure_seed``; :func:`synthesize`'s ``seed`` only draws tokens. Fit a solver on ``seed=0``
and score it on ``seed=1`` with ``perturbed(profile, amount, seed)``: same successor structure,
popularities multiplied by lognormal noise of sigma ``amount``.

Every token's random stream is keyed by ``(seed, phase, absolute token index)``, so the
concatenated output does not depend on ``chunk_tokens``. Sampling runs in a numba kernel
(rejection sampling with an alias table per layer, O(1) per draw); without numba the same
kernel runs as plain Python, with identical output, slowly.

Per-preset knob values are pinned in :data:`PRESET_PROFILES`; run
``benchmarks/calibrate_synthetic.py`` to compare them with the real traces in ``shared/data``.
The knobs, their pinned values and the calibration figures live in :mod:`placer.synthetic.profiles`
(re-exported here).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import numpy as np

from placer._numba import HAVE_NUMBA
from placer._numba import njit as _njit
from placer.errors import InvalidInputError
from placer.resources import check_memory
from placer.synthetic.profiles import (
    PRESET_PROFILES,
    SCORING_PERTURBATION,
    SyntheticProfile,
    perturbed,
    profile_for,
    routing_figures,
    structure_shape,
)
from placer.types import PHASE_CODES, ModelSpec, RoutingTrace

__all__ = [
    "DRIFT_BLOCK", "PRESET_PROFILES", "SCORING_PERTURBATION", "SyntheticProfile", "perturbed",
    "profile_for", "routing_figures", "synthesize", "synthesize_trace",
]

DRIFT_BLOCK = 4096
"""Tokens per drift epoch: popularities are constant inside ``[e * DRIFT_BLOCK, (e+1) * DRIFT_BLOCK)``."""


# --------------------------------------------------------------------------------------------
# Structure (the synthetic "model")
# --------------------------------------------------------------------------------------------


class _Structure:
    """Popularity logits, successor tables and per-epoch alias tables of one (shape, profile)."""

    def __init__(self, shape: tuple[int, ...], profile: SyntheticProfile):
        num_layers, e, k, num_groups, topk_groups = shape
        rng = np.random.default_rng(np.random.SeedSequence(
            [profile.structure_seed & 0xFFFFFFFF, num_layers, e, k, num_groups, topk_groups, 0x5E7]))
        sigma = profile.skew * np.exp(profile.skew_spread * rng.standard_normal(num_layers))
        z = rng.standard_normal((num_layers, e))
        self.logits = sigma[:, None] * z
        self.drift_dirs = rng.standard_normal((2, num_layers, e))
        aff = profile.affinity * np.exp(profile.affinity_spread * rng.standard_normal(num_layers))
        aff = np.minimum(aff, 0.95)
        aff[0] = 0.0
        self.affinity = np.ascontiguousarray(aff)
        # Favoured successors: each layer's experts fall into C = E // m clusters of m (the
        # E % m left over join no cluster); the successors of expert i at layer l - 1 are the
        # members of i's cluster at layer l, ordered by a Gumbel key ~ p_l ** successor_bias.
        # Group-limited models learn co-activation under the limit: there a cluster's members
        # come from max(1, topk_groups // 2) groups (consecutive slices of interleaved groups).
        self.group_limit = bool(profile.group_limited and num_groups > 1 and topk_groups < num_groups)
        span = max(1, topk_groups // 2) if self.group_limit else 0
        if span and num_groups % span:
            span = 1
        m = min(profile.num_successors, e)
        c = e // m
        succ = np.zeros((num_layers, e, m), np.int32)
        prev_cluster = np.zeros(e, np.int64)
        for layer in range(num_layers):
            if span:
                gperm = rng.permutation(num_groups).reshape(-1, span)
                inside = rng.permuted(np.arange(e).reshape(num_groups, e // num_groups), axis=1)
                perm = inside[gperm].transpose(0, 2, 1).ravel()
            else:
                perm = rng.permutation(e)
            members = perm[: c * m].reshape(c, m)
            keys = profile.successor_bias * self.logits[layer][members] + rng.gumbel(size=(c, m))
            members = np.take_along_axis(members, np.argsort(-keys, axis=1, kind="stable"), axis=1)
            if layer > 0:
                succ[layer] = members[prev_cluster]
            prev_cluster = np.empty(e, np.int64)
            prev_cluster[perm[: c * m]] = np.repeat(np.arange(c), m)
            prev_cluster[perm[c * m:]] = rng.integers(0, c, e - c * m)
        self.successors = succ
        w = profile.successor_decay ** np.arange(m, dtype=np.float64)
        w /= w.sum()
        self.succ_weights = w
        self.succ_cdf = np.cumsum(w)
        self.succ_cdf[-1] = 1.0
        self.source_top1 = profile.source_top1
        if profile.perturb_sigma > 0:
            prng = np.random.default_rng(np.random.SeedSequence(
                [profile.perturb_seed & 0xFFFFFFFF, num_layers, e, 0x9E7]))
            self.logits = self.logits + profile.perturb_sigma * prng.standard_normal((num_layers, e))
        self.drift = profile.drift
        self.drift_period = profile.drift_period
        self.group_size = e // num_groups
        self.num_groups = num_groups
        self.topk_groups = topk_groups
        if self.group_limit and self.group_size * topk_groups < k:
            raise InvalidInputError(f"group limit {topk_groups} of {num_groups} groups leaves "
                                    f"{self.group_size * topk_groups} experts for top_k={k}", source="model")
        self.gate_ratio_low = profile.gate_ratio_low
        self._tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def epoch_of(self, token: int) -> int:
        return token // DRIFT_BLOCK if self.drift > 0 else 0

    def tables(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Base probabilities and alias tables ``(prob [L, E], alias_p [L, E], alias_i [L, E])``."""
        hit = self._tables.get(epoch)
        if hit is not None:
            return hit
        logits = self.logits
        if self.drift > 0:
            phi = 2.0 * math.pi * (epoch + 0.5) * DRIFT_BLOCK / self.drift_period
            logits = logits + self.drift * (math.cos(phi) * self.drift_dirs[0]
                                            + math.sin(phi) * self.drift_dirs[1])
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        alias_p = np.empty_like(p)
        alias_i = np.empty(p.shape, np.int32)
        for layer in range(p.shape[0]):
            _build_alias(p[layer], alias_p[layer], alias_i[layer])
        out = (np.ascontiguousarray(p), alias_p, alias_i)
        if len(self._tables) >= 4:
            self._tables.pop(next(iter(self._tables)))
        self._tables[epoch] = out
        return out


@functools.lru_cache(maxsize=8)
def _structure(shape: tuple[int, ...], profile: SyntheticProfile) -> _Structure:
    return _Structure(shape, profile)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S11, _S27, _S30, _S31 = np.uint64(11), np.uint64(27), np.uint64(30), np.uint64(31)
_INV53 = 1.0 / 9007199254740992.0


@_njit
def _mix(z):
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@_njit
def _uniform(state):
    """splitmix64 step: (new state, uniform double in [0, 1))."""
    state = state + _GOLDEN
    return state, float(_mix(state) >> _S11) * _INV53


@_njit
def _build_alias(p, alias_p, alias_i):
    """Vose's alias table of the distribution ``p`` (sums to 1)."""
    n = p.shape[0]
    scaled = p * n
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    ns = 0
    nl = 0
    for i in range(n):
        alias_i[i] = i
        alias_p[i] = 1.0
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        g = large[nl - 1]
        alias_p[s] = scaled[s]
        alias_i[s] = g
        scaled[g] = (scaled[g] + scaled[s]) - 1.0
        if scaled[g] < 1.0:
            nl -= 1
            small[ns] = g
            ns += 1


@_njit
def _sample(t0, key, prob, alias_p, alias_i, successors, succ_cdf, succ_w, affinity, source_top1,
            group_limit, group_size, topk_groups, gate_low, out_ids, out_w):
    """Fill ``out_ids`` / ``out_w`` [n, L, K] with tokens ``t0 .. t0 + n - 1``."""
    n, num_layers, k = out_ids.shape
    e = prob.shape[1]
    m = successors.shape[2]
    num_groups = e // group_size
    seen = np.zeros(e, np.int64)
    gseen = np.zeros(num_groups, np.int64)
    q = np.empty(e, np.float64)
    prev_cdf = np.empty(k, np.float64)
    stamp = 0
    max_draws = 32 + 16 * k
    for t in range(n):
        state = _mix(key ^ (np.uint64(t0 + t) * _GOLDEN))
        for layer in range(num_layers):
            stamp += 1
            a = affinity[layer] if layer > 0 else 0.0
            if layer > 0:  # successor sources: the previous top-1, else experts by gate weight
                acc = 0.0
                for r in range(k):
                    acc += (1.0 - source_top1) * out_w[t, layer - 1, r]
                    if r == 0:
                        acc += source_top1
                    prev_cdf[r] = acc
                prev_cdf[k - 1] = 2.0
            got = 0
            gused = 0
            draws = 0
            while got < k:
                if draws < max_draws:
                    draws += 1
                    state, u = _uniform(state)
                    if u < a:
                        v = u / a
                        src = 0
                        while v >= prev_cdf[src]:
                            src += 1
                        state, v = _uniform(state)
                        r = 0
                        while r < m - 1 and v >= succ_cdf[r]:
                            r += 1
                        j = successors[layer, out_ids[t, layer - 1, src], r]
                    else:
                        x = (u - a) / (1.0 - a) * e
                        c = int(x)
                        if c >= e:
                            c = e - 1
                        j = c if x - c < alias_p[layer, c] else alias_i[layer, c]
                    if seen[j] == stamp:
                        continue
                    if group_limit:
                        g = j // group_size
                        if gseen[g] != stamp:
                            if gused >= topk_groups:
                                continue
                            gseen[g] = stamp
                            gused += 1
                else:
                    # Rare: an exact draw from q restricted to the eligible experts.
                    full = group_limit and gused >= topk_groups
                    for c in range(e):
                        q[c] = (1.0 - a) * prob[layer, c]
                    if layer > 0:
                        for src in range(k):
                            ws = (1.0 - source_top1) * out_w[t, layer - 1, src]
                            if src == 0:
                                ws += source_top1
                            for r in range(m):
                                q[successors[layer, out_ids[t, layer - 1, src], r]] += a * ws * succ_w[r]
                    total = 0.0
                    count = 0
                    for c in range(e):
                        if seen[c] == stamp or (full and gseen[c // group_size] != stamp):
                            q[c] = -1.0
                        else:
                            total += q[c]
                            count += 1
                    state, u = _uniform(state)
                    target = u * total
                    pick = int(u * count)
                    j = -1
                    acc = 0.0
                    idx = 0
                    for c in range(e):
                        if q[c] < 0.0:
                            continue
                        j = c
                        if total > 0.0:
                            acc += q[c]
                            if acc > target:
                                break
                        elif idx == pick:
                            break
                        idx += 1
                    if group_limit:
                        g = j // group_size
                        if gseen[g] != stamp:
                            gseen[g] = stamp
                            gused += 1
                seen[j] = stamp
                out_ids[t, layer, got] = j
                got += 1
            w = 1.0
            total_w = 0.0
            for r in range(k):
                out_w[t, layer, r] = w
                total_w += w
                state, u = _uniform(state)
                w *= gate_low + (1.0 - gate_low) * u
            for r in range(k):
                out_w[t, layer, r] = out_w[t, layer, r] / total_w


def _stream_key(seed: int, phase_code: int) -> np.uint64:
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, phase_code + 2, 0x7A5])
    return np.uint64(ss.generate_state(1, np.uint64)[0])


def _fill(st: _Structure, key: np.uint64, start: int, ids: np.ndarray, w: np.ndarray) -> None:
    """Tokens ``start .. start + len(ids) - 1`` into ``ids`` / ``w``, split at drift epochs."""
    n = ids.shape[0]
    pos = 0
    while pos < n:
        epoch = st.epoch_of(start + pos)
        end = n if st.drift <= 0 else min(n, (epoch + 1) * DRIFT_BLOCK - start)
        prob, alias_p, alias_i = st.tables(epoch)
        args = (np.int64(start + pos), key, prob, alias_p, alias_i, st.successors, st.succ_cdf,
                st.succ_weights, st.affinity, float(st.source_top1), st.group_limit, np.int64(st.group_size),
                np.int64(st.topk_groups), float(st.gate_ratio_low), ids[pos:end], w[pos:end])
        if HAVE_NUMBA:
            _sample(*args)
        else:  # pragma: no cover
            with np.errstate(over="ignore"):
                _sample(*args)
        pos = end


def _prepare(model: ModelSpec, num_tokens: int, seed: int, profile: SyntheticProfile | None,
             phase: str | None) -> tuple[_Structure, np.uint64, int | None]:
    if not isinstance(model, ModelSpec):
        raise InvalidInputError(f"expected a ModelSpec, got {type(model).__name__}", source="model")
    if num_tokens < 0:
        raise InvalidInputError(f"num_tokens must be >= 0, got {num_tokens}", source="num_tokens")
    code = None
    if phase is not None:
        if phase not in PHASE_CODES:
            raise InvalidInputError(f"unknown phase {phase!r}; known: {', '.join(PHASE_CODES)}",
                                    source="phase")
        code = PHASE_CODES[phase]
    prof = profile if profile is not None else profile_for(model)
    if not isinstance(prof, SyntheticProfile):
        raise InvalidInputError(f"expected a SyntheticProfile, got {type(prof).__name__}", source="profile")
    st = _structure(structure_shape(model), prof)
    return st, _stream_key(seed, -2 if code is None else code), code


def _make_trace(model: ModelSpec, ids: np.ndarray, w: np.ndarray, code: int | None) -> RoutingTrace:
    phase = None if code is None else np.full(ids.shape[0], code, np.int8)
    return RoutingTrace(ids, model.num_experts, "sorted", gate_weights=w, phase=phase, model=model)


def synthesize(model: ModelSpec, num_tokens: int, *, seed: int = 0,
               profile: SyntheticProfile | None = None, chunk_tokens: int = 65536,
               phase: str | None = None) -> Iterator[RoutingTrace]:
    """Stream ``num_tokens`` synthetic tokens of ``model`` as chunks of ``chunk_tokens``.

    The concatenation does not depend on ``chunk_tokens``. ``phase`` ("prefill", "decode",
    "unknown") fills every chunk's phase codes and keys its own token stream (a prefill and a
    decode stream of one seed are different tokens); ``None`` leaves the phase out. Chunks are
    sorted-order traces with gate weights and ``model`` attached.
    """
    if chunk_tokens < 1:
        raise InvalidInputError(f"chunk_tokens must be >= 1, got {chunk_tokens}", source="chunk_tokens")
    st, key, code = _prepare(model, num_tokens, seed, profile, phase)
    shape = (model.num_moe_layers, model.top_k)

    def chunks() -> Iterator[RoutingTrace]:
        for start in range(0, num_tokens, chunk_tokens):
            n = min(chunk_tokens, num_tokens - start)
            ids = np.empty((n, *shape), np.int16)
            w = np.empty((n, *shape), np.float32)
            _fill(st, key, start, ids, w)
            yield _make_trace(model, ids, w, code)
    return chunks()


def check_trace_memory(model: ModelSpec, num_tokens: int, *, copies: int = 1,
                       source: str = "num_tokens") -> None:
    """Refuse (naming ``source``) a synthetic trace held in memory that does not fit the memory available.

    A token takes ``layers x top_k`` int16 ids and float32 gate weights; ``copies`` of the
    trace are alive at once.
    """
    nbytes = float(num_tokens) * model.num_moe_layers * model.top_k * (2 + 4) * copies
    check_memory(source, nbytes, f"{num_tokens:,} tokens of {model.name} in memory need about")


def synthesize_trace(model: ModelSpec, num_tokens: int, *, seed: int = 0,
                     profile: SyntheticProfile | None = None, phase: str | None = None) -> RoutingTrace:
    """All of :func:`synthesize`'s tokens in one trace (identical to the concatenated chunks)."""
    st, key, code = _prepare(model, num_tokens, seed, profile, phase)
    check_trace_memory(model, num_tokens)
    ids = np.empty((num_tokens, model.num_moe_layers, model.top_k), np.int16)
    w = np.empty(ids.shape, np.float32)
    _fill(st, key, 0, ids, w)
    return _make_trace(model, ids, w, code)

