"""The event loop: ordering by ``event_key`` (time, Priority, scheduling order), FIFO ties,
no scheduling in the past, ``run(until_s)``; and the simulator's events driven through it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from placer.simulator.engine import Engine, Event, Priority, event_key
from placer.simulator.events import PhaseEnd, RequestArrival, SimContext, StepEnd, StepStart

pytestmark = pytest.mark.timeout(60)


class Rec(Event):
    """An event that records its name in ``ctx`` and returns the follow-ups it was given."""

    __slots__ = ("name", "priority", "follow")

    def __init__(self, time_s, name, priority=Priority.STEP_START, follow=()):
        super().__init__(time_s)
        self.name, self.priority, self.follow = name, priority, follow

    def handle(self, ctx):
        ctx.append((self.time_s, self.name))
        return self.follow


def test_priorities_are_arrival_phase_end_step_end_step_start():
    assert Priority.ARRIVAL < Priority.PHASE_END < Priority.STEP_END < Priority.STEP_START
    assert RequestArrival.priority == Priority.ARRIVAL
    assert PhaseEnd.priority == Priority.PHASE_END
    assert StepEnd.priority == Priority.STEP_END
    assert StepStart.priority == Priority.STEP_START


def test_event_key_is_time_priority_sequence():
    e = Rec(2.5, "x", Priority.STEP_END)
    assert event_key(e, 7) == (2.5, int(Priority.STEP_END), 7)
    # Time first, then priority, then scheduling order.
    assert event_key(Rec(1.0, "a", Priority.STEP_START), 9) < event_key(Rec(2.0, "b", Priority.ARRIVAL), 0)
    assert event_key(Rec(1.0, "a", Priority.ARRIVAL), 9) < event_key(Rec(1.0, "b", Priority.PHASE_END), 0)
    assert event_key(Rec(1.0, "a", Priority.ARRIVAL), 3) < event_key(Rec(1.0, "b", Priority.ARRIVAL), 4)


def test_same_instant_runs_arrivals_then_phase_ends_then_step_end_then_step_start():
    engine, log = Engine(), []
    # Scheduled in the reverse of the required order, all due at the same instant.
    for name, prio in (("start", Priority.STEP_START), ("step_end", Priority.STEP_END),
                       ("phase_end", Priority.PHASE_END), ("arrival", Priority.ARRIVAL)):
        engine.schedule(Rec(1.0, name, prio))
    assert engine.run(log) == 4
    assert [n for _, n in log] == ["arrival", "phase_end", "step_end", "start"]


def test_equal_keys_are_fifo_in_scheduling_order():
    engine, log = Engine(), []
    names = [f"e{i}" for i in range(8)]
    for name in names:
        engine.schedule(Rec(3.0, name, Priority.PHASE_END))
    engine.run(log)
    assert [n for _, n in log] == names


def test_time_dominates_priority():
    engine, log = Engine(), []
    engine.schedule(Rec(2.0, "late-arrival", Priority.ARRIVAL))
    engine.schedule(Rec(1.0, "early-start", Priority.STEP_START))
    engine.schedule(Rec(1.5, "mid-end", Priority.STEP_END))
    engine.run(log)
    assert log == [(1.0, "early-start"), (1.5, "mid-end"), (2.0, "late-arrival")]


def test_follow_on_event_at_same_instant_with_lower_priority_runs_first():
    """A handler at t returning an ARRIVAL at t: it precedes a STEP_START queued earlier at t."""
    engine, log = Engine(), []
    engine.schedule(Rec(1.0, "phase_end", Priority.PHASE_END, follow=(Rec(1.0, "arrival", Priority.ARRIVAL),
                                                                      Rec(1.0, "start2", Priority.STEP_START))))
    engine.schedule(Rec(1.0, "start1", Priority.STEP_START))
    engine.run(log)
    assert [n for _, n in log] == ["phase_end", "arrival", "start1", "start2"]


def test_scheduling_in_the_past_raises():
    engine, log = Engine(), []
    engine.schedule(Rec(5.0, "a"))
    engine.run(log)
    assert engine.now == 5.0
    with pytest.raises(ValueError, match="before now"):
        engine.schedule(Rec(4.999, "past"))
    with pytest.raises(ValueError):
        engine.schedule(Rec(math.nan, "nan"))
    engine.schedule(Rec(5.0, "now-is-fine"))  # at the current instant is allowed
    assert len(engine) == 1


def test_handler_returning_a_past_event_raises():
    engine = Engine()
    engine.schedule(Rec(2.0, "a", follow=(Rec(1.0, "back-in-time"),)))
    with pytest.raises(ValueError):
        engine.run([])


def test_run_until_stops_and_resumes():
    engine, log = Engine(), []
    for t in (1.0, 2.0, 3.0, 4.0):
        engine.schedule(Rec(t, f"t{t:g}"))
    assert engine.run(log, until_s=2.0) == 2  # due at or before until_s
    assert [n for _, n in log] == ["t1", "t2"]
    assert engine.now == 2.0 and len(engine) == 2
    assert engine.run(log, until_s=2.5) == 0
    assert engine.run(log) == 2
    assert engine.events_handled == 4 and engine.now == 4.0 and len(engine) == 0


# --------------------------------------------------------------------------------------------
# The simulator's events, with a fake scheduler and cost model
# --------------------------------------------------------------------------------------------

class FakeScheduler:
    """Each step takes every request that has arrived and not yet run."""

    def __init__(self):
        self.pending: list[int] = []
        self.steps: list[tuple[int, list[int]]] = []
        self.finished: list[tuple[int, float]] = []

    def on_arrival(self, request):
        self.pending.append(request)

    def next_step(self):
        if not self.pending:
            return None
        step = SimpleNamespace(index=len(self.steps), shape=None, requests=list(self.pending))
        self.pending.clear()
        self.steps.append((step.index, step.requests))
        return step

    def finish_step(self, step, now):
        self.finished.append((step.index, now))
        return np.asarray(step.requests)


class FakeCollector:
    def __init__(self):
        self.starts: list[tuple[int, float, list[int]]] = []
        self.ends: list[tuple[int, float]] = []
        self.arrivals: list[tuple[int, float]] = []

    def on_arrival(self, request, time_s):
        self.arrivals.append((request, time_s))

    def on_step_start(self, step, cost, time_s):
        self.starts.append((step.index, time_s, list(step.requests)))

    def on_step_end(self, step, done, time_s):
        self.ends.append((step.index, time_s))


def test_events_chain_phases_and_an_arrival_at_a_step_end_joins_the_next_step():
    durations = np.array([1.0, 2.0])  # two phases: a step lasts 3 s
    cost_model = SimpleNamespace(step_cost=lambda traffic, shape: SimpleNamespace(durations_s=durations))
    sched, coll = FakeScheduler(), FakeCollector()
    ticks = []
    ctx = SimContext(scheduler=sched, route=lambda step: None, cost_model=cost_model, collector=coll,
                     progress=lambda i, t: ticks.append((i, t)))
    engine = Engine()
    for i, t in enumerate((0.0, 3.0, 4.0, 10.0)):
        engine.schedule(RequestArrival(t, i))
    engine.run(ctx)
    # Step 0 at 0 ends at 3; request 1 arrives exactly then and is seen by step 1 (3 -> 6), which
    # does not see request 2 (arrived mid-step, runs at 6); request 3 finds the engine idle.
    assert coll.starts == [(0, 0.0, [0]), (1, 3.0, [1]), (2, 6.0, [2]), (3, 10.0, [3])]
    assert coll.ends == [(0, 3.0), (1, 6.0), (2, 9.0), (3, 13.0)]
    assert sched.finished == coll.ends
    assert ticks == coll.ends
    assert coll.arrivals == [(0, 0.0), (1, 3.0), (2, 4.0), (3, 10.0)]
    assert ctx.idle and engine.now == 13.0 and len(engine) == 0
    # 4 arrivals + 4 x (start, 2 phase ends, end) + the two starts that found nothing (9 s, 13 s).
    assert engine.events_handled == 4 + 4 * 4 + 2


def test_arrival_while_busy_does_not_start_a_second_step():
    durations = np.array([5.0])
    cost_model = SimpleNamespace(step_cost=lambda traffic, shape: SimpleNamespace(durations_s=durations))
    sched, coll = FakeScheduler(), FakeCollector()
    ctx = SimContext(scheduler=sched, route=lambda step: None, cost_model=cost_model, collector=coll)
    engine = Engine()
    engine.schedule(RequestArrival(0.0, 0))
    engine.schedule(RequestArrival(1.0, 1))
    engine.schedule(RequestArrival(1.0, 2))
    engine.run(ctx, until_s=4.0)
    assert [s[:2] for s in coll.starts] == [(0, 0.0)]
    assert not ctx.idle
    engine.run(ctx)
    assert coll.starts == [(0, 0.0, [0]), (1, 5.0, [1, 2])]
