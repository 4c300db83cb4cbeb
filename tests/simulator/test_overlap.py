"""Two-batch overlap: the split of a step into micro-batches, the schedule of the two chains, the
bounds every overlapped step obeys (max(C, A) <= step <= C + A), most of the all-to-all hidden
when compute dominates, and ``overlap="none"`` leaving the default path as it was."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placer.cli import main
from placer.errors import InvalidInputError
from placer.ilp.simple import contiguous_map
from placer.metrics.dispatch import dispatch_table
from placer.presets import make_topology
from placer.simulator.config import (
    OVERLAP_MODES,
    ReplayWorkload,
    ServingWorkload,
    SimConfig,
    kernel_preset,
)
from placer.simulator.cost import BatchShape, CostModel, PhaseKind, StepCost, phase_kinds
from placer.simulator.cost.overlap import (
    TwoBatchOverlap,
    halves,
    micro_batch_of,
    overlap_step_cost,
    route_micro_batches,
    split_batch,
    two_batch_schedule,
)
from placer.simulator.report import render_report
from placer.simulator.results import TABLES, RunOutput, read_results, write_results
from placer.simulator.routing import token_traffic
from placer.simulator.simulate import simulate
from placer.synthetic import synthesize_trace
from placer.types import ModelSpec, Placement

pytestmark = pytest.mark.timeout(120)

K = PhaseKind
COMM = (K.DISPATCH, K.COMBINE)
# Eight hidden layers, the first dense: a decode step of 8 attention, 1 dense, 7 MoE layers.
MODEL = ModelSpec(name="t", num_hidden_layers=8, moe_layer_ids=tuple(range(1, 8)), num_experts=16, top_k=2,
                  hidden_size=1024, expert_ffn_size=2048)
TOPO = make_topology("h100", gpus=4, nodes=2)  # two nodes: dispatch crosses NVLink and RDMA
PLACEMENT = Placement(contiguous_map(7, 16, 16), 4, 16)
TWO_BATCH = SimConfig(overlap="two-batch", seed=1, pool_size=256)


# --------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("home", "expected"), [
    pytest.param([0, 0, 0, 0], [0, 0, 1, 1], id="even: two and two"),
    pytest.param([1, 1, 1], [0, 0, 1], id="odd: the first takes the odd token"),
    pytest.param([0, 1, 0, 1, 0], [0, 0, 0, 1, 1], id="interleaved ranks keep their order"),
    pytest.param([2], [0], id="one token: micro-batch 1 empty"),
])
def test_each_rank_gives_its_first_half_to_micro_batch_0(home, expected):
    mb = micro_batch_of(np.array(home), 4)
    assert mb.tolist() == expected
    counts = np.bincount(home, minlength=4)
    assert np.bincount(np.array(home)[mb == 0], minlength=4).tolist() == halves(counts)[0].tolist()


def test_split_batch_keeps_each_ranks_mix_and_sums_to_the_batch():
    batch = BatchShape(prefill_tokens=np.array([0.0, 6.0, 0.0]), decode_tokens=np.array([5.0, 2.0, 0.0]),
                       decode_context=np.array([500.0, 80.0, 0.0]), prefill_positions=np.array([0.0, 15.0, 0.0]))
    mb0, mb1 = split_batch(batch)
    assert mb0.tokens.tolist() == [3.0, 4.0, 0.0] and mb1.tokens.tolist() == [2.0, 4.0, 0.0]
    assert mb0.decode_tokens.tolist() == [3.0, 1.0, 0.0]  # rank 1: 2 of its 8 tokens decode, so 1 of 4
    for name in ("prefill_tokens", "decode_tokens", "decode_context", "prefill_positions"):
        np.testing.assert_allclose(getattr(mb0, name) + getattr(mb1, name), getattr(batch, name))


def test_token_level_micro_batches_partition_the_steps_traffic():
    trace = synthesize_trace(MODEL, 64, seed=3)
    ids = np.asarray(trace.sorted_ids(), dtype=np.int64)
    index, home = np.arange(64), np.arange(64) % 4
    table = dispatch_table(PLACEMENT, TOPO, "nearest", 0)

    def route(tokens, token_index, token_home):
        return token_traffic(PLACEMENT, TOPO, ids[token_index], token_home, index=token_index, table=table)

    split = route_micro_batches(route, np.bincount(home, minlength=4).astype(float), index, home, 4)
    whole = route(None, index, home)
    assert [p.num_tokens for p in split.parts] == [32.0, 32.0]
    for name in ("src", "tokens", "nodes", "pairs", "slots"):  # tokens are split, so every count adds up
        np.testing.assert_array_equal(getattr(split, name), getattr(whole, name))
    overlapped = TwoBatchOverlap(CostModel(MODEL, TOPO, PLACEMENT, TWO_BATCH))
    zero = np.zeros(4)
    batch = BatchShape(zero, zero, zero, zero)
    with pytest.raises(TypeError, match="SplitTraffic"):  # the whole step's traffic cannot be split
        overlapped.step_cost(whole, batch)


# --------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------

def _check_schedule(on_comm: np.ndarray, durations: np.ndarray) -> float:
    """Assert the schedule's rules; returns its makespan."""
    start, end = two_batch_schedule(on_comm, durations)
    assert (start[:, 1:] >= end[:, :-1]).all()  # each chain in its order
    for resource in (on_comm, ~on_comm):  # one operation at a time per resource
        s, e = start[:, resource].ravel(), end[:, resource].ravel()
        order = np.lexsort((e, s))
        assert (s[order][1:] >= e[order][:-1]).all()
    c, a = durations[:, ~on_comm].sum(), durations[:, on_comm].sum()
    makespan = float(end.max())
    assert max(c, a) * (1 - 1e-12) <= makespan <= (c + a) * (1 + 1e-12)  # up to the order of float sums
    return makespan


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 1e-3), st.floats(0, 1e-3)), min_size=1, max_size=40))
def test_any_two_chains_obey_the_bounds(ops):
    on_comm = np.array([o[0] for o in ops])
    _check_schedule(on_comm, np.array([[o[1] for o in ops], [o[2] for o in ops]]))


