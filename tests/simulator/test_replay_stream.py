"""A replay of a streamed trace (read chunk by chunk, again from the start when it wraps) runs
exactly as the replay of the same trace held whole."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from placer.errors import InvalidInputError
from placer.ilp import PlacementProblem, solve
from placer.io.common import chunker
from placer.metrics import TraceStream
from placer.presets import get_model, make_topology
from placer.simulator import ReplayWorkload, SimConfig, simulate
from placer.simulator.replay import StreamedTrace, WholeTrace
from placer.stats import compute_stats
from placer.synthetic import synthesize_trace

pytestmark = pytest.mark.timeout(120)


def _stream(trace, step: int) -> TraceStream:
    return TraceStream(chunker(trace, step), trace.num_tokens, trace.num_layers, trace.num_experts, trace.top_k,
                       trace.has_top1, trace.model)


def test_windows_equal_the_whole_trace_in_any_order_of_chunks():
    model = get_model("mixtral-8x7b")
    trace = synthesize_trace(model, 250, seed=4)
    trace = replace(trace, home_rank=(np.arange(250) * 7 % 5).astype(np.int32))
    whole = WholeTrace(trace)
    for step in (1, 13, 64, 250, 1000):
        streamed = StreamedTrace(_stream(trace, step))
        windows = [np.arange(a, b) % 250 for a, b in ((0, 40), (40, 80), (80, 90), (90, 250), (240, 290), (30, 35),
                                                      (0, 250))]
        for idx in windows:
            for (a, ha), (b, hb) in [(whole.rows(idx), streamed.rows(idx))]:
                np.testing.assert_array_equal(a, b)
                np.testing.assert_array_equal(ha, hb)
        with pytest.raises(InvalidInputError, match="outside the trace"):
            streamed.rows(np.arange(249, 252))


@pytest.mark.parametrize("wrap,overlap", [(False, "none"), (True, "none"), (True, "two-batch")])
def test_streamed_replay_equals_the_whole_replay(wrap, overlap):
    model = get_model("mixtral-8x7b")
    trace = synthesize_trace(model, 700, seed=5)
    topology = make_topology("h100", gpus=4, nodes=2)
    placement = solve(PlacementProblem(compute_stats(trace), model, topology, num_redundant=4), "eplb").placement
    workload = ReplayWorkload(tokens_per_rank=32, iterations=9 if wrap else None, wrap=wrap)
    config = SimConfig(overlap=overlap)
    a = simulate(placement, topology, model, routing=trace, workload=workload, config=config)
    b = simulate(placement, topology, model, routing=_stream(trace, 57), workload=workload, config=config)
    assert a.summary == b.summary
    assert a.summary["routing_pool"] == "trace-tokens"


def test_a_stream_is_only_replayed():
    model = get_model("mixtral-8x7b")
    trace = synthesize_trace(model, 100, seed=1)
    topology = make_topology("h100", gpus=4, nodes=2)
    placement = solve(PlacementProblem(compute_stats(trace), model, topology, num_redundant=4), "eplb").placement
    with pytest.raises(InvalidInputError, match="only be replayed"):
        simulate(placement, topology, model, routing=_stream(trace, 10))
