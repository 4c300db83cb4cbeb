"""The event loop: a clock, a heap and nothing else.

Events are small objects with a time and a ``handle(ctx)`` method that returns follow-on events.
They never compute durations: the scheduler asks the injected cost model and hands the times to
the events it creates (as microsoft/vidur does). The heap is keyed by :func:`event_key`, the one
place the ordering is defined: time, then the event kind's priority, then the order in which
events were scheduled. Same-time ties are therefore deterministic and documented by
:class:`Priority`.
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from enum import IntEnum
from typing import Any


class Priority(IntEnum):
    """Order of events due at the same instant (lower first).

    Arrivals come before the end of a phase, and both before the scheduler starts the next step,
    so a request arriving exactly when a step ends is seen by the step that starts then.
    """

    ARRIVAL = 0
    PHASE_END = 1
    STEP_END = 2
    STEP_START = 3


class Event(ABC):
    """Base of every event: a due time and a priority; subclasses implement ``handle``."""

    __slots__ = ("time_s",)
    priority: Priority = Priority.STEP_START

    def __init__(self, time_s: float):
        self.time_s = float(time_s)

    @abstractmethod
    def handle(self, ctx: Any) -> Iterable[Event]:
        """Update state through ``ctx``; return the follow-on events."""


def event_key(event: Event, seq: int) -> tuple[float, int, int]:
    """The heap key: (time, priority, scheduling order)."""
    return (event.time_s, int(event.priority), seq)


class Engine:
    """Pops events in :func:`event_key` order and pushes what their handlers return."""

    def __init__(self) -> None:
        self._heap: list[tuple[tuple[float, int, int], Event]] = []
        self._seq = 0
        self.now = 0.0
        self.events_handled = 0

    def schedule(self, event: Event) -> None:
        if not event.time_s >= self.now or math.isnan(event.time_s):
            raise ValueError(f"event {type(event).__name__} at {event.time_s} is before now ({self.now})")
        heapq.heappush(self._heap, (event_key(event, self._seq), event))
        self._seq += 1

    def __len__(self) -> int:
        return len(self._heap)

    def run(self, ctx: Any, *, until_s: float = math.inf) -> int:
        """Handle events due at or before ``until_s``; returns how many were handled."""
        heap, handled = self._heap, 0
        while heap and heap[0][0][0] <= until_s:
            _, event = heapq.heappop(heap)
            self.now = event.time_s
            for follow in event.handle(ctx):
                self.schedule(follow)
            handled += 1
        self.events_handled += handled
        return handled
