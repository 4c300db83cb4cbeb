"""One call per simulated placement: build the pieces, run the engine, return a RunOutput.

The cost model is injected: ``simulate(..., cost_model=factory)`` builds it per placement with
``factory(model, topology, placement, config)`` (a :data:`~placer.simulator.cost.CostModelFactory`;
default :class:`~placer.simulator.cost.CostModel`, the roofline one). The events ask it for every
step's durations; the scheduler's KV capacity comes from ``config.compute``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from placer.errors import InvalidInputError
from placer.metrics import TraceStream
from placer.metrics.dispatch import DEFAULT_DISPATCH_SEED, dispatch_table
from placer.simulator.collector import Collector
from placer.simulator.config import ReplayWorkload, ServingWorkload, SimConfig
from placer.simulator.cost import CostModel, CostModelFactory, StepCostModel
from placer.simulator.cost.compute import attention_params, kv_bytes_per_token
from placer.simulator.cost.overlap import TwoBatchOverlap, route_micro_batches
from placer.simulator.engine import Engine
from placer.simulator.events import RequestArrival, SimContext, StepStart
from placer.simulator.replay import replay_tokens
from placer.simulator.results import RunOutput
from placer.simulator.routing import routing_rates, sample_traffic, token_traffic
from placer.simulator.scheduler import ReplayScheduler, ServingScheduler, kv_capacity_tokens
from placer.simulator.workload import poisson_arrivals, routing_pool
from placer.types import (
    EXECUTION_MODES,
    POSITION_RULES,
    ModelSpec,
    Placement,
    RoutingStats,
    RoutingTrace,
    Topology,
)
from placer.validate import check_placement

Workload = ServingWorkload | ReplayWorkload


def _check(model: ModelSpec, topology: Topology, placement: Placement, config: SimConfig) -> None:
    if not model.sizes_known:
        raise InvalidInputError(f"model {model.name} has no hidden/expert sizes; the simulator needs them "
                                "(pass a preset with --model)", source="--model")
    if config.execution not in EXECUTION_MODES:
        raise InvalidInputError(f"unknown execution mode {config.execution!r}", source="--execution")
    check_placement(placement, model, topology)


def simulate(placement: Placement, topology: Topology, model: ModelSpec, *,
             routing: RoutingTrace | TraceStream | RoutingStats | None = None, workload: Workload | None = None,
             config: SimConfig | None = None, label: str = "placement", level: str = "count",
             progress: Callable[[int, float], None] | None = None,
             cost_model: CostModelFactory | None = None) -> RunOutput:
    """Simulate serving ``model`` on ``topology`` with ``placement``.

    ``routing``: a trace (held whole, or streamed: a replay reads it chunk by chunk), or
    statistics (None: the model's synthetic preset). ``workload``:
    :class:`ServingWorkload` (default) or :class:`ReplayWorkload`. ``level``: ``count`` (routing
    sampled from per-token rates) or ``token`` (every token routed; replay of a trace always
    is). Deterministic given ``config.seed``: placements compared with the same seed see the
    same arrivals and the same routing draws. ``cost_model``: the factory of the step cost model
    (None: :class:`~placer.simulator.cost.CostModel`); with ``config.overlap="two-batch"`` it costs
    each step's two micro-batches and :class:`~placer.simulator.cost.overlap.TwoBatchOverlap`
    overlaps them.
    """
    config = config or SimConfig()
    workload = workload or ServingWorkload()
    if isinstance(routing, TraceStream) and not isinstance(workload, ReplayWorkload):
        raise InvalidInputError("a streamed trace can only be replayed (--workload replay); serving samples "
                                "the routing's statistics", source="routing")
    _check(model, topology, placement, config)
    if level not in ("count", "token"):
        raise InvalidInputError(f"unknown routing level {level!r}", source="level")
    g = topology.num_gpus
    cost: StepCostModel = (cost_model or CostModel)(model, topology, placement, config)
    two_batch = config.overlap == "two-batch"
    if two_batch:
        cost = TwoBatchOverlap(cost)
    collector = Collector(label, model.num_moe_layers, g, overlap=two_batch)
    execution, dispatch = config.execution, config.dispatch or "nearest"
    table = (None if dispatch in POSITION_RULES
             else dispatch_table(placement, topology, dispatch, DEFAULT_DISPATCH_SEED, model=model))
    rng = np.random.default_rng([config.seed, 1])
    need_pairs = cost.needs_pairs
    replay = (replay_tokens(routing) if isinstance(workload, ReplayWorkload)
              and isinstance(routing, RoutingTrace | TraceStream) else None)
    if replay is not None:
        if execution != "standard" and not replay.has_top1:
            raise InvalidInputError("context-coherent execution needs each token's top-1 expert; the trace's "
                                    "order is unknown", source="routing")

        def route_batch(tokens, token_index, home):
            return token_traffic(placement, topology, replay.rows(token_index)[0].astype(np.int64), home,
                                 execution=execution, dispatch=dispatch, index=token_index, table=table)
    else:
        assert not isinstance(routing, TraceStream)  # refused above: a stream is only replayed
        pool = routing_pool(routing, model, size=config.pool_size, seed=config.seed)
        if execution != "standard" and not pool.top1_known:
            raise InvalidInputError(f"context-coherent execution needs each token's top-1 expert; the routing "
                                    f"({pool.kind}) does not record it", source="routing")
        if level == "count":
            rates = routing_rates(placement, topology, pool.ids, execution=execution, dispatch=dispatch, table=table)

            def route_batch(tokens, token_index, home):
                return sample_traffic(rates, placement, topology, tokens, rng, with_pairs=need_pairs)
        else:
            def route_batch(tokens, token_index, home):
                n = tokens.astype(np.int64)
                home = np.repeat(np.arange(g), n)
                pick = rng.integers(0, len(pool.ids), size=len(home))
                return token_traffic(placement, topology, pool.ids[pick], home, execution=execution,
                                     dispatch=dispatch, index=pick, table=table)

    def route(step):
        if two_batch:
            return route_micro_batches(route_batch, step.shape.tokens, step.token_index, step.home, g)
        return route_batch(step.shape.tokens, step.token_index, step.home)

    engine = Engine()
    if isinstance(workload, ReplayWorkload):
        scheduler: Any = ReplayScheduler(replay, workload, g)
        until = np.inf
        engine.schedule(StepStart(0.0))
    else:
        arrivals = poisson_arrivals(workload, config.seed)
        capacity = kv_capacity_tokens(model, topology, placement, kv_bytes_per_token(config.compute, model),
                                      attention_params(config.compute, model))
        scheduler = ServingScheduler(arrivals, workload, g, capacity, replicate_kv=execution != "standard")
        for i, t in enumerate(arrivals.time_s):
            engine.schedule(RequestArrival(float(t), i))
        until = 2.0 * workload.duration_s
    collector.scheduler = scheduler
    ctx = SimContext(scheduler=scheduler, route=route, cost_model=cost, collector=collector, progress=progress,
                     idle=not isinstance(workload, ReplayWorkload))
    engine.run(ctx, until_s=until)
    out = collector.output()
    out.summary["events"] = engine.events_handled
    out.summary["routing_pool"] = "trace-tokens" if replay is not None else pool.kind
    if execution != "standard":
        out.summary["kv_replication"] = g
    return out


def simulate_many(placements: Sequence[tuple[str, Placement]], topology: Topology, model: ModelSpec,
                  **kwargs: Any) -> list[RunOutput]:
    """:func:`simulate` each ``(label, placement)`` with the same workload, routing and seeds."""
    return [simulate(p, topology, model, label=label, **kwargs) for label, p in placements]
