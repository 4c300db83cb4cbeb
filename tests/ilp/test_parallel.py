"""Layer subproblems in a local process pool and on Ray give the serial result."""

from __future__ import annotations

import numpy as np
import pytest

from placer.ilp import PlacementProblem, solve
from placer.ilp.parallel import layer_groups
from placer.presets import make_topology
from placer.stats import compute_stats
from placer.types import ModelSpec, RoutingTrace


def _problem(layers=6, seed=0):
    rng = np.random.default_rng(seed)
    experts, top_k, tokens = 8, 2, 500
    pop = rng.dirichlet(np.ones(experts) * 0.6, size=layers)
    ids = np.empty((tokens, layers, top_k), dtype=np.int64)
    for layer in range(layers):
        g = np.log(pop[layer])[None, :] - np.log(-np.log(rng.random((tokens, experts))))
        ids[:, layer] = np.argsort(-g, axis=1)[:, :top_k]
    model = ModelSpec(name="tiny", num_hidden_layers=layers, moe_layer_ids=tuple(range(layers)),
                      num_experts=experts, top_k=top_k, hidden_size=1024, expert_ffn_size=2048)
    stats = compute_stats(RoutingTrace(ids, experts, model=model), sample_size=tokens)
    return PlacementProblem(stats, model, make_topology("h100", gpus=4, nodes=2), num_redundant=4)


def _same(a, b):
    np.testing.assert_array_equal(a.placement.physical_to_logical, b.placement.physical_to_logical)
    assert a.objective == b.objective
    on_ray = ("ray_tasks", "ray_nodes")  # where it ran, not what it found
    assert {k: v for k, v in a.terms.items() if k not in on_ray} == \
        {k: v for k, v in b.terms.items() if k not in on_ray}


def test_layer_groups_cover_every_layer_once():
    tasks = list(range(10))
    for n in (1, 3, 4, 10, 25):
        groups = layer_groups(tasks, n)
        assert [t for g in groups for t in g] == tasks
        assert len(groups) == min(n, 10)
        assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_process_pool_equals_serial():
    problem = _problem()
    serial = solve(problem, "placer", iterations=1500, seed=3, num_workers=1)
    pooled = solve(problem, "placer", iterations=1500, seed=3, num_workers=2)
    _same(serial, pooled)


@pytest.mark.ray
def test_ray_equals_local(ray_session):
    problem = _problem()
    local = solve(problem, "placer", iterations=1500, seed=3, num_workers=1)
    remote = solve(problem, "placer", iterations=1500, seed=3, ray_address="auto")
    _same(local, remote)
    assert remote.backend.endswith("+ray")
    assert remote.terms["ray_nodes"] == 1 and remote.terms["ray_tasks"] >= 1  # the session's one node
    assert "ray_nodes" not in local.terms
