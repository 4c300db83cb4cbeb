"""The simulator's events. Each updates state through the context and returns follow-on events.

Durations come from the :class:`~placer.simulator.cost.StepCost` the context's cost model (a
:class:`~placer.simulator.cost.StepCostModel`, injected) produced when the step started; an
event only adds the next phase's duration to its own time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from placer.simulator.cost import StepCostModel
from placer.simulator.engine import Event, Priority


@dataclass
class SimContext:
    """What events see: the scheduler, a ``route(step) -> Traffic`` function, the cost model and
    the collector; ``idle`` is True while no step is running."""

    scheduler: Any
    route: Any
    cost_model: StepCostModel
    collector: Any
    idle: bool = True
    progress: Any = None
    stats: dict[str, int] = field(default_factory=dict)


class RequestArrival(Event):
    __slots__ = ("request",)
    priority = Priority.ARRIVAL

    def __init__(self, time_s: float, request: int):
        super().__init__(time_s)
        self.request = request

    def handle(self, ctx: SimContext) -> Iterable[Event]:
        ctx.scheduler.on_arrival(self.request)
        ctx.collector.on_arrival(self.request, self.time_s)
        if ctx.idle:
            ctx.idle = False
            return (StepStart(self.time_s),)
        return ()


class StepStart(Event):
    __slots__ = ()
    priority = Priority.STEP_START

    def handle(self, ctx: SimContext) -> Iterable[Event]:
        step = ctx.scheduler.next_step()
        if step is None:
            ctx.idle = True
            return ()
        ctx.idle = False
        cost = ctx.cost_model.step_cost(ctx.route(step), step.shape)
        ctx.collector.on_step_start(step, cost, self.time_s)
        return (PhaseEnd(self.time_s + cost.durations_s[0], step, cost, 0),)


class PhaseEnd(Event):
    __slots__ = ("step", "cost", "phase")
    priority = Priority.PHASE_END

    def __init__(self, time_s: float, step: Any, cost: Any, phase: int):
        super().__init__(time_s)
        self.step, self.cost, self.phase = step, cost, phase

    def handle(self, ctx: SimContext) -> Iterable[Event]:
        nxt = self.phase + 1
        if nxt < len(self.cost.durations_s):
            return (PhaseEnd(self.time_s + self.cost.durations_s[nxt], self.step, self.cost, nxt),)
        return (StepEnd(self.time_s, self.step),)


class StepEnd(Event):
    __slots__ = ("step",)
    priority = Priority.STEP_END

    def __init__(self, time_s: float, step: Any):
        super().__init__(time_s)
        self.step = step

    def handle(self, ctx: SimContext) -> Iterable[Event]:
        done = ctx.scheduler.finish_step(self.step, self.time_s)
        ctx.collector.on_step_end(self.step, done, self.time_s)
        if ctx.progress is not None:
            ctx.progress(self.step.index, self.time_s)
        return (StepStart(self.time_s),)
