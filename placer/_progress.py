"""Progress reports from library code too deep for a ``progress=`` callback to reach.

Library functions that a command calls directly take a ``progress=`` callback. The solver's
layer search sits under the method registry (:func:`placer.ilp.solve`), so it reports here
instead, and a command that shows progress installs a sink around the call with
:func:`reporting`. Without a sink a report does nothing. Reports are made in the calling
process (never in a worker process), from the context the sink was installed in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

Sink = Callable[[str, int, int], None]  # (what, done, total); total 0: not known yet

TOKENS_READ = "reading"
"""Tokens of routing read so far (:func:`placer.io.routing.gather_routing`, total not known)."""
TOKENS_SCORED = "scoring"
"""Tokens scored so far in one pass over a trace (:class:`placer.metrics.TraceStream`)."""

_SINK: ContextVar[Sink | None] = ContextVar("placer_progress_sink", default=None)


def report(what: str, done: int, total: int) -> None:
    """Tell the installed sink (if any) that ``done`` of ``total`` ``what`` are finished."""
    sink = _SINK.get()
    if sink is not None:
        sink(what, done, total)


@contextlib.contextmanager
def reporting(sink: Sink) -> Iterator[None]:
    """Send the reports made inside this block to ``sink``."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)
