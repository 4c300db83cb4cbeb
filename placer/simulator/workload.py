"""Workloads: the routing pool, request arrivals and lengths, trace replay batches. Seeded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placer.errors import InvalidInputError
from placer.simulator.config import ServingWorkload
from placer.synthetic import synthesize_trace
from placer.types import ModelSpec, RoutingStats, RoutingTrace


@dataclass(frozen=True)
class RoutingPool:
    """Tokens whose routing the count-level path measures: ``ids`` int64 [S, L, K], top-1 first
    when ``top1_known``; ``kind`` says where they came from (trace, sample, load-only, synthetic)."""

    ids: np.ndarray
    kind: str
    top1_known: bool


def _draw_from_load(load: np.ndarray, top_k: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct experts per token per layer, drawn in proportion to ``load`` [L, E] (Gumbel top-k)."""
    num_layers, num_experts = load.shape
    logp = np.log(np.maximum(load.astype(np.float64), 1e-12) / max(load.sum(axis=1).max(), 1))
    out = np.empty((size, num_layers, top_k), dtype=np.int64)
    for layer in range(num_layers):
        keys = logp[layer] + rng.gumbel(size=(size, num_experts))
        top = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
        order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
        out[:, layer] = np.take_along_axis(top, order, axis=1)
    return out


def routing_pool(data: RoutingTrace | RoutingStats | None, model: ModelSpec, *, size: int = 4096,
                 seed: int = 0) -> RoutingPool:
    """Up to ``size`` tokens that represent ``data`` (or the model's synthetic preset when None).

    A trace gives its tokens (an evenly spaced subset when longer); stats give their reservoir
    sample, or, for load-only stats, tokens drawn per layer in proportion to the load (inter-
    layer affinity is then unknown and not reproduced).
    """
    rng = np.random.default_rng(seed)
    if data is None:
        trace = synthesize_trace(model, size, seed=seed)
        return RoutingPool(np.asarray(trace.expert_ids, dtype=np.int64), f"synthetic:{model.name}", True)
    if isinstance(data, RoutingTrace):
        pick = np.unique(np.linspace(0, data.num_tokens - 1, min(size, data.num_tokens)).astype(np.int64))
        if data.num_tokens == 0:
            raise InvalidInputError("the trace has no tokens", source="routing")
        sub = data.select_tokens(pick)
        ids = sub.sorted_ids() if sub.has_top1 else sub.expert_ids
        return RoutingPool(np.asarray(ids, dtype=np.int64), "trace", sub.has_top1)
    if data.sample_ids is not None and len(data.sample_ids):
        ids = np.asarray(data.sample_ids[:size], dtype=np.int64)
        return RoutingPool(ids, "stats-sample", data.has_top1)
    return RoutingPool(_draw_from_load(data.load, data.top_k, size, rng), "load-only", False)


@dataclass(frozen=True)
class Arrivals:
    """Requests of a serving run: ``time_s``, ``prompt``, ``output`` [R] (sorted by time)."""

    time_s: np.ndarray
    prompt: np.ndarray
    output: np.ndarray


def _lengths(mean: int, count: int, dist: str, rng: np.random.Generator) -> np.ndarray:
    if dist == "fixed":
        return np.full(count, mean, dtype=np.int64)
    return np.maximum(1, np.rint(rng.exponential(mean, size=count))).astype(np.int64)


def poisson_arrivals(workload: ServingWorkload, seed: int) -> Arrivals:
    """Poisson arrivals at ``rate`` over ``duration_s`` with the configured length distribution."""
    rng = np.random.default_rng([seed, 7])
    expected = workload.rate * workload.duration_s
    gaps = rng.exponential(1.0 / workload.rate, size=int(expected + 10 * np.sqrt(expected) + 10))
    times = np.cumsum(gaps)
    times = times[times < workload.duration_s]
    n = len(times)
    return Arrivals(time_s=times, prompt=_lengths(workload.prompt_len, n, workload.length_dist, rng),
                    output=_lengths(workload.output_len, n, workload.length_dist, rng))


def replay_batches(total: int, tokens_per_step: int, iterations: int | None,
                   wrap: bool) -> list[np.ndarray]:
    """Token indices of each replay step: consecutive ``tokens_per_step`` tokens of a trace of
    ``total`` tokens.

    Without ``wrap`` the trace is replayed once, its last step holding what is left (at most
    ``iterations`` steps); with ``wrap``, ``iterations`` full steps cycle through it.
    """
    if total == 0:
        raise InvalidInputError("the trace has no tokens", source="routing")
    if wrap:
        steps = iterations if iterations is not None else -(-total // tokens_per_step)
        return [np.arange(i * tokens_per_step, (i + 1) * tokens_per_step) % total for i in range(steps)]
    steps = -(-total // tokens_per_step)
    if iterations is not None:
        steps = min(steps, iterations)
    return [np.arange(i * tokens_per_step, min((i + 1) * tokens_per_step, total)) for i in range(steps)]
