"""Two-batch overlap: one micro-batch's all-to-all runs under the other micro-batch's compute.

SGLang's two-batch overlap (TBO) with DeepEP's hook-based receive splits a step's batch in two
and interleaves them, so that while micro-batch 0 dispatches, micro-batch 1 runs attention, and
so on. Modelled here as a cost layer on top of any :class:`~placer.simulator.cost.StepCostModel`:

1. Split. Per home rank, micro-batch 0 takes ``ceil(n / 2)`` of the rank's ``n`` tokens (the odd
   one) and micro-batch 1 the rest (:func:`halves`): at token level the rank's first tokens in
   batch order (:func:`micro_batch_of`), at count level each micro-batch is drawn on its own from
   the rates (a micro-batch of fewer tokens fluctuates more, as it does at token level).
   :func:`route_micro_batches` routes the two and returns a :class:`SplitTraffic`; each micro-batch
   holds its rank's mix of decode and prefill tokens in proportion (:func:`split_batch`).
2. Cost. The wrapped model costs each micro-batch on its own, so fixed costs (kernel launches,
   the expert weights read from HBM) are paid twice: two-batch overlap can lose at small batches.
3. Schedule. The two phase chains run on two resources, compute (attention, expert compute,
   dense FFN) and communication (dispatch, combine), each chain in its own order across all
   layers, by greedy list scheduling; on ties the operation ready first, then micro-batch 0
   (:func:`two_batch_schedule`).
   The step's other phase (overhead) runs once, after both chains. Ranks stay in lockstep: each
   operation lasts as long as its slowest GPU, as without overlap.

The :class:`~placer.simulator.cost.StepCost` (:func:`overlap_step_cost`) replays the schedule:
its phases are the schedule's segments, each labelled with the compute operation running then,
or, where the compute resource is idle, with the exposed dispatch or combine; so the phase times
partition the step. Its per-layer arrays are the two micro-batches' sums, and ``a2a_hidden_s``
holds, per MoE layer, the dispatch + combine time that ran under compute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from placer.simulator.cost import BatchShape, PhaseKind, StepCost, StepCostModel
from placer.simulator.routing import Traffic

COMM_KINDS = (PhaseKind.DISPATCH, PhaseKind.COMBINE)
"""Phases that run on the communication resource; every other phase but OTHER runs on compute."""


def halves(tokens: np.ndarray) -> np.ndarray:
    """Tokens of each micro-batch per home rank, float [2, G], from ``tokens`` float [G]: micro-batch
    0 takes ``ceil(n / 2)`` (the odd token), micro-batch 1 the rest.

    >>> halves(np.array([4.0, 3.0, 1.0, 0.0])).tolist()
    [[2.0, 2.0, 1.0, 0.0], [2.0, 1.0, 0.0, 0.0]]
    """
    n = np.asarray(tokens, dtype=np.float64)
    first = np.minimum(np.ceil(n / 2), n)
    return np.stack([first, n - first])


def micro_batch_of(home: np.ndarray, num_gpus: int) -> np.ndarray:
    """The micro-batch of every token, int8 [T], from its home rank ``home`` int [T]: per rank the
    first ``ceil(n / 2)`` of its tokens in batch order go to micro-batch 0 (:func:`halves`).

    >>> micro_batch_of(np.array([0, 1, 0, 0, 1]), 2).tolist()
    [0, 0, 0, 1, 1]
    """
    home = np.asarray(home, dtype=np.int64)
    counts = np.bincount(home, minlength=num_gpus)
    order = np.argsort(home, kind="stable")
    first_of_rank = np.cumsum(counts) - counts  # [G]
    position = np.empty(len(home), dtype=np.int64)
    position[order] = np.arange(len(home)) - first_of_rank[home[order]]  # index within its rank
    return (position >= (counts[home] + 1) // 2).astype(np.int8)


def split_batch(batch: BatchShape) -> tuple[BatchShape, BatchShape]:
    """The two micro-batches' :class:`BatchShape`: per rank ``halves(batch.tokens)`` tokens, each
    with the rank's mix of decode and prefill tokens (and their context, positions) in proportion."""
    n = batch.tokens
    first = halves(n)[0]

    def part(x: np.ndarray) -> np.ndarray:  # micro-batch 0's share of x, float [G]
        return np.divide(first * x, n, out=np.zeros_like(n, dtype=np.float64), where=n > 0)

    fields = {name: getattr(batch, name) for name in ("prefill_tokens", "decode_tokens", "decode_context",
                                                      "prefill_positions")}
    mb0 = {name: part(x) for name, x in fields.items()}
    return BatchShape(**mb0), BatchShape(**{name: x - mb0[name] for name, x in fields.items()})


@dataclass(frozen=True)
class SplitTraffic(Traffic):
    """A step's :class:`Traffic` routed as two micro-batches: ``parts`` holds each micro-batch's
    traffic, the inherited fields their sum (the whole step's)."""

    parts: tuple[Traffic, ...] = ()


