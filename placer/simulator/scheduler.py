"""Schedulers decide *what* each step runs; the cost model says how long it takes.

Expert parallelism runs every rank in lockstep: each step all ranks take part in every layer's
all-to-all, with whatever tokens they have. :class:`ServingScheduler` is continuous batching per
rank (DP attention): each request lives on one rank; each step a rank decodes one token for each
running request and fills the rest of its token budget with chunked prefill, admitting waiting
requests in arrival order while their whole KV cache fits. :class:`ReplayScheduler` feeds
consecutive tokens of a trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from placer.errors import InvalidInputError
from placer.simulator.config import ReplayWorkload, ServingWorkload
from placer.simulator.cost import BatchShape
from placer.simulator.replay import ReplayTokens
from placer.simulator.workload import Arrivals, replay_batches
from placer.types import ModelSpec, Placement, Topology


@dataclass(frozen=True)
class Step:
    """One step's work: ``shape`` for the cost model; ``decoding`` int [n] request indices that
    decode a token; ``prefill`` (request, tokens) pairs; ``token_index`` (replay) the trace
    tokens and ``home`` their ranks."""

    index: int
    shape: BatchShape
    decoding: np.ndarray
    prefill: tuple[tuple[int, int], ...] = ()
    token_index: np.ndarray | None = None
    home: np.ndarray | None = None


def kv_capacity_tokens(model: ModelSpec, topology: Topology, placement: Placement, kv_bytes: float,
                       attention_params: float) -> int:
    """Tokens of KV cache one GPU holds after its expert and attention weights (90% of memory).

    Raises InvalidInputError when the weights alone do not fit.
    """
    experts = placement.slots_per_gpu * model.num_moe_layers * model.expert_weight_bytes
    shared = model.num_shared_experts * model.num_moe_layers * model.expert_weight_bytes
    dense = model.num_hidden_layers * attention_params * model.activation_bytes
    free = 0.9 * topology.memory_bytes - experts - shared - dense
    per_token = kv_bytes * model.num_hidden_layers
    if free <= per_token:
        raise InvalidInputError(f"the weights ({(experts + shared + dense) / 1e9:.1f} GB per GPU) leave no room "
                                f"for a KV cache in {topology.memory_bytes / 1e9:.0f} GB", source="--placement")
    return int(free // per_token)


class ServingScheduler:
    """Continuous batching with a per-rank token budget; KV replicated on every rank when
    ``replicate_kv`` (context-coherent execution)."""

    def __init__(self, arrivals: Arrivals, workload: ServingWorkload, num_gpus: int, kv_capacity: int,
                 replicate_kv: bool):
        self.w = workload
        self.g = num_gpus
        self.arrival_s = arrivals.time_s
        self.prompt = arrivals.prompt
        self.output = arrivals.output
        n = len(self.arrival_s)
        self.rank = np.full(n, -1, dtype=np.int64)
        self.prefilled = np.zeros(n, dtype=np.int64)
        self.generated = np.zeros(n, dtype=np.int64)
        self.admitted = np.zeros(n, dtype=bool)
        self.first_token_s = np.full(n, np.nan)
        self.finish_s = np.full(n, np.nan)
        self.kv_capacity = kv_capacity
        self.replicate_kv = replicate_kv
        self.kv_used = np.zeros(num_gpus, dtype=np.int64)
        self.waiting: list[list[int]] = [[] for _ in range(num_gpus)]
        self.prefilling: list[list[int]] = [[] for _ in range(num_gpus)]
        self.steps = 0
        need = self.prompt + self.output
        if n and need.max() > kv_capacity:
            worst = int(np.argmax(need))
            raise InvalidInputError(f"a request of {need[worst]} tokens exceeds the KV capacity of "
                                    f"{kv_capacity} tokens per GPU", source="--prompt-len")

    def on_arrival(self, request: int) -> None:
        active = (self.rank >= 0) & np.isnan(self.finish_s)
        left = (self.prompt - self.prefilled + self.output - self.generated) * active
        outstanding = np.bincount(self.rank[active], weights=left[active], minlength=self.g)
        g = int(np.argmin(outstanding))
        self.rank[request] = g
        self.waiting[g].append(request)

    def _fits(self, g: int, need: int) -> bool:
        if self.replicate_kv:
            return self.kv_used[0] + need <= self.kv_capacity
        return self.kv_used[g] + need <= self.kv_capacity

    def _reserve(self, g: int, need: int) -> None:
        if self.replicate_kv:
            self.kv_used += need
        else:
            self.kv_used[g] += need

    def next_step(self) -> Step | None:
        """The next step's work, or None when nothing is admitted or waiting to run."""
        if self.w.max_steps is not None and self.steps >= self.w.max_steps:
            return None
        decoding_mask = self.admitted & np.isnan(self.finish_s) & (self.prefilled >= self.prompt)
        decoding = np.flatnonzero(decoding_mask)
        g = self.g
        decode = np.bincount(self.rank[decoding], minlength=g).astype(np.float64)
        context = np.bincount(self.rank[decoding], weights=(self.prompt + self.generated)[decoding], minlength=g)
        running = np.bincount(self.rank[self.admitted & np.isnan(self.finish_s)], minlength=g)
        prefill_tokens = np.zeros(g)
        positions = np.zeros(g)
        prefill: list[tuple[int, int]] = []
        for rank in range(g):
            budget = self.w.token_budget - int(decode[rank])
            queue = self.prefilling[rank]
            while budget > 0 and (queue or self.waiting[rank]):
                if not queue:
                    r = self.waiting[rank][0]
                    need = int(self.prompt[r] + self.output[r])
                    if running[rank] >= self.w.max_running or not self._fits(rank, need):
                        break
                    self.waiting[rank].pop(0)
                    self._reserve(rank, need)
                    self.admitted[r] = True
                    running[rank] += 1
                    queue.append(r)
                r = queue[0]
                start = int(self.prefilled[r])
                chunk = min(budget, int(self.prompt[r]) - start)
                prefill.append((r, chunk))
                prefill_tokens[rank] += chunk
                positions[rank] += (2 * start + chunk - 1) * chunk / 2
                budget -= chunk
                if start + chunk >= self.prompt[r]:
                    queue.pop(0)
                else:
                    break
        if not len(decoding) and not prefill:
            return None
        shape = BatchShape(prefill_tokens=prefill_tokens, decode_tokens=decode, decode_context=context,
                           prefill_positions=positions)
        step = Step(index=self.steps, shape=shape, decoding=decoding, prefill=tuple(prefill))
        self.steps += 1
        return step

    def finish_step(self, step: Step, now: float) -> np.ndarray:
        """Apply a finished step at ``now``; returns the indices of requests that completed."""
        for r, chunk in step.prefill:
            self.prefilled[r] += chunk
            if self.prefilled[r] >= self.prompt[r]:
                self.generated[r] = 1  # the prefill's last chunk yields the first output token
                self.first_token_s[r] = now
        d = step.decoding
        self.generated[d] += 1
        done = np.concatenate([d, np.array([r for r, _ in step.prefill], dtype=np.int64)])
        done = np.unique(done[(self.generated[done] >= self.output[done]) & np.isnan(self.finish_s[done])])
        self.finish_s[done] = now
        for r in done:
            need = int(self.prompt[r] + self.output[r])
            if self.replicate_kv:
                self.kv_used -= need
            else:
                self.kv_used[self.rank[r]] -= need
        return done


