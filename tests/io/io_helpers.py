"""Helpers shared by the placer.io tests."""

from __future__ import annotations

import numpy as np

from placer.types import RoutingTrace


def random_ids(rng: np.random.Generator, tokens: int, layers: int, experts: int, top_k: int) -> np.ndarray:
    """Distinct expert ids per token and layer. Shape: int64 [tokens, layers, top_k]."""
    return np.argsort(rng.random((tokens, layers, experts)), axis=-1)[..., :top_k].astype(np.int64)


def assert_same_trace(a: RoutingTrace, b: RoutingTrace) -> None:
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    assert a.num_experts == b.num_experts and a.order == b.order
    for name in ("gate_weights", "request_ids", "phase", "home_rank"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y)