def split_traffic(parts: Sequence[Traffic]) -> SplitTraffic:
    """The :class:`SplitTraffic` of two micro-batches' traffic."""
    a, b = parts

    def add(x: np.ndarray | None, y: np.ndarray | None) -> np.ndarray | None:
        return None if x is None or y is None else x + y

    return SplitTraffic(src=a.src + b.src, tokens=a.tokens + b.tokens, nodes=a.nodes + b.nodes,
                        pairs=add(a.pairs, b.pairs), slots=a.slots + b.slots, moves=add(a.moves, b.moves),
                        parts=(a, b))


RouteBatch = Callable[[np.ndarray, np.ndarray | None, np.ndarray | None], Traffic]
"""Routes a batch: ``(tokens per rank float [G], token index int [T] | None, home int [T] | None)``;
count-level routes read the first argument, token-level ones the token index and home ranks."""


def route_micro_batches(route_batch: RouteBatch, tokens: np.ndarray, token_index: np.ndarray | None,
                        home: np.ndarray | None, num_gpus: int) -> SplitTraffic:
    """Route a step's two micro-batches with ``route_batch``: ``tokens`` float [G] per home rank
    split by :func:`halves`, the tokens themselves (``token_index``, ``home`` int [T], when the step
    lists them) by :func:`micro_batch_of`."""
    per_rank = halves(tokens)
    if token_index is None or home is None:
        return split_traffic([route_batch(per_rank[k], None, None) for k in (0, 1)])
    mb = micro_batch_of(home, num_gpus)
    return split_traffic([route_batch(per_rank[k], token_index[mb == k], home[mb == k]) for k in (0, 1)])