class ReplayScheduler:
    """Fixed decode batches of ``tokens_per_rank`` tokens per rank.

    With a trace's tokens (:func:`placer.simulator.replay.replay_tokens`: held whole or streamed),
    its consecutive tokens (routed token by token); without one, ``iterations`` steps whose
    routing the count-level path samples.
    """

    def __init__(self, tokens: ReplayTokens | None, workload: ReplayWorkload, num_gpus: int):
        self.tokens = tokens
        self.w = workload
        self.g = num_gpus
        per_step = workload.tokens_per_rank * num_gpus
        self.batches: Sequence[np.ndarray | None]
        if tokens is None:
            self.batches = [None] * (workload.iterations or 100)
        else:
            self.batches = replay_batches(tokens.num_tokens, per_step, workload.iterations, workload.wrap)
        self.steps = 0

    def next_step(self) -> Step | None:
        if self.steps >= len(self.batches):
            return None
        idx = self.batches[self.steps]
        if idx is None:
            home = None
            decode = np.full(self.g, float(self.w.tokens_per_rank))
        else:
            recorded = None if self.tokens is None else self.tokens.rows(idx)[1]
            if recorded is not None:
                home = np.asarray(recorded, dtype=np.int64) % self.g
            else:
                home = np.arange(len(idx)) % self.g
            decode = np.bincount(home, minlength=self.g).astype(np.float64)
        shape = BatchShape(prefill_tokens=np.zeros(self.g), decode_tokens=decode,
                           decode_context=decode * self.w.context_len, prefill_positions=np.zeros(self.g))
        step = Step(index=self.steps, shape=shape, decoding=np.zeros(0, dtype=np.int64), token_index=idx, home=home)
        self.steps += 1
        return step

    def finish_step(self, step: Step, now: float) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)