def test_balanced_layers_pipeline_with_only_the_last_combine_exposed():
    # Per layer and micro-batch: attention 10, dispatch 8, experts 10, combine 8 (compute 20 >= comm 16).
    layers = 6
    kinds = np.tile([K.ATTENTION, K.DISPATCH, K.COMPUTE, K.COMBINE], layers)
    on_comm = np.isin(kinds, COMM)
    durations = np.tile([10.0, 8.0, 10.0, 8.0], (2, layers))
    start, _ = two_batch_schedule(on_comm, durations)
    assert start[:, :4].tolist() == [[0, 10, 20, 30], [10, 20, 30, 40]]  # micro-batch 0 first on the tie at 10
    assert _check_schedule(on_comm, durations) == 2 * 20 * layers + 8  # compute never idles; one combine exposed


def test_runs_of_compute_alternate_between_the_micro_batches():
    # Three dense layers (attention, FFN: compute only): the waiting micro-batch goes next on a tie.
    start, _ = two_batch_schedule(np.zeros(6, dtype=bool), np.ones((2, 6)))
    assert start.tolist() == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]


def _step_cost(kinds: np.ndarray, durations: np.ndarray, layers: int) -> StepCost:
    zeros, g = np.zeros(layers), np.zeros((2, 2))
    per_layer = [durations[kinds == k] for k in (K.DISPATCH, K.COMPUTE, K.COMBINE)]
    return StepCost(kinds=kinds.astype(np.int8), durations_s=durations, attention_s=zeros, dispatch_s=per_layer[0],
                    compute_s=per_layer[1], combine_s=per_layer[2], straggler=np.zeros(layers, dtype=np.int64),
                    gpu_pairs=np.zeros((layers, 2)), nvlink_bytes=g, rdma_bytes=g, nvlink_busy_s=g, rdma_busy_s=g)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.data())