def two_batch_schedule(on_comm: np.ndarray, durations_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy list schedule of two chains of operations on two resources.

    ``on_comm`` bool [n]: operation i runs on the communication resource (else on compute);
    ``durations_s`` float [2, n]: operation i of micro-batch k. Each chain runs its operations in
    order, each on its resource once the chain's previous one has ended; the operation that can
    start first runs next (a non-delay schedule: at every instant before the end one resource is
    busy). Ties go to the operation ready first (the one waiting, so that a run of one chain's
    compute, e.g. dense layers, alternates with the other chain's instead of starving it), then
    to micro-batch 0. Returns ``start_s`` and ``end_s`` float [2, n].

    >>> start, end = two_batch_schedule(np.array([False, True]), np.array([[2.0, 3.0], [2.0, 3.0]]))
    >>> start.tolist(), float(end.max())
    ([[0.0, 2.0], [2.0, 5.0]], 8.0)
    """
    n = len(on_comm)
    resource = np.asarray(on_comm, dtype=np.int64).tolist()
    d = np.asarray(durations_s, dtype=np.float64).tolist()
    start = [[0.0] * n, [0.0] * n]
    nxt, ready, free = [0, 0], [0.0, 0.0], [0.0, 0.0]  # per chain: next op, its ready time; per resource: free
    for _ in range(2 * n):
        pick, at, since = 0, np.inf, np.inf
        for k in (0, 1):
            if nxt[k] < n:
                s = max(ready[k], free[resource[nxt[k]]])
                if s < at or (s == at and ready[k] < since):
                    pick, at, since = k, s, ready[k]
        i = nxt[pick]
        start[pick][i] = at
        ready[pick] = free[resource[i]] = at + d[pick][i]
        nxt[pick] += 1
    start_s = np.asarray(start)
    return start_s, start_s + durations_s


def _busy_before(start_s: np.ndarray, end_s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Busy time in [0, t) of one resource whose operations ``start_s``, ``end_s`` float [m] (sorted,
    disjoint) are; ``t`` float [q] -> float [q]."""
    done = np.concatenate([[0.0], np.cumsum(end_s - start_s)])  # [m + 1]: busy before each op starts
    j = np.searchsorted(start_s, t, side="right") - 1  # last op started at or before t
    jj = np.maximum(j, 0)
    return np.where(j >= 0, done[jj] + np.minimum(t - start_s[jj], end_s[jj] - start_s[jj]), 0.0)


def _active(start_s: np.ndarray, end_s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``t`` float [q]: whether an operation of (sorted, disjoint) ``start_s``, ``end_s`` runs
    then, bool [q], and the index of the last one started, int [q] (0 when none)."""
    j = np.searchsorted(start_s, t, side="right") - 1
    jj = np.maximum(j, 0)
    return (j >= 0) & (t < end_s[jj]), jj


def overlap_step_cost(first: StepCost, second: StepCost) -> StepCost:
    """The :class:`StepCost` of a step run as the two micro-batches costed ``first`` and ``second``
    (same phase layout), overlapped by :func:`two_batch_schedule`; see the module docstring."""
    kinds = first.kinds
    if not np.array_equal(kinds, second.kinds):
        raise ValueError("the two micro-batches' costs follow different phase layouts")
    other = kinds == PhaseKind.OTHER
    chain = kinds[~other]  # [n]
    on_comm = np.isin(chain, COMM_KINDS)
    durations = np.stack([first.durations_s[~other], second.durations_s[~other]])  # [2, n]
    start, end = two_batch_schedule(on_comm, durations)
    # The two resources' operations in time order (each resource runs one at a time).
    comp_s, comp_e, comp_k = (x[:, ~on_comm].ravel() for x in (start, end, np.broadcast_to(chain, start.shape)))
    comm_s, comm_e, comm_k = (x[:, on_comm].ravel() for x in (start, end, np.broadcast_to(chain, start.shape)))
    oc, om = np.lexsort((comp_e, comp_s)), np.lexsort((comm_e, comm_s))  # by start; zero-length ones first
    comp_s, comp_e, comp_k = comp_s[oc], comp_e[oc], comp_k[oc]
    comm_s, comm_e, comm_k = comm_s[om], comm_e[om], comm_k[om]
    # Hidden all-to-all: the part of each dispatch and combine that ran while compute was busy.
    hidden = _busy_before(comp_s, comp_e, comm_e) - _busy_before(comp_s, comp_e, comm_s)  # [2 * comm ops]
    moe_layer = (np.cumsum(chain == PhaseKind.DISPATCH) - 1)[on_comm]  # [comm ops]: MoE layer of each
    layer_of = np.broadcast_to(moe_layer, (2, len(moe_layer))).ravel()[om]
    num_moe = len(first.dispatch_s)
    hidden_s = np.bincount(layer_of, weights=hidden, minlength=num_moe)[:num_moe]
    # Segments between consecutive starts and ends, labelled by the compute op running, else the
    # exposed communication op; runs of one label are merged.
    edges = np.unique(np.concatenate([[0.0], start.ravel(), end.ravel()]))
    mid = (edges[:-1] + edges[1:]) / 2
    busy, j = _active(comp_s, comp_e, mid)
    label = comp_k[j]
    if len(comm_k):
        label = np.where(busy, label, comm_k[_active(comm_s, comm_e, mid)[1]])
    first_of_run = np.flatnonzero(np.diff(label, prepend=-1)) if len(label) else np.zeros(0, dtype=np.int64)
    bounds = edges[np.append(first_of_run, len(label))]
    tail = max(float(first.durations_s[other].sum()), float(second.durations_s[other].sum()))
    seg_kinds = np.append(label[first_of_run], PhaseKind.OTHER)
    seg_s = np.append(np.diff(bounds), tail)
    layer_s = [c.dispatch_s + c.compute_s + c.combine_s for c in (first, second)]
    return StepCost(
        kinds=seg_kinds.astype(np.int8), durations_s=seg_s, attention_s=first.attention_s + second.attention_s,
        dispatch_s=first.dispatch_s + second.dispatch_s, compute_s=first.compute_s + second.compute_s,
        combine_s=first.combine_s + second.combine_s,
        straggler=np.where(layer_s[0] >= layer_s[1], first.straggler, second.straggler),
        gpu_pairs=first.gpu_pairs + second.gpu_pairs, nvlink_bytes=first.nvlink_bytes + second.nvlink_bytes,
        rdma_bytes=first.rdma_bytes + second.rdma_bytes, nvlink_busy_s=first.nvlink_busy_s + second.nvlink_busy_s,
        rdma_busy_s=first.rdma_busy_s + second.rdma_busy_s, a2a_hidden_s=hidden_s)


class TwoBatchOverlap:
    """The :class:`StepCostModel` of two-batch overlap around ``base`` (any step cost model): costs
    a :class:`SplitTraffic` step's micro-batches with ``base`` and overlaps them
    (:func:`overlap_step_cost`). A step whose micro-batch 1 is empty on every rank runs as one batch
    (nothing to overlap: its ``a2a_hidden_s`` is zero)."""

    def __init__(self, base: StepCostModel):
        self.base = base

    @property
    def needs_pairs(self) -> bool:
        return self.base.needs_pairs

    def step_cost(self, traffic: Traffic, batch: BatchShape) -> StepCost:
        """The overlapped cost of a step; ``traffic`` must be a :class:`SplitTraffic` of two parts."""
        if not isinstance(traffic, SplitTraffic) or len(traffic.parts) != 2:
            raise TypeError("two-batch overlap costs a SplitTraffic of two micro-batches (route_micro_batches)")
        mb0, mb1 = split_batch(batch)
        if not mb1.tokens.any():
            whole = self.base.step_cost(traffic.parts[0], mb0)
            return replace(whole, a2a_hidden_s=np.zeros(len(whole.dispatch_s)))
        return overlap_step_cost(self.base.step_cost(traffic.parts[0], mb0),
                                 self.base.step_cost(traffic.parts[1], mb1))
