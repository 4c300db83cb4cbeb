"""Routing gathered from inputs of any supported format: one model agreed on, statistics
streamed, the whole trace kept when it is small enough (:func:`gather_routing`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from placer._progress import TOKENS_READ, TOKENS_SCORED, report
from placer.display import format_value
from placer.errors import InvalidInputError
from placer.io.external import MEGATRON_ASCENDING_NOTE
from placer.io.traces import RoutingInput, read_input
from placer.metrics.stream import TraceStream
from placer.stats import DEFAULT_SAMPLE_SIZE, StatsBuilder, merge_stats
from placer.types import PHASE_CODES, ModelSpec, RoutingStats, RoutingTrace

KEEP_TRACE_BYTES = 512 * 2**20
"""A trace whose arrays take at most this many bytes is also kept whole (``gather_routing(...,
keep_trace=True)``: simulate, report, sweep); joining its chunks doubles that briefly. Sorted
traces are kept without gate weights: about 578 k DeepSeek-V3 tokens (928 bytes each) or
8 M Mixtral tokens. A larger trace is streamed only (``Routing.stream``: metrics and a simulator
replay read it chunk by chunk), and what needs tokens in memory (a serving simulation's routing
pool, the report's per-token views) uses the statistics' sample instead (:attr:`Routing.trace_note`
says so)."""


@dataclass(frozen=True)
class Routing:
    """Routing gathered from one or more inputs.

    ``stats`` always exists. ``trace`` holds every token when all inputs are per-token traces
    of at most :data:`KEEP_TRACE_BYTES` (after the phase filter) and the caller kept it, else
    it is None and metrics fall back to the statistics and their sample (``trace_note`` says
    why when the trace was too large). ``stream`` gives
    every token again, chunk by chunk, when all inputs are per-token (None with count-only ones):
    metrics on it are exact on every token in memory bounded by one chunk.
    """

    stats: RoutingStats
    trace: RoutingTrace | None
    model: ModelSpec
    sources: tuple[str, ...]
    synthetic: bool
    top1_source: str | None = None
    """The first input whose top-1 expert is unknown (None when every input's is known)."""
    top1_reason: str | None = None
    """Why that input's top-1 is unknown (see :func:`top1_reason`)."""
    stream: TraceStream | None = None
    trace_note: str | None = None
    """Why a per-token trace the caller asked to keep was not kept (its size), else None."""

    @property
    def data(self) -> RoutingTrace | RoutingStats:
        return self.trace if self.trace is not None else self.stats

    @property
    def exact_data(self) -> RoutingTrace | TraceStream | RoutingStats:
        """What metrics are exact on: the kept trace, else the streamed one, else the statistics."""
        if self.trace is not None:
            return self.trace
        return self.stream if self.stream is not None else self.stats

    @property
    def top1_note(self) -> str | None:
        """``"SOURCE: why"`` when the top-1 expert of the routing is unknown, else None."""
        return None if self.top1_reason is None else f"{self.top1_source}: {self.top1_reason}"


TOP1_METHODS = ("exflow",)
"""Methods whose objective is top-1 transitions: they refuse routing whose top-1 is unknown."""


def top1_reason(format: str, kind: str) -> str:
    """Why an input of ``format`` (``kind`` "trace" or "stats") has no known top-1 expert."""
    if format == "megatron-jsonl":
        return MEGATRON_ASCENDING_NOTE
    if kind == "stats":
        return "the statistics hold no top-1 transitions (counts only, or built from routing of unknown order)"
    return "the trace's expert order is unknown and it carries no gate weights; top-1 unknown"


def check_top1(routing: Routing | None, *, execution: str = "standard", methods: Sequence[str] = ()) -> None:
    """Refuse (InvalidInputError naming the input) when ``execution`` or one of ``methods`` needs each
    token's top-1 expert and ``routing`` does not know it; nothing to check without routing."""
    if routing is None or routing.top1_reason is None:
        return
    needs = [f"method {m}" for m in dict.fromkeys(methods) if m in TOP1_METHODS]
    if execution == "context-coherent":
        needs.insert(0, "context-coherent execution")
    if needs:
        raise InvalidInputError(f"{' and '.join(needs)} needs the top-1 expert of each token, but "
                                f"{routing.top1_reason}", source=str(routing.top1_source))


def agree_model(explicit: ModelSpec | None, found: Sequence[tuple[str, ModelSpec | None]]) -> ModelSpec | None:
    """The one model of a command: ``--model`` and every input header must agree."""
    model = explicit
    for source, m in found:
        if m is None:
            continue
        if model is None:
            model = m
        elif (m.num_moe_layers, m.num_experts, m.top_k) != (model.num_moe_layers, model.num_experts, model.top_k):
            raise InvalidInputError(f"describes model {m.name} ({m.num_moe_layers} MoE layers, E={m.num_experts}, "
                                    f"top_k={m.top_k}), which contradicts {model.name} ({model.num_moe_layers} "
                                    f"MoE layers, E={model.num_experts}, top_k={model.top_k})", source=source)
    return model


def _filter_phase(chunk: RoutingTrace, phase: str, source: str) -> RoutingTrace:
    """``chunk``'s tokens of ``phase`` (``"all"``: every token); an input that records no phases
    exits 2 naming ``source`` for any other phase."""
    if phase == "all":
        return chunk
    if chunk.phase is None:
        raise InvalidInputError(f"cannot select phase {phase!r}: the input records no phases", source=source)
    return chunk.select_tokens(chunk.phase == PHASE_CODES[phase])


def _fit_chunk(chunk: RoutingTrace, model: ModelSpec, source: str) -> RoutingTrace:
    """``chunk`` checked against ``model``'s shape and carrying it (E widened to the model's)."""
    if (chunk.num_layers, chunk.top_k) != (model.num_moe_layers, model.top_k) or \
            chunk.num_experts > model.num_experts:
        raise InvalidInputError(f"routing shape [T, {chunk.num_layers}, {chunk.top_k}] with E={chunk.num_experts} "
                                f"does not match {model.name} ({model.num_moe_layers} MoE layers, "
                                f"E={model.num_experts}, top_k={model.top_k})", source=source)
    if chunk.num_experts != model.num_experts or chunk.model != model:  # else: validated already
        chunk = RoutingTrace(chunk.expert_ids, model.num_experts, chunk.order, chunk.gate_weights,
                             chunk.request_ids, chunk.phase, chunk.home_rank, model)
    return chunk


def stream_chunks(read: Sequence[RoutingInput], phase: str, model: ModelSpec,
                  total_tokens: int) -> Callable[[], Iterator[RoutingTrace]]:
    """A re-iterable stream of every per-token input's chunks, phase-filtered and fitted to
    ``model``; each pass reports its tokens (:data:`placer._progress.TOKENS_SCORED`)."""
    def chunks() -> Iterator[RoutingTrace]:
        done = 0
        for r in read:
            assert r.chunks is not None
            for chunk in r.chunks():
                chunk = _fit_chunk(_filter_phase(chunk, phase, r.source), model, r.source)
                yield chunk
                done += chunk.num_tokens
                report(TOKENS_SCORED, done, total_tokens)
    return chunks


def chunk_tokens_for(model: ModelSpec, chunk_mb: float) -> int:
    """Tokens per chunk so that reading and scoring one chunk of ``model`` routing takes about
    ``chunk_mb`` MiB (ids, gate weights, their filtered and sorted copies: ~16 bytes per
    token-layer-expert entry)."""
    if not chunk_mb > 0:
        raise InvalidInputError(f"the chunk budget must be positive, got {chunk_mb} MB", source="--chunk-mb")
    return max(1, int(chunk_mb * 2**20) // (16 * model.num_moe_layers * model.top_k))


def concat_traces(chunks: list[RoutingTrace], model: ModelSpec) -> RoutingTrace:
    if len(chunks) == 1 and chunks[0].model == model:
        return chunks[0]
    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(c, name) for c in chunks]
        return None if any(p is None for p in parts) else np.concatenate(parts)
    sorted_order = all(c.order == "sorted" for c in chunks)
    return RoutingTrace(np.concatenate([c.expert_ids for c in chunks]), model.num_experts,
                        "sorted" if sorted_order else "unknown", cat("gate_weights"), cat("request_ids"),
                        cat("phase"), cat("home_rank"), model)


def gather_routing(inputs: Sequence[str], *, model: ModelSpec | None = None, phase: str = "all",
                   sample_size: int = DEFAULT_SAMPLE_SIZE, seed: int = 0,
                   keep_trace: bool = True, chunk_tokens: int = 65536) -> Routing:
    """Read and merge routing inputs of any supported format into one :class:`Routing`.

    Per-token inputs stream through one :class:`StatsBuilder` (memory bounded by the
    statistics) in chunks of ``chunk_tokens``; count-only inputs (load matrices, SGLang stat
    dumps) merge in as counts. ``keep_trace=False`` holds no token (use ``Routing.stream``).
    """
    if not inputs:
        raise InvalidInputError("no routing input given", source="TRACE")
    # Nothing downstream reads the gate weights of a sorted trace (statistics, metrics and the
    # simulator take the ids in order): they are not read.
    read = [read_input(path, model=model, chunk_tokens=chunk_tokens, gate_weights=False) for path in inputs]
    model = agree_model(model, [(r.source, r.model) for r in read])
    builder: StatsBuilder | None = None
    kept: list[RoutingTrace] = []
    count_only: list[RoutingStats] = []
    kept_tokens = kept_bytes = 0
    top1_source = top1_why = None
    for r in read:
        if r.kind == "stats":
            assert r.stats is not None
            if top1_why is None and not r.stats.has_top1:
                top1_source, top1_why = r.source, top1_reason(r.format, "stats")
            if phase != "all" and r.stats.phase != phase:
                raise InvalidInputError(f"holds {r.stats.phase} counts only; cannot select phase {phase!r}",
                                        source=r.source)
            count_only.append(r.stats)
            continue
        assert r.chunks is not None
        for chunk in r.chunks():
            chunk = _filter_phase(chunk, phase, r.source)
            if model is None:
                model = ModelSpec.from_shape(chunk.num_layers, chunk.num_experts, chunk.top_k)
            chunk = _fit_chunk(chunk, model, r.source)
            if top1_why is None and not chunk.has_top1:
                top1_source, top1_why = r.source, top1_reason(r.format, "trace")
            if builder is None:
                builder = StatsBuilder(model.num_moe_layers, model.num_experts, model.top_k,
                                       sample_size=sample_size, seed=seed, model=model)
            builder.update(chunk)
            kept_tokens += chunk.num_tokens
            report(TOKENS_READ, kept_tokens, 0)
            if keep_trace and kept_bytes <= KEEP_TRACE_BYTES:
                kept_bytes += _nbytes(chunk)
                if kept_bytes <= KEEP_TRACE_BYTES:
                    kept.append(chunk)
                else:
                    kept.clear()  # too large to keep whole: its memory goes back now
    parts = ([builder.result("all", final=True)] if builder is not None else []) + count_only
    if model is None:
        first = count_only[0]
        model = ModelSpec.from_shape(first.num_layers, first.num_experts, first.top_k)
    for s in parts:
        if s.load.shape != (model.num_moe_layers, model.num_experts):
            raise InvalidInputError(f"counts of shape {s.load.shape} do not match {model.name} "
                                    f"({model.num_moe_layers} MoE layers x {model.num_experts} experts)",
                                    source="input")
    stats = merge_stats(parts) if len(parts) > 1 else parts[0]
    stats = replace(stats, model=model, phase=phase)
    trace = note = None
    if keep_trace and not count_only and kept and kept_bytes <= KEEP_TRACE_BYTES:
        trace = concat_traces(kept, model)
    elif keep_trace and not count_only and kept_bytes > KEEP_TRACE_BYTES:
        note = (f"the trace ({kept_tokens:,} tokens) is larger than the {format_value('bytes', KEEP_TRACE_BYTES)} "
                f"kept in memory: its statistics' sample of {stats.sample_size:,} tokens stands for it")
    stream = None
    if not count_only:
        stream = TraceStream(stream_chunks(read, phase, model, kept_tokens), kept_tokens, model.num_moe_layers,
                             model.num_experts, model.top_k, top1_why is None, model)
    synthetic = any(r.synthetic for r in read)
    return Routing(stats=stats, trace=trace, model=model, sources=tuple(r.source for r in read),
                   synthetic=synthetic, top1_source=top1_source, top1_reason=top1_why, stream=stream,
                   trace_note=note)


def _nbytes(chunk: RoutingTrace) -> int:
    """Bytes of a chunk's arrays."""
    return sum(a.nbytes for a in (chunk.expert_ids, chunk.gate_weights, chunk.request_ids, chunk.phase,
                                  chunk.home_rank) if a is not None)
