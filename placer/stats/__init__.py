"""Streaming routing statistics: trace chunks in, :class:`~placer.types.RoutingStats` out.

Memory is bounded by the statistics (``[L, E, E]`` count matrices and a fixed-size reservoir
sample), never by the number of tokens. Builders and results merge; results slice by layer and
filter by phase (each phase is accumulated separately, ``"all"`` merges them).

The reservoir is a bottom-S sample: every token draws a uniform key from the builder's seeded
generator and the S tokens with the smallest keys are kept. Keys are drawn in stream order, so
the sample does not depend on how the stream is cut into chunks, and merging two samples keeps
the S smallest keys of the union.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import numpy as np

from placer.errors import InvalidInputError
from placer.stats import _count as _stats_count
from placer.types import PHASE_CODES, ModelSpec, RoutingStats, RoutingTrace

DEFAULT_SAMPLE_SIZE = 16384
_PHASE_NAMES = {code: name for name, code in PHASE_CODES.items()}


class _Accumulator:
    """Counts of one phase."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, track_top1: bool):
        shape = (num_layers, num_experts)
        self.load = np.zeros(shape, dtype=np.int64)
        self.top1 = np.zeros((num_layers - 1, num_experts, num_experts), np.int64) if track_top1 else None
        self.pairs = np.zeros((num_layers - 1, num_experts, num_experts), np.int64)
        self.coact = np.zeros((num_layers, num_experts, num_experts), np.int64)
        self.num_tokens = 0
        self.sample_ids = np.zeros((0, num_layers, top_k), np.int16)
        self.sample_index = np.zeros(0, np.int64)
        self.sample_home = np.zeros(0, np.int32)
        self.sample_keys = np.zeros(0, np.float64)


class StatsBuilder:
    """Accumulate :class:`RoutingStats` from a stream of trace chunks.

    Parameters
    ----------
    num_layers, num_experts, top_k : int
        L, E, K of every chunk.
    sample_size : int
        S, the reservoir size (0 disables the sample).
    seed : int
        Seeds the reservoir keys.
    model : ModelSpec, optional
        Attached to the results.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *,
                 sample_size: int = DEFAULT_SAMPLE_SIZE, seed: int = 0,
                 model: ModelSpec | None = None):
        if num_layers < 1 or num_experts < 1 or not 1 <= top_k <= num_experts:
            raise InvalidInputError(f"bad shape L={num_layers}, E={num_experts}, K={top_k}", source="stats")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.sample_size = int(sample_size)
        self.model = model
        self._rng = np.random.default_rng(seed)
        self._phases: dict[int, _Accumulator] = {}
        self._top1_known = True
        self._has_phase_info = False
        self._next_index = 0
        self._final = False

    def update(self, trace: RoutingTrace) -> None:
        """Add one chunk; its tokens continue the stream's token index."""
        if self._final:
            raise RuntimeError("StatsBuilder.update after result(final=True)")
        if (trace.num_layers, trace.num_experts, trace.top_k) != (self.num_layers, self.num_experts, self.top_k):
            raise InvalidInputError(
                f"chunk shape L={trace.num_layers}, E={trace.num_experts}, K={trace.top_k} differs from "
                f"L={self.num_layers}, E={self.num_experts}, K={self.top_k}", source="trace")
        n = trace.num_tokens
        if n == 0:
            return
        if not trace.has_top1:
            self._top1_known = False
            for known in self._phases.values():
                known.top1 = None
        ids = trace.sorted_ids() if trace.has_top1 else trace.expert_ids
        index = np.arange(self._next_index, self._next_index + n, dtype=np.int64)
        keys = self._rng.random(n)
        self._next_index += n
        if trace.phase is not None:
            self._has_phase_info = True
            phases = trace.phase
            codes = np.unique(phases)
        else:
            phases, codes = None, np.array([-1])
        home = trace.home_rank.astype(np.int32) if trace.home_rank is not None else np.full(n, -1, np.int32)
        for code in codes:
            sel = slice(None) if phases is None else (phases == code)
            acc = self._phases.get(int(code))
            if acc is None:
                acc = _Accumulator(self.num_layers, self.num_experts, self.top_k, self._top1_known)
                self._phases[int(code)] = acc
            self._add(acc, ids[sel], index[sel], home[sel], keys[sel])

    def _add(self, acc: _Accumulator, ids: np.ndarray, index: np.ndarray, home: np.ndarray,
             keys: np.ndarray) -> None:
        acc.num_tokens += ids.shape[0]
        _stats_count.accumulate(ids, acc.load, acc.top1, acc.pairs, acc.coact)
        if self.sample_size > 0:
            _reservoir_add(acc, ids, index, home, keys, self.sample_size)

    def result(self, phase: str = "all", *, final: bool = False) -> RoutingStats:
        """The statistics of ``phase``: "all", "prefill", "decode" or "unknown".

        ``final``: the builder's count arrays become the result's (no copy) and the builder
        takes no more updates.
        """
        if phase == "all":
            accs = list(self._phases.values())
        else:
            if phase not in PHASE_CODES:
                raise InvalidInputError(f"unknown phase {phase!r}", source="--phase")
            if not self._has_phase_info and phase != "unknown":
                raise InvalidInputError(f"cannot select phase {phase!r}: the input records no phases",
                                        source="--phase")
            accs = [self._phases[c] for c in (PHASE_CODES[phase],) if c in self._phases]
        stats = [_to_stats(a, self.top_k, phase, self.model, self._top1_known, copy=not final) for a in accs]
        if final:
            self._final = True
        if not stats:
            return _to_stats(_Accumulator(self.num_layers, self.num_experts, self.top_k, self._top1_known),
                             self.top_k, phase, self.model, self._top1_known)
        out = merge_stats(stats, sample_size=self.sample_size)
        return out if out.phase == phase else replace(out, phase=phase)


