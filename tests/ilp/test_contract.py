"""One contract for every registered method, on random small instances.

Every method returns a placement that passes the shared validator, reports a status from the
shared list, and never claims a bound above its objective or a gap on a proven optimum. A
method may refuse an instance outside its domain (replicas, standard execution) only with an
InvalidInputError that says why.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from placer.errors import InvalidInputError
from placer.ilp import METHODS, PlacementProblem, solve
from placer.presets import make_topology
from placer.stats import compute_stats
from placer.types import SOLVE_STATUSES, ModelSpec, RoutingTrace
from placer.validate import check_placement

pytestmark = pytest.mark.timeout(300)

# (experts, gpus, nodes, redundant, execution)
CASES = [
    (4, 2, 1, 0, "context-coherent"),
    (8, 4, 2, 0, "context-coherent"),
    (8, 4, 1, 0, "standard"),
    (8, 4, 2, 4, "standard"),
    (6, 2, 2, 2, "standard"),
]


def _problem(experts, gpus, nodes, redundant, execution, seed):
    rng = np.random.default_rng(seed)
    layers, tokens, top_k = 3, 200, 2
    popularity = rng.dirichlet(np.ones(experts) * 0.7, size=layers)
    ids = np.empty((tokens, layers, top_k), dtype=np.int64)
    for layer in range(layers):
        for t in range(tokens):
            ids[t, layer] = rng.choice(experts, size=top_k, replace=False, p=popularity[layer])
    model = ModelSpec.from_shape(layers, experts, top_k, name="tiny")
    stats = compute_stats(RoutingTrace(ids, experts, model=model), sample_size=tokens, seed=seed)
    topology = make_topology("h100", gpus=gpus, nodes=nodes)
    return PlacementProblem(stats, model, topology, num_redundant=redundant, execution=execution)


# The only refusals a method may make, and the phrases that say why: methods that place no
# replicas refuse redundant slots; exact's standard-execution frontier refuses the shapes and
# dispatch rules it cannot enumerate. Any other InvalidInputError fails the contract.
REFUSALS = {"moetuner": ("places no replicas",), "exflow": ("places no replicas",),
            "exact": ("needs no redundant slots", "1 or 2 nodes of 1 or 2 GPUs", "dispatch nearest only")}


def _run(problem, method, seed):
    try:
        return solve(problem, method, seed=seed)
    except InvalidInputError as exc:
        allowed = REFUSALS.get(method, ())
        assert problem.num_redundant > 0 and any(phrase in str(exc) for phrase in allowed), \
            f"{method} refused an instance in its domain: {exc}"
        return None


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{c[0]}-G{c[1]}-N{c[2]}-R{c[3]}-{c[4]}")
def test_method_contract(method, case):
    for seed in (0, 1):
        problem = _problem(*case, seed=seed)
        result = _run(problem, method, seed)
        if result is None:
            continue
        assert result.status in SOLVE_STATUSES and result.status != "infeasible"
        check_placement(result.placement, problem.model, problem.topology)
        assert result.placement.num_slots == problem.num_slots
        assert result.method == method
        if result.bound is not None and math.isfinite(result.objective):
            assert result.bound <= result.objective + 1e-6 * max(1.0, abs(result.objective))
        if result.status == "optimal" and result.gap is not None:
            assert result.gap <= 1e-6
        again = solve(problem, method, seed=seed)
        np.testing.assert_array_equal(again.placement.physical_to_logical,
                                      result.placement.physical_to_logical,
                                      err_msg=f"{method} is not deterministic for a fixed seed")


# (experts, gpus, nodes, redundant): instances where copies could share a GPU.
DISTINCT_CASES = [(8, 4, 2, 4), (6, 2, 2, 2), (8, 4, 1, 12), (4, 2, 1, 4)]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("case", DISTINCT_CASES, ids=lambda c: f"E{c[0]}-G{c[1]}-N{c[2]}-R{c[3]}")
def test_method_keeps_copies_on_distinct_gpus(method, case):
    """vllm-ascend's constraint (``distinct_per_gpu``): every method honours it or refuses the instance."""
    from dataclasses import replace

    from placer.validate import duplicate_copies

    for seed in (0, 1):
        problem = replace(_problem(*case, "standard", seed=seed), distinct_per_gpu=True, dispatch="vllm-ascend")
        result = _run(problem, method, seed)
        if result is None:
            continue
        assert duplicate_copies(result.placement) == [], method
        check_placement(result.placement, problem.model, problem.topology, distinct_per_gpu=True)


def test_distinct_infeasible_sizes():
    from dataclasses import replace

    from placer.errors import InfeasibleError

    problem = _problem(4, 2, 1, 8, "standard", seed=0)  # 6 slots per GPU, 4 experts
    with pytest.raises(InfeasibleError, match="6 slots per GPU cannot hold distinct experts: the model has 4"):
        replace(problem, distinct_per_gpu=True)


@pytest.mark.parametrize("method, option", [("eplb", "backend"), ("eplb", "num_workers"), ("contiguous", "backend"),
                                            ("moetuner", "ray_address"), ("exflow", "iterations")])
def test_solve_refuses_options_a_method_does_not_declare(method, option):
    from placer.ilp.base import method_options

    problem = _problem(8, 4, 1, 0, "standard", seed=0)
    with pytest.raises(InvalidInputError, match=f"method {method} takes no option '{option}'"):
        solve(problem, method, **{option: 1})
    assert option not in method_options(method)


def test_cli_refuses_flags_the_method_ignores(capsys, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cli_helpers import one_line_exit2

    from placer.cli import main

    trace = tmp_path / "t.npz"
    assert main(["synth", "--model", "mixtral-8x7b", "--tokens", "200", "-o", str(trace)]) == 0
    capsys.readouterr()
    one_line_exit2(capsys, "solve", trace, "--gpus", "4", "--method", "eplb", "--backend", "cpsat", "-o",
                   tmp_path / "p.json", needle="method eplb takes no option 'backend'")
    one_line_exit2(capsys, "solve", trace, "--gpus", "4", "--method", "eplb", "--workers", "8", "-o",
                   tmp_path / "p.json", needle="method eplb takes no option 'num_workers'")
    assert not (tmp_path / "p.json").exists()
