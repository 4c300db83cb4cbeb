"""``placer evaluate`` reads a trace once and scores several placements from one pass, with the
same results as reading it twice (statistics, then metrics) and scoring each placement alone,
under every dispatch rule; traces whose top-1 is unknown and count-only inputs take the two-pass path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from placer.app.workflow import evaluate_placement, write_synthetic
from placer.io import write_stats_npz, write_trace_npz
from placer.io.placements import PlacementFile
from placer.io.routing import check_top1, gather_routing
from placer.metrics import TraceStream, evaluate, evaluate_many
from placer.presets import get_model
from placer.stats import compute_stats
from placer.types import DISPATCH_RULES, Placement, RoutingTrace, Topology


def _placement(rng, model, topology, spg):
    e, p = model.num_experts, spg * topology.num_gpus
    p2l = np.stack([rng.permutation(np.concatenate([np.arange(e), rng.integers(0, e, p - e)]))
                    for _ in range(model.num_moe_layers)])
    return Placement(p2l, spg, e)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A seeded synthetic Mixtral trace (.npz), a trace of unknown expert order, stats, placements with replicas."""
    d = tmp_path_factory.mktemp("onepass")
    model = get_model("mixtral-8x7b")
    trace = d / "trace.npz"
    write_synthetic(model, 1500, seed=4, output=str(trace))
    rng = np.random.default_rng(5)
    topology = Topology("test", 2, 2)
    placements = [_placement(rng, model, topology, 3) for _ in range(3)]
    ids = np.stack([np.stack([rng.choice(model.num_experts, model.top_k, replace=False)
                              for _ in range(model.num_moe_layers)]) for _ in range(400)]).astype(np.int16)
    unknown = d / "unknown.npz"
    write_trace_npz(str(unknown), RoutingTrace(ids, model.num_experts, "unknown", model=model))
    stats = d / "stats.npz"
    write_stats_npz(str(stats), compute_stats(RoutingTrace(ids, model.num_experts, "sorted", model=model)))
    return model, topology, placements, str(trace), str(unknown), str(stats)


def two_pass(pf, inputs, rule, execution):
    """``evaluate_placement`` as it was: statistics gathered first, then the tokens streamed again."""
    routing = gather_routing(inputs, model=pf.model, keep_trace=False, chunk_tokens=50)
    check_top1(routing, execution=execution)
    m = evaluate(pf.placement, pf.topology, routing.model, routing.exact_data, dispatch=rule, execution=execution)
    m["data"]["synthetic"] = routing.synthetic
    m["data"]["inputs"] = list(routing.sources)
    if not m["top1_known"]:
        m["top1_note"] = routing.top1_note
    return m


def same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.parametrize("rule", DISPATCH_RULES)
@pytest.mark.parametrize("execution", ["standard", "context-coherent"])
@pytest.mark.parametrize("which", ["trace", "unknown", "both", "stats"])
def test_one_pass_equals_two_passes(case, rule, execution, which):
    model, topology, placements, trace, unknown, stats = case
    inputs = {"trace": [trace], "unknown": [unknown], "both": [trace, trace], "stats": [trace, stats]}[which]
    pf = PlacementFile(placements[0], model, topology, rule, "test", "feasible", 0.0)
    chunk_mb = 0.05  # about 50 tokens per chunk
    if which == "unknown" and execution == "context-coherent":
        with pytest.raises(Exception, match="top-1") as one:
            evaluate_placement(pf, inputs, dispatch=rule, execution=execution, chunk_mb=chunk_mb)
        with pytest.raises(Exception, match="top-1") as two:
            two_pass(pf, inputs, rule, execution)
        assert str(one.value) == str(two.value)
        return
    got = evaluate_placement(pf, inputs, dispatch=rule, execution=execution, chunk_mb=chunk_mb)
    assert same(got, two_pass(pf, inputs, rule, execution))


@pytest.mark.parametrize("rule", DISPATCH_RULES)
def test_evaluate_many_equals_each_alone(case, rule):
    """Several placements scored from one pass over a stream (its length known or not) equal each
    placement scored alone on the whole trace."""
    model, topology, placements, trace, _, _ = case
    routing = gather_routing([trace], model=model, keep_trace=True)
    known = gather_routing([trace], model=model, keep_trace=False, chunk_tokens=64).stream
    assert known is not None
    unknown_length = TraceStream(known.chunks, None, known.num_layers, known.num_experts, known.top_k,
                                 known.has_top1, known.model)
    want = [evaluate(p, topology, model, routing.trace, dispatch=rule, execution="context-coherent")
            for p in placements]
    for data in (routing.trace, known, unknown_length):
        got = evaluate_many(placements, topology, model, data, dispatch=rule, execution="context-coherent")
        assert all(same(g, w) for g, w in zip(got, want, strict=True))
