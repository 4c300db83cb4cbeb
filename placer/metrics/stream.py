"""A per-token trace that metrics read chunk by chunk instead of holding it whole.

:class:`TraceStream` is routing data like a :class:`~placer.types.RoutingTrace` (every metric of
:mod:`placer.metrics` takes it), but its tokens come from a re-iterable source of trace chunks,
typically a trace file read piece by piece (:func:`placer.io.routing.gather_routing`). Metrics on
it equal the metrics on the concatenated trace: tokens keep their stream positions (the row
the position rules use, and the round-robin home rank when the trace records none).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from placer.errors import InvalidInputError
from placer.metrics.dispatch import default_home_ranks
from placer.types import ModelSpec, RoutingTrace


@dataclass(frozen=True)
class TraceStream:
    """Per-token routing read as a stream of trace chunks.

    Attributes
    ----------
    chunks : callable returning an iterator of RoutingTrace
        Each call streams the whole trace again, as chunks [t_i, L, K] in token order.
    num_tokens : int or None
        T, the tokens all chunks hold together (checked as they stream); None when it is only
        known once streamed (metrics then count the tokens as they stream, in one pass).
    num_layers, num_experts, top_k : int
        L, E and K of every chunk.
    has_top1 : bool
        Whether every chunk knows its tokens' top-1 expert.
    model : ModelSpec or None
        The model the chunks carry.
    """

    chunks: Callable[[], Iterator[RoutingTrace]]
    num_tokens: int | None
    num_layers: int
    num_experts: int
    top_k: int
    has_top1: bool
    model: ModelSpec | None = None


@dataclass(frozen=True)
class StreamTokens:
    """The tokens of a :class:`TraceStream` resolved for metrics, one piece at a time.

    :meth:`chunks` yields ``(ids int [t, L, K] (top-1 first when ``need_top1``; the trace's
    dtype, int16), home int64 [t], index int64 [t])`` of at most ``chunk_elements``
    token-layer-expert entries, like :meth:`placer.metrics.core.Tokens.chunks` on the
    concatenated trace. ``num_tokens`` is the stream's, or (when it has none) the tokens the
    last pass streamed.
    """

    stream: TraceStream
    need_top1: bool
    num_gpus: int
    chunk_elements: int
    source: str = "trace"
    streamed: list[int] = field(default_factory=lambda: [0])
    """Tokens the last pass streamed (one mutable cell)."""

    @property
    def num_tokens(self) -> int:
        return int(self.stream.num_tokens if self.stream.num_tokens is not None else self.streamed[0])

    @property
    def top_k(self) -> int:
        return int(self.stream.top_k)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        s = self.stream
        step = max(1, self.chunk_elements // max(1, s.num_layers * s.top_k))
        start = 0
        for chunk in s.chunks():
            if (chunk.num_layers, chunk.top_k) != (s.num_layers, s.top_k):
                raise InvalidInputError(f"a chunk has shape [t, {chunk.num_layers}, {chunk.top_k}], the stream "
                                        f"[T, {s.num_layers}, {s.top_k}]", source="trace")
            ids16 = chunk.sorted_ids() if self.need_top1 else chunk.expert_ids  # int16 [t, L, K]
            for lo in range(0, chunk.num_tokens, step):
                hi = min(lo + step, chunk.num_tokens)
                index = np.arange(start + lo, start + hi, dtype=np.int64)
                home = (default_home_ranks(index, self.num_gpus) if chunk.home_rank is None
                        else chunk.home_rank[lo:hi].astype(np.int64))
                if home.size and home.max() >= self.num_gpus:
                    raise InvalidInputError(f"home rank {int(home.max())} is outside the cluster's "
                                            f"{self.num_gpus} GPUs", source="home_rank")
                yield ids16[lo:hi], home, index
            start += chunk.num_tokens
        self.streamed[0] = start
        if s.num_tokens is not None and start != s.num_tokens:
            raise InvalidInputError(f"the trace streamed {start:,} tokens, {s.num_tokens:,} expected "
                                    "(did the file change while it was read?)", source="trace")
