"""GPUs of different speeds (issue 17 part 4): ``--gpu-speed``, load balance as time in the
metrics, the joint objective, its search and bound, and the simulator's compute."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from cli_helpers import one_line_exit2, run

from placer.ilp import PlacementProblem, solve
from placer.ilp import _ls_anneal as A
from placer.ilp.bounds import balance_lower_bound
from placer.ilp.local_search import LayerTask, SearchConfig, _layer, token_types
from placer.ilp.objective import evaluate_objective, layer_load_ratio
from placer.io.native import write_trace_npz
from placer.io.topology import read_gpu_speed
from placer.metrics import evaluate, gpu_load, load_balance
from placer.presets import get_model, make_topology
from placer.simulator.config import ComputeParams
from placer.simulator.cost.compute import ComputeModel
from placer.stats import compute_stats
from placer.synthetic import synthesize_trace
from placer.types import Placement


def test_inline_and_file_speeds(tmp_path):
    assert read_gpu_speed("3=0.5", 4) == (1.0, 1.0, 1.0, 0.5)
    assert read_gpu_speed("0-1=0.8, 3=2", 4) == (0.8, 0.8, 1.0, 2.0)
    (tmp_path / "s.csv").write_text("# per rank\n1,1\n0.5\n1\n")
    (tmp_path / "s.json").write_text("[1, 1, 0.5, 1]")
    assert read_gpu_speed(str(tmp_path / "s.csv"), 4) == read_gpu_speed(str(tmp_path / "s.json"), 4) == \
        (1.0, 1.0, 0.5, 1.0)


@pytest.mark.parametrize("spec,needle", [
    ("9=0.5", "ranks 9 outside the cluster's 0-3"),
    ("1=0", "factor 0 must be a positive number"),
    ("1-x=0.5", "is not RANKS=FACTOR"),
    ("missing.csv", "missing.csv"),
])
def test_bad_speed_exits_2(tmp_path, capsys, spec, needle):
    one_line_exit2(capsys, "solve", "--model", "mixtral-8x7b", "--gpus", 4, "--gpu-speed", spec, "-o",
                   tmp_path / "p.json", needle=needle)


def test_bad_speed_file_exits_2_naming_it(tmp_path, capsys):
    for text, needle in (("1,1,1\n", "3 speed factors for 4 GPUs"), ("1,1,-1,1", "rank 2's speed -1"),
                         ('["a", 1, 1, 1]', "one speed factor per GPU")):
        path = tmp_path / "s.csv"
        path.write_text(text)
        line = one_line_exit2(capsys, "solve", "--model", "mixtral-8x7b", "--gpus", 4, "--gpu-speed", path, "-o",
                              tmp_path / "p.json", needle=needle)
        assert str(path) in line


def _case(tokens=500, seed=2, redundant=4):
    model = get_model("mixtral-8x7b")
    trace = synthesize_trace(model, tokens, seed=seed)
    topology = make_topology("h100", gpus=4, nodes=2)
    return model, trace, topology, PlacementProblem(compute_stats(trace, seed=seed), model, topology,
                                                    num_redundant=redundant)


def test_balance_as_time_by_hand():
    """Speeds 2, 2, 2, 1 (mean 1.75): time scales 0.875, 0.875, 0.875, 1.75."""
    topology = replace(make_topology("h100", gpus=4), gpu_speed=(2.0, 2.0, 2.0, 1.0))
    np.testing.assert_allclose(topology.time_scale(), [0.875, 0.875, 0.875, 1.75])
    load = np.array([[10.0, 10.0, 10.0, 10.0], [20.0, 10.0, 5.0, 5.0], [12.0, 12.0, 12.0, 6.0]])
    lb = load_balance(load, topology.time_scale())
    np.testing.assert_allclose(lb["per_layer"], [17.5 / 10, 17.5 / 10, 10.5 / 10.5])  # the last split by speed
    np.testing.assert_allclose(load_balance(load)["per_layer"], [1.0, 2.0, 12 / 10.5])


def test_equal_speeds_change_nothing_and_a_slow_gpu_shows():
    model, trace, topology, problem = _case()
    placement = solve(problem, "eplb").placement
    plain = evaluate(placement, topology, model, trace)
    same = evaluate(placement, replace(topology, gpu_speed=(0.5,) * 4), model, trace)
    assert same["load_max_over_mean_median"] == pytest.approx(plain["load_max_over_mean_median"], rel=1e-12)
    assert same["load_as_time"] and not plain["load_as_time"]
    slow = replace(topology, gpu_speed=(1.0, 1.0, 1.0, 0.5))
    got = evaluate(placement, slow, model, trace)
    load = gpu_load(placement, topology, trace)
    want = np.median((load * slow.time_scale()).max(axis=1) / load.mean(axis=1))
    assert got["load_max_over_mean_median"] == pytest.approx(want, rel=1e-12)
    assert got["load_max_over_mean_median"] > plain["load_max_over_mean_median"]


def test_search_model_counts_load_as_time():
    """No replicas, one GPU at half speed: the search kernel's max equals the objective's."""
    model, trace, topology, problem = _case(redundant=0)
    slow = replace(topology, gpu_speed=(1.0, 0.5, 1.0, 1.0))
    problem = PlacementProblem(problem.stats, model, slow)
    rng = np.random.default_rng(1)
    p2l = np.stack([rng.permutation(8) for _ in range(model.num_moe_layers)])
    placement = Placement(p2l, 2, 8)
    mx, mean = layer_load_ratio(problem, placement)
    stats = problem.stats
    cfg = SearchConfig(num_gpus=4, num_nodes=2, gpus_per_node=2, slots_per_gpu=2, num_experts=8, num_slots=8,
                       top_k=2, rule="nearest", w_bal=1.0, w_nv=1.0, w_rdma=10.0, time_scale=slow.time_scale())
    home = stats.sample_token_index.astype(np.int64) % 4
    for layer in (0, 5):
        ids, hm, wt = token_types(stats.sample_ids[:, layer].astype(np.int64), home)
        task = LayerTask(layer, stats.load[layer] / stats.num_tokens, ids, hm, wt, p2l[layer][None, :])
        lay, st_, wk = _layer(task, cfg)
        _, kernel_mx, _ = A.init_state(p2l[layer].copy(), lay, st_, wk)
        assert kernel_mx == pytest.approx(mx[layer], rel=1e-12)
    assert np.all(balance_lower_bound(problem) <= mx + 1e-12)


def test_placer_unloads_the_slow_gpu():
    """One GPU at half speed: placer's balance as time beats EPLB's (which sees tokens only), and
    the bound stays below it."""
    model, trace, topology, problem = _case(tokens=800, redundant=4)
    slow = replace(topology, gpu_speed=(1.0, 1.0, 1.0, 0.5))
    problem = PlacementProblem(problem.stats, model, slow, num_redundant=4)
    placer_p, eplb_p = solve(problem, "placer", seed=0), solve(problem, "eplb")
    a, b = (evaluate(r.placement, slow, model, trace)["load_max_over_mean_median"] for r in (placer_p, eplb_p))
    assert a < b - 0.05
    load = gpu_load(placer_p.placement, slow, trace)
    assert load[:, 3].sum() < load[:, :3].sum(axis=0).min()  # the slow GPU serves the least
    ev = evaluate_objective(problem, placer_p.placement)
    assert np.all(balance_lower_bound(problem) <= ev["per_layer"]["max_load_per_token"] + 1e-12)


def test_simulator_runs_each_gpu_at_its_speed():
    model = get_model("mixtral-8x7b")
    topology = make_topology("h100", gpus=4, nodes=2)
    params = ComputeParams()
    even, slow = (ComputeModel(params, t, model, 2) for t in (topology, replace(topology, gpu_speed=(1, 1, 1, 0.25))))
    pairs = np.full((3, 8), 50.0)
    local = np.full((3, 4), 30.0)
    a, b = even.expert_times(pairs, local), slow.expert_times(pairs, local)
    np.testing.assert_allclose(b[:, :3], a[:, :3])
    np.testing.assert_allclose(b[:, 3], 4 * a[:, 3])
    tokens = np.full(4, 16.0)
    np.testing.assert_allclose(slow.attention_times(tokens, tokens * 100, tokens * 0)[3],
                               4 * even.attention_times(tokens, tokens * 100, tokens * 0)[3])


def test_cli_gpu_speed_end_to_end(tmp_path, capsys):
    model = get_model("mixtral-8x7b")
    trace = tmp_path / "t.npz"
    write_trace_npz(str(trace), synthesize_trace(model, 400, seed=3))
    code, out, err = run(capsys, "solve", trace, "--gpus", 4, "--nodes", 2, "--redundant", 4, "--gpu-speed", "3=0.5",
                         "-o", tmp_path / "p.json", "--quiet")
    assert code == 0, err
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["topology"]["gpu_speed"] == [1.0, 1.0, 1.0, 0.5]
    code, out, err = run(capsys, "evaluate", tmp_path / "p.json", trace)
    assert code == 0, err
    assert "load as time (GPU speeds)" in out
    code, out, err = run(capsys, "evaluate", tmp_path / "p.json", trace, "--gpu-speed", "0-3=1", "--json")
    assert code == 0, err
    assert json.loads(out)["load_as_time"] is True
