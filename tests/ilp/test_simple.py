import numpy as np
import pytest

from placer.errors import InfeasibleError, InvalidInputError
from placer.ilp import PlacementProblem, solve
from placer.presets import get_model, make_topology
from placer.stats import load_only_stats
from placer.validate import check_placement


def _problem(gpus=4, redundant=0, nodes=None):
    model = get_model("mixtral-8x7b")
    stats = load_only_stats(np.arange(1, 257).reshape(32, 8), top_k=2)
    return PlacementProblem(stats, model, make_topology("h100", gpus=gpus, nodes=nodes), num_redundant=redundant)


def test_contiguous_and_round_robin_layouts():
    c = solve(_problem(), "contiguous").placement
    np.testing.assert_array_equal(c.gpu_experts()[0], [[0, 1], [2, 3], [4, 5], [6, 7]])
    r = solve(_problem(), "round-robin").placement
    np.testing.assert_array_equal(r.gpu_experts()[0], [[0, 4], [1, 5], [2, 6], [3, 7]])


@pytest.mark.parametrize("method", ["contiguous", "round-robin"])
@pytest.mark.parametrize("gpus, redundant, nodes", [(4, 0, None), (4, 4, 2), (16, 8, 2), (2, 2, None)])
def test_default_layouts_are_valid(method, gpus, redundant, nodes):
    problem = _problem(gpus, redundant, nodes)
    result = solve(problem, method)
    check_placement(result.placement, problem.model, problem.topology)
    assert result.placement.num_slots == 8 + redundant
    assert result.method == method and result.status in ("optimal", "feasible", "timeout")


@pytest.mark.parametrize("gpus, redundant, match", [
    (3, 0, "--redundant 1"),
    (16, 0, "--redundant 8"),
    (4, 3, "--redundant 0 or --redundant 4"),
])
def test_infeasible_sizes_name_nearest_setting(gpus, redundant, match):
    with pytest.raises(InfeasibleError, match=match):
        _problem(gpus, redundant, 1 if gpus <= 8 else None)


def test_memory_infeasible():
    model = get_model("mixtral-8x22b")
    stats = load_only_stats(np.ones((56, 8)), top_k=2)
    with pytest.raises(InfeasibleError, match="slots per GPU fit"):
        PlacementProblem(stats, model, make_topology("h100", gpus=1))


def test_unknown_method():
    with pytest.raises(InvalidInputError, match="unknown method"):
        solve(_problem(), "magic")