def _reservoir_add(acc: _Accumulator, ids: np.ndarray, index: np.ndarray, home: np.ndarray,
                   keys: np.ndarray, size: int) -> None:
    # Only tokens whose key can enter the bottom-S set matter: prefilter the chunk.
    if len(acc.sample_keys) >= size:
        threshold = acc.sample_keys.max()
        keep = keys < threshold
        ids, index, home, keys = ids[keep], index[keep], home[keep], keys[keep]
    if len(keys) > size:
        part = np.argpartition(keys, size - 1)[:size]
        ids, index, home, keys = ids[part], index[part], home[part], keys[part]
    all_keys = np.concatenate([acc.sample_keys, keys])
    order = np.argsort(all_keys, kind="stable")[:size]
    acc.sample_ids = np.concatenate([acc.sample_ids, ids.astype(np.int16)])[order]
    acc.sample_index = np.concatenate([acc.sample_index, index])[order]
    acc.sample_home = np.concatenate([acc.sample_home, home])[order]
    acc.sample_keys = all_keys[order]


def _to_stats(acc: _Accumulator, top_k: int, phase: str, model: ModelSpec | None,
              top1_known: bool, copy: bool = True) -> RoutingStats:
    own = (lambda a: a.copy()) if copy else (lambda a: a)
    return RoutingStats(
        load=own(acc.load), num_tokens=acc.num_tokens, top_k=top_k,
        top1_transitions=own(acc.top1) if (top1_known and acc.top1 is not None) else None,
        pair_transitions=own(acc.pairs), coactivation=own(acc.coact),
        sample_ids=acc.sample_ids, sample_token_index=acc.sample_index,
        sample_home_rank=acc.sample_home, sample_keys=acc.sample_keys, phase=phase, model=model)


def merge_stats(stats: Iterable[RoutingStats], *, sample_size: int | None = None) -> RoutingStats:
    """Sum the counts of several statistics of the same shape; keep the smallest-key sample.

    A count matrix missing from any input is missing from the result. ``sample_size`` defaults
    to the largest input sample.
    """
    items = list(stats)
    if not items:
        raise InvalidInputError("nothing to merge", source="stats")
    first = items[0]
    for s in items[1:]:
        if s.load.shape != first.load.shape or s.top_k != first.top_k:
            raise InvalidInputError(f"cannot merge statistics of shape {s.load.shape} (top_k={s.top_k}) "
                                    f"with {first.load.shape} (top_k={first.top_k})", source="stats")

    def total(name: str) -> np.ndarray | None:
        arrays = [getattr(s, name) for s in items]
        return None if any(a is None for a in arrays) else _sum(arrays)

    sample = [s for s in items if s.sample_ids is not None]
    size = sample_size if sample_size is not None else max((s.sample_size for s in sample), default=0)
    kwargs = {}
    if len(sample) == len(items) and size > 0:
        keys = np.concatenate([s.sample_keys for s in sample])
        order = np.argsort(keys, kind="stable")[:size]
        kwargs = dict(
            sample_ids=np.concatenate([s.sample_ids for s in sample])[order],
            sample_token_index=np.concatenate([s.sample_token_index for s in sample])[order],
            sample_home_rank=np.concatenate([s.sample_home_rank for s in sample])[order],
            sample_keys=keys[order])
    phases = {s.phase for s in items}
    return RoutingStats(
        load=_sum([s.load for s in items]), num_tokens=sum(s.num_tokens for s in items), top_k=first.top_k,
        top1_transitions=total("top1_transitions"), pair_transitions=total("pair_transitions"),
        coactivation=total("coactivation"), phase=phases.pop() if len(phases) == 1 else "all",
        model=first.model, **kwargs)


def _sum(arrays: list[np.ndarray]) -> np.ndarray:
    if len(arrays) == 1:  # frozen already: shared, not copied
        return arrays[0]
    out = arrays[0].astype(np.result_type(*arrays))  # a copy, summed in place: no [n, ...] stack
    for a in arrays[1:]:
        out += a
    return out


def compute_stats(traces: RoutingTrace | Iterable[RoutingTrace], *, phase: str = "all",
                  sample_size: int = DEFAULT_SAMPLE_SIZE, seed: int = 0) -> RoutingStats:
    """Statistics of one trace or a stream of chunks (all of one shape)."""
    if isinstance(traces, RoutingTrace):
        traces = [traces]
    builder: StatsBuilder | None = None
    for chunk in traces:
        if builder is None:
            builder = StatsBuilder(chunk.num_layers, chunk.num_experts, chunk.top_k,
                                   sample_size=sample_size, seed=seed, model=chunk.model)
        builder.update(chunk)
    if builder is None:
        raise InvalidInputError("no routing data", source="trace")
    return builder.result(phase)


def load_only_stats(load: np.ndarray, top_k: int, *, num_tokens: int | None = None,
                    model: ModelSpec | None = None) -> RoutingStats:
    """Statistics known only by a load matrix ``[L, E]`` (no transitions, no sample)."""
    load = np.asarray(load)
    if num_tokens is None:
        num_tokens = int(round(float(load.sum(axis=1).max()) / top_k)) if load.size else 0
    return RoutingStats(load=load, num_tokens=num_tokens, top_k=top_k, model=model)