def test_hidden_time_is_each_all_to_all_intersected_with_compute(layers, data):
    kinds = np.append(np.tile([K.ATTENTION, K.DISPATCH, K.COMPUTE, K.COMBINE], layers), K.OTHER)
    draw = st.lists(st.floats(0, 1e-3), min_size=len(kinds), max_size=len(kinds))
    first, second = np.array(data.draw(draw)), np.array(data.draw(draw))
    cost = overlap_step_cost(_step_cost(kinds, first, layers), _step_cost(kinds, second, layers))
    chain, comm = kinds[:-1], np.isin(kinds[:-1], COMM)
    start, end = two_batch_schedule(comm, np.stack([first[:-1], second[:-1]]))
    layer = np.cumsum(chain == K.DISPATCH) - 1
    brute = np.zeros(layers)  # every (all-to-all, compute) pair of operations, by hand
    for k, i in zip(*np.nonzero(np.broadcast_to(comm, start.shape)), strict=True):
        for kc, j in zip(*np.nonzero(np.broadcast_to(~comm, start.shape)), strict=True):
            brute[layer[i]] += max(0.0, min(end[k, i], end[kc, j]) - max(start[k, i], start[kc, j]))
    np.testing.assert_allclose(cost.a2a_hidden_s, brute, rtol=1e-9, atol=1e-15)
    assert len(cost.kinds) == len(cost.durations_s) and cost.kinds[-1] == K.OTHER
    assert cost.total_s == pytest.approx(end.max() + max(first[-1], second[-1]), rel=1e-12, abs=1e-18)


def test_the_overlapped_cost_partitions_the_makespan_and_counts_hidden_time_per_layer():
    kinds = phase_kinds(ModelSpec(name="u", num_hidden_layers=3, moe_layer_ids=(1, 2), num_experts=4, top_k=1,
                                  hidden_size=8, expert_ffn_size=8))
    # attn, dense, attn, dispatch, experts, combine, attn, dispatch, experts, combine, other
    first = np.array([3.0, 4.0, 3.0, 2.0, 5.0, 2.0, 3.0, 2.0, 5.0, 2.0, 1.0])
    second = first * 1.5
    cost = overlap_step_cost(_step_cost(kinds, first, 2), _step_cost(kinds, second, 2))
    chain = kinds != K.OTHER
    _, end = two_batch_schedule(np.isin(kinds[chain], COMM), np.stack([first[chain], second[chain]]))
    assert cost.total_s == pytest.approx(end.max() + 1.5)  # the step's other phase once (the longer)
    assert cost.kinds[-1] == K.OTHER and (cost.kinds[1:] != cost.kinds[:-1]).all()  # runs merged
    compute = sum(x[chain & ~np.isin(kinds, COMM)].sum() for x in (first, second))
    on_compute = ~np.isin(cost.kinds, (*COMM, K.OTHER))
    assert cost.durations_s[on_compute].sum() == pytest.approx(compute)  # compute never hides
    a2a = cost.dispatch_s + cost.combine_s
    assert (cost.a2a_hidden_s >= 0).all() and (cost.a2a_hidden_s <= a2a + 1e-12).all()
    exposed = cost.durations_s[np.isin(cost.kinds, COMM)].sum()
    assert exposed == pytest.approx(a2a.sum() - cost.a2a_hidden_s.sum())
    np.testing.assert_allclose(cost.dispatch_s, (first + second)[kinds == K.DISPATCH])
    idle = overlap_step_cost(*(_step_cost(kinds, 0 * first, 2),) * 2)  # nothing to run: the other phase only
    assert idle.kinds.tolist() == [K.OTHER] and idle.durations_s.tolist() == [0.0]


# --------------------------------------------------------------------------------------------
# Simulated steps
# --------------------------------------------------------------------------------------------

class Recording:
    """CostModel that records the cost of every batch it is asked (each micro-batch under overlap)."""

    def __init__(self, log, *args):
        self.base = CostModel(*args)
        self.needs_pairs = self.base.needs_pairs
        self.log = log

    def step_cost(self, traffic, batch):
        cost = self.base.step_cost(traffic, batch)
        self.log.append((float(batch.tokens.sum()), cost))
        return cost


def _run(config, workload, routing=None, level="count"):
    log: list = []
    out = simulate(PLACEMENT, TOPO, MODEL, routing=routing, workload=workload, config=config, level=level,
                   cost_model=lambda *args: Recording(log, *args))
    return out, log


