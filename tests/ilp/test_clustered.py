"""The ``clustered`` start (:func:`placer.ilp.clustered.clustered_map`)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from placer.ilp import PlacementProblem
from placer.ilp.clustered import clustered_map
from placer.ilp.starts import start_maps
from placer.presets import make_topology
from placer.stats import compute_stats
from placer.types import ModelSpec, Placement, RoutingTrace
from placer.validate import check_placement, duplicate_copies


def _planted(tokens: int, layers: int, clusters: int, size: int, top_k: int, seed: int) -> np.ndarray:
    """int [T, L, K]: each token takes ``top_k`` experts of one random cluster (experts
    ``c * size .. c * size + size - 1``) per layer, cluster popularity mildly skewed (no
    cluster above :data:`~placer.ilp.clustered.CLUSTER_LOAD_SHARE` of a node's load)."""
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(clusters, 20.0))
    out = np.empty((tokens, layers, top_k), dtype=np.int64)
    for layer in range(layers):
        pick = rng.choice(clusters, size=tokens, p=popularity)
        for t in range(tokens):
            out[t, layer] = pick[t] * size + rng.choice(size, top_k, replace=False)
    return out


def test_planted_clusters_share_a_node_and_the_hottest_experts_sit_on_every_node():
    experts, size, gpus, gpn, spg = 32, 4, 8, 4, 5  # 2 nodes, 8 redundant slots
    ids = _planted(3000, 2, experts // size, size, 3, seed=1)
    load = np.stack([np.bincount(ids[:, layer].ravel(), minlength=experts) for layer in range(2)]).astype(float)
    p2l = clustered_map(ids, load, gpus, gpn, spg)
    placement = Placement(p2l, spg, experts)
    check_placement(placement, ModelSpec.from_shape(2, experts, 3), make_topology(gpus=gpus, nodes=gpus // gpn))
    assert not duplicate_copies(placement)  # room for distinct GPUs: every copy on its own
    node_of_slot = np.arange(gpus * spg) // spg // gpn
    for layer in range(2):
        nodes = [set(node_of_slot[p2l[layer] == e].tolist()) for e in range(experts)]
        hot = np.argsort(-load[layer], kind="stable")[:8]  # R // (N - 1) = 8
        assert all(nodes[e] == {0, 1} for e in hot)
        assert sum(len(n) for n in nodes) == experts + 8  # every redundant slot on a hot expert
        for c in range(experts // size):  # the rest of each cluster on one node
            rest = [e for e in range(c * size, (c + 1) * size) if e not in hot]
            assert len(set().union(*(nodes[e] for e in rest))) <= 1, (layer, c, rest)


@given(st.integers(0, 10_000), st.sampled_from([(4, 2), (8, 2), (8, 4), (6, 3), (16, 4)]),
       st.integers(6, 40), st.integers(0, 20), st.integers(1, 4))
def test_valid_on_any_shape(seed, shape, experts, redundant, top_k):
    """Every expert at least once per layer, slots per GPU exact, deterministic."""
    gpus, nodes = shape
    redundant += (-(experts + redundant)) % gpus  # slots split evenly
    spg = (experts + redundant) // gpus
    rng = np.random.default_rng(seed)
    top_k = min(top_k, experts)
    ids = np.stack([[rng.choice(experts, top_k, replace=False, p=rng.dirichlet(np.ones(experts)))
                     for _ in range(2)] for _ in range(60)])
    load = rng.gamma(0.5, size=(2, experts)) + 1e-3
    p2l = clustered_map(ids, load, gpus, gpus // nodes, spg)
    check_placement(Placement(p2l, spg, experts), ModelSpec.from_shape(2, experts, top_k),
                    make_topology(gpus=gpus, nodes=nodes))
    np.testing.assert_array_equal(p2l, clustered_map(ids, load, gpus, gpus // nodes, spg))


def _problem(nodes: int, top_k: int = 2) -> PlacementProblem:
    rng = np.random.default_rng(0)
    ids = np.stack([[rng.choice(16, top_k, replace=False) for _ in range(2)] for _ in range(200)]).astype(np.int16)
    trace = RoutingTrace(expert_ids=ids, num_experts=16, model=ModelSpec.from_shape(2, 16, top_k))
    return PlacementProblem(compute_stats(trace), trace.model, make_topology(gpus=4, nodes=nodes), num_redundant=4)


def test_placer_starts_from_it_on_several_nodes_with_a_token_sample():
    assert "clustered" in start_maps(_problem(nodes=2))
    assert "clustered" not in start_maps(_problem(nodes=1))  # one node: no network to keep tokens off
    assert "clustered" not in start_maps(_problem(nodes=2, top_k=1))  # nothing is co-activated
