"""The movement-aware re-solve (placer.runtime.resolve)."""

from __future__ import annotations

import numpy as np

from placer.runtime import plan_migration
from placer.runtime.resolve import gpu_balance, sticky_repack
from placer.types import Placement, Topology


def test_sticky_repack_keeps_counts_and_experts_in_place():
    #         GPU 0      GPU 1      GPU 2      GPU 3
    old = Placement([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]], 3, 8)
    # The re-solve replicates 7 and 6 instead of 0 and 1 and shuffles every GPU.
    target = Placement([[7, 2, 4, 6, 0, 7, 3, 1, 6, 5, 2, 3]], 3, 8)
    load = np.array([[10.0, 10, 20, 20, 10, 10, 40, 40]])
    out = sticky_repack(old, target, load, tolerance=0.1)
    np.testing.assert_array_equal(out.logcnt(), target.logcnt())
    topo = Topology("t", 1, 4)
    sticky = plan_migration(old, out, topo, expert_bytes=1.0)
    eplb = plan_migration(old, target, topo, expert_bytes=1.0)
    assert (sticky.bytes_moved, eplb.bytes_moved) == (1.0, 4.0)  # 6 sent to GPU 3; the 2nd 7 is a local copy
    # Greedy: GPUs 0-2 keep their experts (GPU 2 drops its third slot, expert 0 has one replica
    # now), the new replicas of 6 and 7 fill the two free slots; the only slot left for the second
    # 7 is on GPU 2, which holds 7 already (the documented limit of the fill phase).
    assert out.physical_to_logical.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 7, 2, 3, 6]]
    np.testing.assert_allclose(gpu_balance(out, load), [1.5])
    assert gpu_balance(target, load)[0] < 1.5 < gpu_balance(old, load)[0]


def test_gpu_balance_splits_load_over_replicas():
    p = Placement([[0, 1, 0, 2]], 2, 3)  # GPU 0: {0, 1}, GPU 1: {0, 2}
    bal = gpu_balance(p, np.array([[4.0, 2.0, 2.0]]))  # GPU loads 2 + 2, 2 + 2
    np.testing.assert_allclose(bal, [1.0])
