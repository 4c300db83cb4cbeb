"""Small models and random traces for the placer.io tests."""

from __future__ import annotations

import numpy as np
import pytest
from io_helpers import random_ids

from placer.types import ModelSpec, RoutingTrace


@pytest.fixture
def tiny() -> ModelSpec:
    """4 hidden layers, the first dense; 8 experts, top-2."""
    return ModelSpec(name="tiny", num_hidden_layers=4, moe_layer_ids=(1, 2, 3), num_experts=8, top_k=2,
                     hidden_size=64, expert_ffn_size=32)


@pytest.fixture
def trace(rng: np.random.Generator, tiny: ModelSpec) -> RoutingTrace:
    """50 tokens of the tiny model with every optional field."""
    t = 50
    ids = random_ids(rng, t, tiny.num_moe_layers, tiny.num_experts, tiny.top_k)
    gates = np.sort(rng.random(ids.shape), axis=-1)[..., ::-1].astype(np.float32)
    return RoutingTrace(ids, tiny.num_experts, "sorted", gate_weights=gates,
                        request_ids=np.repeat(np.arange(5), 10), phase=np.tile([0, 1], 25).astype(np.int8),
                        home_rank=np.arange(t) % 4, model=tiny)
