"""The compiled packing of ``keep_in_place`` (``ilp.packing._pack_layers``) returns exactly what
its Python form (``_pack_numpy``, the packing before it was compiled, used on a cold numba cache)
returns, on random placements with replicas, ties in the load and every tolerance solve_from
uses (0 to infinite, and -1)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from placer.ilp.packing import _pack_compiled, _pack_numpy, keep_in_place
from placer.types import Placement


@st.composite
def cases(draw):
    """(old, target, load): 1-8 GPUs x 1-4 slots, 1-3 layers, every expert placed, the other slots
    replicas; loads continuous, or small integers (ties), some experts without load."""
    g, s = draw(st.integers(1, 8)), draw(st.integers(1, 4))
    e, layers = draw(st.integers(1, g * s)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def placement() -> Placement:
        return Placement(np.stack([rng.permutation(np.concatenate([np.arange(e), rng.integers(0, e, g * s - e)]))
                                   for _ in range(layers)]), s, e)

    old, target = placement(), placement()
    load = rng.integers(0, 3, (layers, e)).astype(float) if draw(st.booleans()) else rng.random((layers, e))
    load[:, :draw(st.integers(0, e))] = 0.0
    return old, draw(st.sampled_from([old, target])), load


@settings(max_examples=150, deadline=None)
@given(cases(), st.sampled_from([0.0, 0.05, 0.2, 1.0, -1.0, float("inf")]))
def test_packing_equals_the_reference(case, tolerance):
    old, target, load = case
    got = _pack_compiled(old, target, load, tolerance)
    assert np.array_equal(got, _pack_numpy(old, target, load, tolerance))
    assert np.array_equal(keep_in_place(old, target, load, tolerance=tolerance).physical_to_logical, got)
