import numpy as np
import pytest

from placer.errors import PlacementError
from placer.presets import get_model, make_topology
from placer.types import ModelSpec, Placement
from placer.validate import check_placement, expert_memory_per_gpu, placement_violations


def test_valid_placement_passes():
    model = get_model("mixtral-8x7b")
    p = Placement(np.tile(np.arange(8), (32, 1)), 2, 8)
    assert check_placement(p, model, make_topology("h100", gpus=4)) is p
    assert placement_violations(p, model, make_topology("h100", gpus=4)) == []
    assert expert_memory_per_gpu(p, model) == pytest.approx(2 * 32 * 3 * 4096 * 14336 * 2)


def test_mismatches_are_named():
    model = get_model("mixtral-8x7b")
    p = Placement(np.tile(np.arange(8), (31, 1)), 2, 8)
    v = placement_violations(p, model, make_topology("h100", gpus=8))
    assert any("31 layers" in s for s in v) and any("cluster has 8" in s for s in v)
    with pytest.raises(PlacementError, match="31 layers"):
        check_placement(p, model)


def test_memory_limit():
    model = get_model("mixtral-8x7b")
    p = Placement(np.tile(np.arange(8), (32, 1)), 8, 8)  # all 8 experts on one GPU: 90 GB
    with pytest.raises(PlacementError, match="GB per GPU"):
        check_placement(p, model, make_topology("h100", gpus=1))
    check_placement(p, model, make_topology("h200", gpus=1))
    unknown = ModelSpec.from_shape(32, 8, 2)
    check_placement(p, unknown, make_topology("h100", gpus=1), memory_limit_bytes=1.0)