def _per_step(out, log):
    """(C, A) of every step: compute-resource and all-to-all seconds over its micro-batches."""
    steps, i = [], 0
    for tokens in out.tables["iterations"]["tokens"]:
        parts = []
        while sum(p[0] for p in parts) < tokens - 1e-9:  # one micro-batch when the second is empty
            parts.append(log[i])
            i += 1
        costs = [p[1] for p in parts]
        comm = [np.isin(c.kinds, COMM) for c in costs]
        other = [c.kinds == K.OTHER for c in costs]
        a = sum(c.durations_s[m].sum() for c, m in zip(costs, comm, strict=True))
        c = sum(x.durations_s[~m & ~o].sum() for x, m, o in zip(costs, comm, other, strict=True))
        steps.append((c + max(x.durations_s[o].sum() for x, o in zip(costs, other, strict=True)), a))
    assert i == len(log)
    return np.array(steps)


CASES = {
    "replay, trace tokens": (ReplayWorkload(tokens_per_rank=9, context_len=256), "trace", "token"),
    "replay, count level": (ReplayWorkload(tokens_per_rank=64, iterations=4), None, "count"),
    "serving, count level": (ServingWorkload(rate=40, duration_s=0.2, prompt_len=24, output_len=4), None, "count"),
    "serving, token level": (ServingWorkload(rate=40, duration_s=0.2, prompt_len=24, output_len=4), None, "token"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kernel", ["deepep-normal", "deepep-ll"])
def test_every_overlapped_step_lies_between_max_and_sum_of_compute_and_all_to_all(case, kernel):
    workload, routing, level = CASES[case]
    trace = synthesize_trace(MODEL, 100, seed=2) if routing == "trace" else None
    config = SimConfig(network=kernel_preset(kernel), overlap="two-batch", seed=1, pool_size=256)
    out, log = _run(config, workload, trace, level)
    it, layers = out.tables["iterations"], out.tables["layers"]
    c, a = _per_step(out, log).T
    step = it["duration_s"].to_numpy()
    assert len(step) > 1
    assert (np.maximum(c, a) <= step * (1 + 1e-9)).all() and (step <= (c + a) * (1 + 1e-9)).all()
    # The phases partition the step: compute-side phases are C, dispatch + combine the exposed part.
    phases = it[["attention_s", "dispatch_s", "compute_s", "combine_s", "other_s"]].sum(axis=1)
    np.testing.assert_allclose(phases, step, rtol=1e-9)
    np.testing.assert_allclose(it["attention_s"] + it["compute_s"] + it["other_s"], c, rtol=1e-9)
    hidden = a - (it["dispatch_s"] + it["combine_s"]).to_numpy()
    assert (layers["a2a_hidden_s"] <= layers["dispatch_s"] + layers["combine_s"] + 1e-15).all()
    assert layers["a2a_hidden_s"].sum() * len(step) == pytest.approx(hidden.sum(), rel=1e-9)
    assert out.summary["a2a_hidden_fraction"] == pytest.approx(hidden.sum() / a.sum(), rel=1e-9)


def test_a_compute_heavy_decode_step_hides_nine_tenths_of_its_all_to_all():
    heavy = ModelSpec(name="heavy", num_hidden_layers=8, moe_layer_ids=tuple(range(8)), num_experts=16, top_k=2,
                      hidden_size=2048, expert_ffn_size=8192)
    log: list = []
    out = simulate(Placement(contiguous_map(8, 16, 16), 2, 16), make_topology("h100", gpus=8), heavy,
                   workload=ReplayWorkload(tokens_per_rank=256, iterations=3, context_len=256), config=TWO_BATCH,
                   cost_model=lambda *args: Recording(log, *args))
    steps = _per_step(out, log)
    assert (steps[:, 0] >= steps[:, 1]).all()  # C >= A: compute dominates
    it = out.tables["iterations"]
    exposed = (it["dispatch_s"] + it["combine_s"]).to_numpy()
    assert (exposed <= 0.1 * steps[:, 1]).all()
    assert out.summary["a2a_hidden_fraction"] >= 0.9


def test_micro_batches_pay_their_fixed_costs_twice():
    one_token = ReplayWorkload(tokens_per_rank=2, iterations=2)
    plain, _ = _run(SimConfig(seed=1, pool_size=256), one_token)
    split, log = _run(TWO_BATCH, one_token)
    assert len(log) == 4  # two micro-batches per step, each costed on its own
    # At two tokens per rank the launches dominate: compute and all-to-all work double.
    assert split.summary["compute_s"] + split.summary["attention_s"] > 1.5 * (
        plain.summary["compute_s"] + plain.summary["attention_s"])


def test_a_step_with_an_empty_second_micro_batch_runs_as_one_batch():
    plain, _ = _run(SimConfig(seed=1, pool_size=256), ReplayWorkload(tokens_per_rank=1, iterations=2))
    split, log = _run(TWO_BATCH, ReplayWorkload(tokens_per_rank=1, iterations=2))
    assert len(log) == 2 and split.summary["a2a_hidden_fraction"] == 0.0
    np.testing.assert_allclose(split.tables["iterations"]["duration_s"], plain.tables["iterations"]["duration_s"])


# --------------------------------------------------------------------------------------------
# None is today's path; configuration; results, report and CLI
# --------------------------------------------------------------------------------------------

def test_none_leaves_the_default_path_and_outputs_as_they_were(tmp_path):
    config = SimConfig(seed=1, pool_size=256)
    assert config.overlap == "none" and "overlap" not in config.to_dict()
    assert SimConfig(overlap="two-batch").to_dict()["overlap"] == "two-batch"
    workload = ReplayWorkload(tokens_per_rank=16, iterations=3)
    out, log = _run(config, workload)
    assert all(cost.a2a_hidden_s is None for _, cost in log)
    # Every step is the plain CostModel's phases, one cost per step.
    np.testing.assert_array_equal(out.tables["iterations"]["duration_s"], [cost.total_s for _, cost in log])
    assert list(out.tables["layers"].columns) == list(TABLES["layers"])
    assert "a2a_hidden_fraction" not in out.summary
    write_results(tmp_path, {"model": {}, "topology": {}, "routing": {}, "placements": {"p": {}}, "workload": {},
                             "config": config.to_dict()}, [RunOutput("p", out.summary, out.tables)])
    assert (tmp_path / "layers.csv").read_text().splitlines()[0] == "placement," + ",".join(TABLES["layers"])


@pytest.mark.parametrize(("kwargs", "needle"), [
    pytest.param({"overlap": "dualpipe"}, "unknown overlap mode 'dualpipe'", id="unknown mode"),
    pytest.param({"overlap": "two-batch", "execution": "context-coherent"}, "standard", id="context-coherent"),
])
def test_bad_overlap_is_refused_naming_the_flag(kwargs, needle):
    with pytest.raises(InvalidInputError, match=needle) as err:
        SimConfig(**kwargs)
    assert err.value.source == "--overlap"
    assert OVERLAP_MODES == ("none", "two-batch")


def test_hidden_seconds_round_trip_and_are_drawn(tmp_path):
    out, _ = _run(TWO_BATCH, ReplayWorkload(tokens_per_rank=16, iterations=3))
    inputs = {"model": {}, "topology": {}, "routing": {}, "placements": {"p": {}}, "workload": {},
              "config": TWO_BATCH.to_dict()}
    write_results(tmp_path, inputs, [RunOutput("p", out.summary, out.tables)])
    res = read_results(tmp_path)
    pd.testing.assert_frame_equal(res.rows("layers", "p"), out.tables["layers"], check_dtype=False)
    assert res.summaries["p"]["a2a_hidden_fraction"] == pytest.approx(out.summary["a2a_hidden_fraction"])
    render_report(tmp_path, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert re.search(r'"name": ?"a2a hidden"', page) and "a2a_hidden_fraction" in page


def test_cli_run_and_sweep_take_overlap(capsys, tmp_path):
    args = ["--model", "mixtral-8x7b", "--workload", "replay", "--iterations", "2", "--tokens-per-rank", "8",
            "--method", "contiguous", "--overlap", "two-batch"]
    assert main(["simulate", "run", "--gpus", "4", *args, "-o", str(tmp_path / "run")]) == 0
    stdout = capsys.readouterr().out
    assert "two-batch overlap" in stdout and "all-to-all hidden under compute: contiguous" in stdout
    res = read_results(tmp_path / "run")
    assert res.inputs["config"]["overlap"] == "two-batch" and "a2a_hidden_s" in res.tables["layers"]
    assert "a2a hidden" in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert main(["simulate", "sweep", "--gpus", "4", *args, "--json", "-o", str(tmp_path / "sweep")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["gpus"] == 4
    assert read_results(tmp_path / "sweep" / "gpus4").inputs["config"]["overlap"] == "two-batch"
