"""The exact frontier of method ``exact`` in standard execution, against brute force.

Brute force enumerates every placement whose GPUs hold distinct experts (the frontier's space)
and scores each with the shared metrics (``gpu_load`` on the statistics, ``dispatch_traffic`` on
their token sample), so the frontier is checked against the numbers ``placer evaluate`` reports.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from itertools import combinations, product
from pathlib import Path

import numpy as np
import pytest

from placer.errors import InfeasibleError, InvalidInputError
from placer.ilp import PlacementProblem, solve
from placer.ilp.frontier import (
    MAX_WORK,
    enumeration_size,
    exact_frontier,
    frontier_refusal,
    placement_at,
)
from placer.metrics import dispatch_traffic, gpu_load, load_balance
from placer.presets import get_model, make_topology
from placer.stats import compute_stats
from placer.types import ModelSpec, Placement, RoutingTrace
from placer.validate import check_placement

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_helpers import one_line_exit2, run  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _problem(experts, gpus, nodes, redundant, *, layers=1, tokens=120, seed=0, top_k=2, weights=None):
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.ones(experts) * 0.6, size=layers)
    ids = np.empty((tokens, layers, top_k), dtype=np.int64)
    for layer in range(layers):
        for t in range(tokens):
            ids[t, layer] = rng.choice(experts, size=top_k, replace=False, p=popularity[layer])
    model = ModelSpec.from_shape(layers, experts, top_k, name="tiny")
    stats = compute_stats(RoutingTrace(ids, experts, model=model), sample_size=tokens, seed=seed)
    return PlacementProblem(stats, model, make_topology("h100", gpus=gpus, nodes=nodes),
                            num_redundant=redundant, weights=weights or {})


def _score(problem, p2l) -> tuple[np.ndarray, np.ndarray]:
    """(max/mean GPU load [L], inter-node dispatches per token [L]) by the shared metrics."""
    placement = Placement(np.asarray(p2l), problem.slots_per_gpu, problem.model.num_experts)
    ratio = load_balance(gpu_load(placement, problem.topology, problem.stats))["per_layer"]
    sends = dispatch_traffic(placement, problem.topology, problem.model, problem.stats)
    return ratio, sends["per_layer"]["inter_node_nodes"]


def _brute_layer(problem) -> np.ndarray:
    """(ratio, dispatches) of every distinct-copy placement of a one-layer problem. float [n, 2]."""
    e, spg, g = problem.model.num_experts, problem.slots_per_gpu, problem.topology.num_gpus
    out = []
    for gpus in product(combinations(range(e), spg), repeat=g):
        if len(set().union(*gpus)) < e:
            continue
        ratio, sends = _score(problem, [sum(gpus, ())])
        out.append((ratio[0], sends[0]))
    return np.array(out)


def _cheapest(points: np.ndarray, cap: float) -> float:
    """Fewest dispatches among ``points`` [n, 2] (ratio, dispatches) with ratio <= cap."""
    ok = points[:, 0] <= cap * (1 + 1e-9)
    return float(points[ok, 1].min()) if np.any(ok) else np.inf


# (experts, gpus, nodes, redundant): 1 or 2 nodes of 1 or 2 GPUs, a few redundant slots.
SHAPES = [(4, 2, 2, 2), (4, 4, 2, 4), (3, 4, 2, 1), (6, 2, 2, 2), (5, 2, 2, 3), (4, 4, 2, 0), (4, 2, 1, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{}-G{}-N{}-R{}".format(*s))
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_frontier_matches_brute_force(shape, seed):
    problem = _problem(*shape, seed=seed, weights={"frontier": 1.0})
    brute = _brute_layer(problem)
    frontier = exact_frontier(problem)
    (layer,) = frontier.layers
    for cap in np.unique(np.concatenate([brute[:, 0], layer.ratio])):
        got = frontier.layers[0].dispatches[np.searchsorted(layer.ratio, cap * (1 + 1e-9), side="right") - 1] \
            if cap >= layer.ratio[0] * (1 - 1e-9) else None
        want = _cheapest(brute, cap)
        if got is None:
            assert want == np.inf, (cap, want)
        else:
            assert got / problem.stats.sample_size == pytest.approx(want, abs=1e-12), cap
    # The most balanced point is the best balance any distinct-copy placement reaches.
    assert layer.ratio[0] == pytest.approx(brute[:, 0].min(), rel=1e-12)


def test_frontier_over_layers_and_its_placements():
    problem = _problem(4, 4, 2, 4, layers=3, seed=5)
    per_layer = []
    for layer in range(3):
        stats = problem.stats.layers(layer, layer + 1)
        sub = PlacementProblem(stats, ModelSpec.from_shape(1, 4, 2, name="tiny"), problem.topology, num_redundant=4)
        per_layer.append(_brute_layer(sub))
    frontier = exact_frontier(problem)
    assert np.all(np.diff(frontier.load_cap) > 0) and np.all(np.diff(frontier.inter_node) < 0)
    for i, cap in enumerate(frontier.load_cap):
        want = np.mean([_cheapest(points, cap) for points in per_layer])
        assert frontier.inter_node[i] == pytest.approx(want, abs=1e-12)
        placement = placement_at(frontier, i)
        check_placement(placement, problem.model, problem.topology, distinct_per_gpu=True)
        ratio, sends = _score(problem, placement.physical_to_logical)
        assert ratio.max() == pytest.approx(cap, rel=1e-12)
        assert sends.mean() == pytest.approx(frontier.inter_node[i], abs=1e-12)
        assert np.median(ratio) == pytest.approx(frontier.load_median[i], rel=1e-12)


def test_load_cap_semantics():
    problem = _problem(4, 4, 2, 4, layers=2, seed=2)
    frontier = exact_frontier(problem)
    first, last = frontier.load_cap[0], frontier.load_cap[-1]
    default = solve(problem, "exact")
    assert default.status == "optimal" and default.gap == 0.0 and default.bound == default.objective
    assert default.objective == pytest.approx(frontier.inter_node[0])
    assert default.terms["load_cap"] == pytest.approx(first)
    if len(frontier.load_cap) > 1:
        between = (frontier.load_cap[0] + frontier.load_cap[1]) / 2  # still the first point
        res = solve(problem, "exact", load_cap=float(between))
        assert res.objective == pytest.approx(frontier.inter_node[0])
    capped = solve(replace(problem, weights={"load_cap": float(last) + 1.0}), "exact")
    assert capped.objective == pytest.approx(frontier.inter_node[-1])
    ratio, sends = _score(problem, capped.placement.physical_to_logical)
    assert ratio.max() <= last + 1e-12 and sends.mean() == pytest.approx(capped.objective)
    assert first > 1.0
    with pytest.raises(InfeasibleError, match="cannot go below"):
        solve(problem, "exact", load_cap=1.0)


def test_refusals_name_what_to_use():
    assert "dispatch nearest" in frontier_refusal(replace(_problem(4, 4, 2, 4), dispatch="vllm"))
    big = _problem(4, 8, 2, 4, weights={"frontier": 1.0})
    assert "1 or 2 nodes of 1 or 2 GPUs" in frontier_refusal(big) and "--method placer" in frontier_refusal(big)
    assert enumeration_size(16, 2, 2, 4, 32) > MAX_WORK
    with pytest.raises(InvalidInputError, match="too large for the exact frontier"):
        solve(_problem(16, 4, 2, 0, top_k=2, weights={"frontier": 1.0}), "exact")
    with pytest.raises(InvalidInputError, match="takes no option 'max_rounds'"):
        solve(_problem(4, 4, 2, 4), "exact", max_rounds=3)
    coherent = _problem(4, 4, 2, 0, weights={"frontier": 1.0})
    with pytest.raises(InvalidInputError, match="for standard execution"):
        solve(replace(coherent, execution="context-coherent"), "exact")


def test_standard_without_replicas_or_flags_keeps_the_coherent_optimum():
    res = solve(_problem(4, 4, 2, 0, layers=2), "exact")
    assert res.backend != "numpy-frontier"  # the context-coherent partition DP, as before


@pytest.fixture
def mixtral_trace(tmp_path):
    path = tmp_path / "t.npz"
    code, _, err = run_quiet(["synth", "--model", "mixtral-8x7b", "--tokens", "400", "--seed", "3", "-o", path])
    assert code == 0, err
    return path


def run_quiet(args):
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from placer.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_cli_frontier_json_end_to_end(capsys, tmp_path, mixtral_trace):
    from placer.io.placements import read_placement_file
    from placer.io.routing import gather_routing

    out_path = tmp_path / "p.json"
    code, out, err = run(capsys, "solve", mixtral_trace, "--gpus", "4", "--nodes", "2", "--redundant", "4",
                         "--method", "exact", "--frontier", "--json", "-o", out_path)
    assert code == 0, err
    data = json.loads(out)
    curve = data["frontier"]
    assert data["status"] == "optimal" and data["gap"] == 0.0 and len(curve) >= 2
    caps = [p["load_cap"] for p in curve]
    sends = [p["inter_node_per_token_layer"] for p in curve]
    assert caps == sorted(caps) and sends == sorted(sends, reverse=True)
    assert not any(k.startswith("frontier_") for k in data["terms"])
    assert data["objective"] == pytest.approx(sends[0])
    # The written placement reproduces the point under the shared metrics on the same statistics.
    routing = gather_routing([str(mixtral_trace)])
    placement = read_placement_file(str(out_path)).placement
    topology = make_topology("h100", gpus=4, nodes=2)
    ratio = load_balance(gpu_load(placement, topology, routing.stats))["per_layer"]
    inter = dispatch_traffic(placement, topology, get_model("mixtral-8x7b"), routing.stats)
    assert ratio.max() == pytest.approx(caps[0], rel=1e-12)
    assert inter["inter_node_nodes_per_token_layer"] == pytest.approx(sends[0], abs=1e-12)

    cap = (caps[len(caps) // 2] + caps[len(caps) // 2 + 1]) / 2
    code, out, err = run(capsys, "solve", mixtral_trace, "--gpus", "4", "--nodes", "2", "--redundant", "4",
                         "--method", "exact", "--load-cap", f"{cap:.6f}", "--frontier", "-o", out_path)
    assert code == 0, err
    assert "frontier (exact)" in out and "load cap  load med  inter-node" in out
    assert f"{sends[len(caps) // 2]:.4f} inter-node dispatches per token-layer" in out


def test_cli_refusals_exit_2_with_one_line(capsys, tmp_path, mixtral_trace):
    out_path = tmp_path / "p.json"
    one_line_exit2(capsys, "solve", mixtral_trace, "--gpus", "8", "--nodes", "2", "--redundant", "8",
                   "--method", "exact", "-o", out_path, needle="1 or 2 nodes of 1 or 2 GPUs")
    one_line_exit2(capsys, "solve", mixtral_trace, "--gpus", "4", "--nodes", "2", "--redundant", "4",
                   "--method", "eplb", "--load-cap", "1.1", "-o", out_path, needle="--load-cap needs --method exact")
    one_line_exit2(capsys, "solve", mixtral_trace, "--gpus", "4", "--nodes", "2", "--execution",
                   "context-coherent", "--method", "exact", "--frontier", "-o", out_path,
                   needle="for standard execution")
    one_line_exit2(capsys, "solve", mixtral_trace, "--gpus", "4", "--nodes", "2", "--redundant", "4",
                   "--method", "exact", "--load-cap", "1.0", "-o", out_path, needle="cannot go below")
    assert not out_path.exists()


def test_cli_too_large_instance(capsys, tmp_path):
    trace = tmp_path / "v2.npz"
    code, _, err = run_quiet(["synth", "--model", "deepseek-v2-lite", "--tokens", "200", "-o", trace])
    assert code == 0, err
    line = one_line_exit2(capsys, "solve", trace, "--gpus", "4", "--nodes", "2", "--redundant", "4",
                          "--method", "exact", "-o", tmp_path / "p.json", needle="too large for the exact frontier")
    assert "--method placer" in line


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_placer_is_never_worse_than_the_frontier_at_its_own_loads(seed):
    """Where the exact frontier runs, each layer of ``placer``'s answer scores at most the joint
    objective of the frontier's placement at that layer's own max GPU load (the search's result
    is checked against it, layer by layer), and never above the search alone."""
    from placer.ilp.frontier import placement_under
    from placer.ilp.objective import evaluate_objective
    problem = _problem(8, 4, 2, 4, layers=4, tokens=300, seed=seed)
    result = solve(problem, "placer", seed=seed)
    check_placement(result.placement, problem.model, problem.topology)
    ev = evaluate_objective(problem, result.placement)
    cap = ev["per_layer"]["max_load_per_token"] * problem.stats.num_tokens
    exact = evaluate_objective(problem, placement_under(exact_frontier(problem), cap))

    def per_layer(e):
        pl = e["per_layer"]
        return pl["balance"] + pl["traffic"] + pl["affinity"] + pl["balance_cap"]

    assert np.all(per_layer(ev) <= per_layer(exact) * (1 + 1e-9))
    assert result.objective == pytest.approx(float(ev["total"]))
