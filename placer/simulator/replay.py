"""The tokens a replay feeds the simulator, step by step: from a trace held whole, or streamed.

A replay (:class:`~placer.simulator.config.ReplayWorkload`) runs the trace's consecutive tokens,
``tokens_per_rank x G`` per step, once through or cycling (``wrap``). :func:`replay_tokens`
gives them as :class:`ReplayTokens`: the expert ids (top-1 first when the trace knows it) and
home ranks of any window of consecutive token indices. A :class:`~placer.metrics.TraceStream` is
read chunk by chunk, in order, from the start again when a replay wraps: memory holds one chunk
and one step, whatever the trace's length.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from placer.errors import InvalidInputError
from placer.metrics import TraceStream
from placer.types import RoutingTrace


class ReplayTokens(Protocol):
    """Windows of a trace's tokens, asked for in replay order."""

    num_tokens: int
    has_top1: bool

    def rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(expert ids int [n, L, K] (top-1 first when ``has_top1``), home ranks int [n] or None)
        of the tokens ``index`` int [n] (consecutive modulo the trace's length)."""
        ...


class WholeTrace:
    """:class:`ReplayTokens` of a trace held in memory."""

    def __init__(self, trace: RoutingTrace):
        self.num_tokens = trace.num_tokens
        self.has_top1 = trace.has_top1
        # int16 as stored (a whole int64 copy would be 4x the trace); each batch is widened alone
        self._ids = trace.sorted_ids() if trace.has_top1 else trace.expert_ids
        self._home = trace.home_rank

    def rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self._ids[index], None if self._home is None else self._home[index]


class StreamedTrace:
    """:class:`ReplayTokens` of a :class:`~placer.metrics.TraceStream`, read in order.

    Holds the tokens from the start of the last window asked for to the end of the chunk read
    last; a window before them (the replay wrapped) reads the stream from its start again.
    """

    def __init__(self, stream: TraceStream):
        if stream.num_tokens is None:
            raise InvalidInputError("a replay needs the trace's length before it streams", source="routing")
        self.num_tokens = int(stream.num_tokens)
        self.has_top1 = stream.has_top1
        self._stream = stream
        self._chunks: Iterator[RoutingTrace] | None = None
        self._start = 0  # stream index of the buffer's first token
        self._ids = np.zeros((0, stream.num_layers, stream.top_k), dtype=np.int16)
        self._home: np.ndarray | None = None

    def rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        index = np.asarray(index, dtype=np.int64)
        if not len(index):
            return self._ids[:0], None if self._home is None else self._home[:0]
        # runs of consecutive indices (a wrapping window has two)
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        parts = [self._window(int(run[0]), int(run[-1]) + 1) for run in np.split(index, breaks)]
        ids = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        homes = [p[1] for p in parts if p[1] is not None]
        home = None if len(homes) < len(parts) else (np.concatenate(homes) if len(homes) > 1 else homes[0])
        return ids, home

    def _window(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray | None]:
        if not 0 <= lo < hi <= self.num_tokens:
            raise InvalidInputError(f"replay window [{lo}, {hi}) outside the trace's {self.num_tokens:,} tokens",
                                    source="routing")
        if lo < self._start or self._chunks is None:  # before the buffer: from the start again
            self._chunks = iter(self._stream.chunks())
            self._start = 0
            self._ids = self._ids[:0]
            self._home = None
        drop = lo - self._start  # tokens before the window are not needed again (until a wrap)
        if drop > 0:
            keep = min(drop, len(self._ids))
            self._ids = self._ids[keep:]
            self._home = None if self._home is None else self._home[keep:]
            self._start += keep
        while self._start + len(self._ids) < hi:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                raise InvalidInputError(f"the trace ended after {self._start + len(self._ids):,} tokens, "
                                        f"{self.num_tokens:,} expected (did the file change?)",
                                        source="routing") from None
            ids = chunk.sorted_ids() if self.has_top1 else chunk.expert_ids
            skip = max(0, lo - self._start - len(self._ids))  # a chunk wholly before the window
            if skip >= chunk.num_tokens:
                self._start += chunk.num_tokens
                continue
            home = chunk.home_rank
            if len(self._ids):
                self._ids = np.concatenate([self._ids, ids[skip:]])
                self._home = None if self._home is None or home is None else np.concatenate([self._home, home[skip:]])
            else:
                self._start += skip
                self._ids = ids[skip:]
                self._home = None if home is None else home[skip:]
        a, b = lo - self._start, hi - self._start
        return self._ids[a:b], None if self._home is None else self._home[a:b]


def replay_tokens(routing: RoutingTrace | TraceStream) -> ReplayTokens:
    """The :class:`ReplayTokens` of a whole trace or a streamed one."""
    return WholeTrace(routing) if isinstance(routing, RoutingTrace) else StreamedTrace(routing)
