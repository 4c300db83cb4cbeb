"""simulate(): determinism, serving and replay runs end to end, context-coherent checks, and the
results directory round trip."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from placer.app.comparison import Candidate, comparison_table, run_comparison
from placer.errors import InvalidInputError
from placer.ilp.simple import contiguous_map, round_robin_map
from placer.presets import make_topology
from placer.simulator.config import ReplayWorkload, ServingWorkload, SimConfig, kernel_preset
from placer.simulator.report import render_report
from placer.simulator.results import SUMMARY_KEYS, TABLES, read_results, write_results
from placer.simulator.simulate import simulate, simulate_many
from placer.synthetic import synthesize_trace
from placer.types import ModelSpec, Placement, RoutingTrace

pytestmark = pytest.mark.timeout(60)

MODEL = ModelSpec(name="t", num_hidden_layers=2, moe_layer_ids=(0, 1), num_experts=8, top_k=2, hidden_size=256,
                  expert_ffn_size=512)
TOPO = make_topology("h100", gpus=4)
CONTIGUOUS = Placement(contiguous_map(2, 8, 8), 2, 8)
ROUND_ROBIN = Placement(round_robin_map(2, 8, 4, 2), 2, 8)
LOW_LOAD = ServingWorkload(rate=20.0, duration_s=0.5, prompt_len=32, output_len=6)
CONFIG = SimConfig(seed=3, pool_size=512)


@pytest.fixture(scope="module")
def serving_run():
    return simulate(CONTIGUOUS, TOPO, MODEL, workload=LOW_LOAD, config=CONFIG, label="contiguous")


def test_same_seed_gives_identical_results(serving_run):
    again = simulate(CONTIGUOUS, TOPO, MODEL, workload=LOW_LOAD, config=CONFIG, label="contiguous")
    assert again.summary == serving_run.summary
    for name in TABLES:
        pd.testing.assert_frame_equal(again.tables[name], serving_run.tables[name])
    other = simulate(CONTIGUOUS, TOPO, MODEL, workload=LOW_LOAD, config=SimConfig(seed=4, pool_size=512))
    assert other.summary != serving_run.summary


def test_serving_at_low_load_finishes_every_request(serving_run):
    s, req = serving_run.summary, serving_run.tables["requests"]
    assert s["requests"] == len(req) > 0
    assert s["requests_finished"] == s["requests"]
    assert np.isfinite(req["finish_s"]).all()
    assert (req["ttft_s"] > 0).all() and (req["e2e_s"] >= req["ttft_s"]).all()
    assert (req["first_token_s"] >= req["arrival_s"]).all()
    # Every prompt token is prefilled once, then output - 1 tokens are decoded (the prefill's
    # last chunk yields the first output token).
    assert s["tokens"] == int((req["prompt_tokens"] + req["output_tokens"] - 1).sum())
    assert s["output_tok_s"] == pytest.approx(req["output_tokens"].sum() / s["simulated_s"])
    it = serving_run.tables["iterations"]
    assert s["iterations"] == len(it) > 0
    assert (np.diff(it["start_s"]) >= it["duration_s"].iloc[:-1] - 1e-15).all()  # steps never overlap
    assert s["simulated_s"] == pytest.approx(it["start_s"].iloc[-1] + it["duration_s"].iloc[-1])
    assert s["simulated_s"] <= 2 * LOW_LOAD.duration_s
    assert s["routing_pool"] == "synthetic:t" and "kv_replication" not in s
    for key in ("ttft_p99_s", "tpot_p50_s", "e2e_p99_s", "a2a_p99_s"):
        assert s[key] is not None and s[key] > 0
    assert set(SUMMARY_KEYS) <= set(s)


def test_serving_respects_max_steps():
    capped = simulate(CONTIGUOUS, TOPO, MODEL, config=CONFIG,
                      workload=ServingWorkload(rate=20.0, duration_s=0.5, prompt_len=32, output_len=6, max_steps=5))
    assert capped.summary["iterations"] == 5


@pytest.fixture(scope="module")
def trace():
    return synthesize_trace(MODEL, 256, seed=1)


def test_replay_runs_the_whole_trace(trace):
    out = simulate(CONTIGUOUS, TOPO, MODEL, routing=trace, workload=ReplayWorkload(tokens_per_rank=8),
                   config=CONFIG)
    s = out.summary
    assert s["iterations"] == 256 // (8 * 4)
    assert s["tokens"] == 256
    assert s["routing_pool"] == "trace-tokens"
    assert s["requests"] == 0 and s["ttft_p99_s"] is None and out.tables["requests"].empty
    assert (out.tables["iterations"]["decode_tokens"] == 32).all()
    # Every token's pairs are computed once: gpu_load holds the mean pairs per step.
    assert out.tables["gpu_load"]["pairs"].sum() * s["iterations"] == pytest.approx(256 * 2 * 2)


def test_replay_wraps_when_asked(trace):
    out = simulate(CONTIGUOUS, TOPO, MODEL, routing=trace,
                   workload=ReplayWorkload(tokens_per_rank=8, iterations=20, wrap=True), config=CONFIG)
    assert out.summary["iterations"] == 20 and out.summary["tokens"] == 20 * 32


def test_replay_without_a_trace_samples_the_routing():
    out = simulate(CONTIGUOUS, TOPO, MODEL, workload=ReplayWorkload(tokens_per_rank=4, iterations=7), config=CONFIG)
    assert out.summary["iterations"] == 7 and out.summary["tokens"] == 7 * 16


@pytest.mark.parametrize("kernel", ["nccl", "deepep-normal", "deepep-ll"])
@pytest.mark.parametrize("congestion", ["none", "fifo"])
@pytest.mark.parametrize("level", ["count", "token"])
def test_every_kernel_congestion_and_level_runs(kernel, congestion, level):
    topo = make_topology("h100", gpus=4, nodes=2)
    config = SimConfig(network=kernel_preset(kernel, congestion=congestion), seed=0, pool_size=256)
    out = simulate(ROUND_ROBIN, topo, MODEL, workload=ReplayWorkload(tokens_per_rank=4, iterations=3),
                   config=config, level=level)
    s = out.summary
    assert s["iterations"] == 3 and s["rdma_bytes"] > 0 and s["nvlink_bytes"] >= 0
    assert s["dispatch_s"] > 0 and s["combine_s"] > 0


def test_context_coherent_reports_kv_replication(trace):
    config = SimConfig(execution="context-coherent", seed=0, pool_size=256)
    out = simulate(CONTIGUOUS, TOPO, MODEL, workload=ServingWorkload(rate=10.0, duration_s=0.3, prompt_len=16,
                                                                    output_len=4), config=config)
    assert out.summary["kv_replication"] == TOPO.num_gpus
    assert out.summary["requests_finished"] == out.summary["requests"] > 0
    replay = simulate(CONTIGUOUS, TOPO, MODEL, routing=trace, workload=ReplayWorkload(tokens_per_rank=8),
                      config=config)
    assert replay.summary["kv_replication"] == TOPO.num_gpus and replay.summary["tokens"] == 256


def test_context_coherent_needs_the_top1_expert(trace):
    unordered = RoutingTrace(np.asarray(trace.expert_ids), 8, order="unknown")
    assert not unordered.has_top1
    config = SimConfig(execution="context-coherent", seed=0, pool_size=256)
    with pytest.raises(InvalidInputError, match="top-1"):
        simulate(CONTIGUOUS, TOPO, MODEL, routing=unordered, workload=ReplayWorkload(tokens_per_rank=8),
                 config=config)
    with pytest.raises(InvalidInputError, match="top-1"):
        simulate(CONTIGUOUS, TOPO, MODEL, routing=unordered, workload=LOW_LOAD, config=config)
    # Standard execution does not need it; gate weights restore the order.
    assert simulate(CONTIGUOUS, TOPO, MODEL, routing=unordered, workload=ReplayWorkload(tokens_per_rank=8),
                    config=SimConfig(seed=0)).summary["tokens"] == 256
    weighted = RoutingTrace(np.asarray(trace.expert_ids), 8, order="unknown",
                            gate_weights=np.asarray(trace.gate_weights))
    assert simulate(CONTIGUOUS, TOPO, MODEL, routing=weighted, workload=ReplayWorkload(tokens_per_rank=8),
                    config=config).summary["kv_replication"] == 4


def test_bad_inputs_raise_invalid_input():
    with pytest.raises(InvalidInputError, match="level"):
        simulate(CONTIGUOUS, TOPO, MODEL, workload=LOW_LOAD, level="bytes")
    sizeless = ModelSpec.from_shape(2, 8, 2, name="sizeless")
    with pytest.raises(InvalidInputError, match="sizes"):
        simulate(CONTIGUOUS, TOPO, sizeless, workload=LOW_LOAD)
    with pytest.raises(InvalidInputError, match="execution"):
        simulate(CONTIGUOUS, TOPO, MODEL, workload=LOW_LOAD, config=SimConfig(execution="pipelined"))


def test_results_round_trip_and_report(tmp_path, trace):
    candidates = [Candidate("contiguous", CONTIGUOUS, None, "contiguous"),
                  Candidate("round-robin", ROUND_ROBIN, None, "round-robin")]
    info = {"source": "synthetic:t", "sha256": None, "tokens": trace.num_tokens}
    out = tmp_path / "res"
    runs = run_comparison(candidates, TOPO, MODEL, routing=trace, routing_info=info,
                          workload=ReplayWorkload(tokens_per_rank=8), config=CONFIG, output=str(out))
    assert [r.label for r in runs] == ["contiguous", "round-robin"]
    res = read_results(out)
    assert res.labels == ["contiguous", "round-robin"]
    for run in runs:
        got = res.summaries[run.label]
        for key, value in run.summary.items():
            assert got[key] == (pytest.approx(value) if isinstance(value, float) else value), key
        assert len(res.rows("iterations", run.label)) == run.summary["iterations"]
        pd.testing.assert_frame_equal(res.rows("layers", run.label), run.tables["layers"][list(TABLES["layers"])],
                                      check_dtype=False)
    assert res.inputs["config"]["level"] == "count" and res.inputs["workload"]["kind"] == "replay"
    assert json.loads((out / "metrics.json").read_text())["inputs"]["routing"] == info
    html = tmp_path / "report.html"
    render_report(out, html)
    text = html.read_text()
    assert "contiguous" in text and "round-robin" in text
    table = comparison_table(runs)
    assert table.splitlines()[0].split() == ["metric", "contiguous", "round-robin", "round-robin/contiguous"]


def test_serving_results_write_and_read(tmp_path, serving_run):
    inputs = {"model": MODEL.to_dict(), "topology": TOPO.to_dict(), "routing": {"source": "synthetic:t"},
              "placements": {"contiguous": {"path": None, "sha256": None, "method": "contiguous"}},
              "workload": {"kind": "serving"}, "config": CONFIG.to_dict()}
    write_results(tmp_path, inputs, [serving_run])
    res = read_results(tmp_path)
    req = res.rows("requests", "contiguous")
    assert len(req) == serving_run.summary["requests"]
    np.testing.assert_allclose(req["e2e_s"], serving_run.tables["requests"]["e2e_s"])


def test_simulate_many_uses_the_same_arrivals():
    a, b = simulate_many([("c", CONTIGUOUS), ("r", ROUND_ROBIN)], TOPO, MODEL, workload=LOW_LOAD, config=CONFIG)
    assert (a.label, b.label) == ("c", "r")
    pd.testing.assert_series_equal(a.tables["requests"]["arrival_s"], b.tables["requests"]["arrival_s"])
    pd.testing.assert_series_equal(a.tables["requests"]["prompt_tokens"], b.tables["requests"]["prompt_tokens"])


def test_replay_runs_every_token_of_a_trace_that_is_not_a_whole_number_of_steps():
    trace = synthesize_trace(MODEL, 300, seed=2)
    out = simulate(CONTIGUOUS, TOPO, MODEL, routing=trace, workload=ReplayWorkload(tokens_per_rank=8), config=CONFIG)
    assert out.summary["tokens"] == 300


def test_replay_of_a_trace_shorter_than_one_step_runs_it_once():
    trace = synthesize_trace(MODEL, 20, seed=2)
    out = simulate(CONTIGUOUS, TOPO, MODEL, routing=trace, workload=ReplayWorkload(tokens_per_rank=8), config=CONFIG)
    assert out.summary["iterations"] == 1 and out.summary["tokens"] == 20


REPLICATED = Placement(np.array([[0, 1, 2, 3, 4, 0, 5, 6, 1, 7, 2, 3],
                                 [7, 6, 5, 4, 3, 7, 2, 1, 6, 0, 5, 4]]), 3, 8)


@pytest.mark.parametrize("dispatch", ["nearest", "sglang-static", "sglang-dynamic", "vllm"])
@pytest.mark.parametrize("execution", ["standard", "context-coherent"])
def test_every_dispatch_rule_and_execution_mode_runs(trace, dispatch, execution):
    topo = make_topology("h100", gpus=4, nodes=2)
    config = SimConfig(dispatch=dispatch, execution=execution, seed=0, pool_size=256)
    replay = simulate(REPLICATED, topo, MODEL, routing=trace, config=config,
                      workload=ReplayWorkload(tokens_per_rank=8, iterations=3))
    assert replay.summary["tokens"] == 96
    count = simulate(REPLICATED, topo, MODEL, config=config, workload=ReplayWorkload(tokens_per_rank=8, iterations=3))
    assert count.summary["tokens"] == 96
    for out in (replay, count):
        assert out.tables["gpu_load"]["pairs"].sum() == pytest.approx(32 * 2 * 2)  # 32 tokens x 2 layers x top-2
        assert 0 < out.summary["max_link_utilisation"] <= 1


def test_serving_scheduler_chunks_prefill_within_the_token_budget():
    from placer.simulator.scheduler import ServingScheduler
    from placer.simulator.workload import Arrivals
    workload = ServingWorkload(token_budget=8, max_running=2)
    arrivals = Arrivals(time_s=np.array([0.0, 0.0, 0.0, 0.0, 0.0]), prompt=np.array([20, 5, 3, 12, 9]),
                        output=np.array([3, 1, 4, 2, 5]))
    sched = ServingScheduler(arrivals, workload, num_gpus=2, kv_capacity=10_000, replicate_kv=False)
    for r in range(5):
        sched.on_arrival(r)
    # Each to the rank with the least outstanding tokens: 23 | 6, 13, 27 -> request 4 to rank 0.
    assert sched.rank.tolist() == [0, 1, 1, 1, 0]
    chunks = np.zeros(5, dtype=np.int64)
    now, steps = 0.0, 0
    while (step := sched.next_step()) is not None:
        assert np.all(step.shape.tokens <= 8)
        running = np.bincount(sched.rank[sched.admitted & np.isnan(sched.finish_s)], minlength=2)
        assert np.all(running <= 2)
        for r, c in step.prefill:
            chunks[r] += c
        now += 1.0
        sched.finish_step(step, now)
        steps += 1
        assert steps < 100
    np.testing.assert_array_equal(chunks, arrivals.prompt)
    np.testing.assert_array_equal(sched.generated, arrivals.output)
    assert np.isfinite(sched.finish_s).all() and np.all(sched.first_token_s <= sched.finish_s)
    assert not sched.kv_used.any()  # every reservation released


def test_kv_capacity_errors_name_the_input():
    from placer.presets import get_model
    from placer.types import Topology
    mixtral = get_model("mixtral-8x7b")
    placement = Placement(contiguous_map(32, 8, 8), 2, 8)
    with pytest.raises(InvalidInputError, match="KV capacity") as err:
        simulate(placement, TOPO, mixtral, workload=ServingWorkload(rate=1.0, duration_s=1.0, prompt_len=2_000_000,
                                                                   length_dist="fixed"))
    assert err.value.source == "--prompt-len"
    small = Topology(name="small", num_nodes=1, gpus_per_node=4, memory_bytes=26e9)
    with pytest.raises(InvalidInputError, match="no room"):
        simulate(placement, small, mixtral, workload=ServingWorkload(rate=1.0, duration_s=1.0))
