"""Compute model (roofline) and how CostModel lays out a step's phases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from placer.simulator.config import ComputeParams, SimConfig, kernel_preset
from placer.simulator.cost import BatchShape, CostModel, PhaseKind
from placer.simulator.cost.compute import ComputeModel
from placer.simulator.routing import token_traffic
from placer.types import ModelSpec, Placement, Topology

pytestmark = pytest.mark.timeout(60)

TOPO = Topology(name="t", num_nodes=2, gpus_per_node=2)
MODEL = ModelSpec(name="t", num_hidden_layers=2, moe_layer_ids=(0, 1), num_experts=8, top_k=2, hidden_size=256,
                  expert_ffn_size=512)
SHARED = ModelSpec(name="s", num_hidden_layers=2, moe_layer_ids=(0, 1), num_experts=8, top_k=2, hidden_size=256,
                   expert_ffn_size=512, num_shared_experts=1)


def test_gemm_efficiency_interpolates_deepgemm_and_clamps():
    comp = ComputeModel(ComputeParams(), TOPO, MODEL, 3)
    np.testing.assert_allclose(comp.efficiency(np.array([1.0, 256.0, 512.0, 1024.0, 4096.0, 1e6])),
                               [0.47, 0.47, 0.53, 0.62, 0.68, 0.68])
    mid = comp.efficiency(np.array([362.0]))[0]  # log-linear between 256 and 512
    assert 0.47 < mid < 0.53


def test_expert_time_roofline_by_hand():
    params = ComputeParams()
    comp = ComputeModel(params, TOPO, MODEL, 3)
    assert comp.peak == TOPO.bf16_flops  # 2-byte weights
    h, inter = 256, 512
    slots = np.zeros((2, 12))
    slots[0, 0] = 100.0                    # GPU 0: one expert, 100 rows (memory-bound)
    slots[0, 3], slots[0, 4] = 3000.0, 1000.0  # GPU 1: two experts, 2000 rows each on average
    t = comp.expert_times(slots, np.zeros((2, 4)))

    def roof(pairs, active):
        flops = 6.0 * h * inter * pairs
        eff = comp.efficiency(np.array([pairs / active]))[0]
        bytes_ = 3.0 * h * inter * 2 * active + (2.0 * h + 2.0 * inter) * 2 * pairs
        return max(flops / (TOPO.bf16_flops * eff), bytes_ / (TOPO.hbm_gbps * 1e9 * params.hbm_efficiency)) + 5e-6

    np.testing.assert_allclose(t[0], [roof(100, 1), roof(4000, 2), 5e-6, 5e-6])
    np.testing.assert_allclose(t[1], [5e-6] * 4)  # only the launch when idle


def test_fp8_weights_use_the_fp8_peak():
    fp8 = ModelSpec(name="q", num_hidden_layers=2, moe_layer_ids=(0, 1), num_experts=8, top_k=2, hidden_size=256,
                    expert_ffn_size=512, weight_bytes=1.0)
    assert ComputeModel(ComputeParams(), TOPO, fp8, 3).peak == TOPO.fp8_flops


@pytest.mark.parametrize("model", [MODEL, SHARED], ids=["routed", "shared"])
@given(seed=st.integers(0, 2**16), slot=st.integers(0, 11), extra=st.floats(0.5, 5000.0),
       sparse=st.booleans(), local_extra=st.floats(0.0, 500.0))
def test_more_pairs_on_a_gpu_are_never_faster(model, seed, slot, extra, sparse, local_extra):
    comp = ComputeModel(ComputeParams(), TOPO, model, 3)
    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, 5000, (2, 12)).astype(float)
    if sparse:
        pairs *= rng.random((2, 12)) < 0.3
    local = rng.integers(0, 2000, (2, 4)).astype(float)
    before = comp.expert_times(pairs, local)
    more = pairs.copy()
    more[1, slot] += extra
    more_local = local.copy()
    more_local[1, slot // 3] += local_extra
    after = comp.expert_times(more, more_local)
    assert np.all(after >= before * (1 - 1e-12))
    assert after[1, slot // 3] > before[1, slot // 3]  # strictly: more FLOPs and more bytes


@given(tokens=st.floats(0.0, 4096.0), more=st.floats(0.0, 4096.0), ctx=st.floats(0.0, 1e6),
       more_ctx=st.floats(0.0, 1e6))
def test_attention_and_dense_grow_with_tokens_and_context(tokens, more, ctx, more_ctx):
    comp = ComputeModel(ComputeParams(), TOPO, MODEL, 3)
    a = comp.attention_times(np.array([tokens]), np.array([ctx]), np.array([0.0]))
    b = comp.attention_times(np.array([tokens + more]), np.array([ctx + more_ctx]), np.array([0.0]))
    assert b[0] >= a[0] * (1 - 1e-12)
    assert comp.dense_times(np.array([tokens + more]))[0] >= comp.dense_times(np.array([tokens]))[0] * (1 - 1e-12)


def test_idle_gpus_cost_nothing_for_attention_and_dense():
    comp = ComputeModel(ComputeParams(), TOPO, MODEL, 3)
    np.testing.assert_array_equal(comp.attention_times(np.zeros(4), np.zeros(4), np.zeros(4)), 0.0)
    np.testing.assert_array_equal(comp.dense_times(np.zeros(4)), 0.0)
    assert comp.attention_times(np.array([1.0]), np.zeros(1), np.zeros(1))[0] > 5e-6


def test_step_cost_lays_out_phases_per_layer():
    # Layer 0 dense, layers 1 and 2 MoE.
    model = ModelSpec(name="d", num_hidden_layers=3, moe_layer_ids=(1, 2), num_experts=8, top_k=2, hidden_size=256,
                      expert_ffn_size=512)
    placement = Placement(np.tile(np.arange(8), (2, 1)), 2, 8)
    config = SimConfig(network=kernel_preset("deepep-normal"),
                       compute=ComputeParams(step_overhead_s=7e-6))
    cost = CostModel(model, TOPO, placement, config)
    K = PhaseKind
    assert list(cost.kinds) == [K.ATTENTION, K.DENSE, K.ATTENTION, K.DISPATCH, K.COMPUTE, K.COMBINE,
                                K.ATTENTION, K.DISPATCH, K.COMPUTE, K.COMBINE, K.OTHER]
    rng = np.random.default_rng(0)
    home = np.repeat(np.arange(4), 3)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(2)]) for _ in range(12)])
    traffic = token_traffic(placement, TOPO, ids, home)
    n = np.full(4, 3.0)
    shape = BatchShape(prefill_tokens=np.zeros(4), decode_tokens=n, decode_context=n * 100,
                       prefill_positions=np.zeros(4))
    sc = cost.step_cost(traffic, shape)
    net = cost.network.evaluate(traffic)
    np.testing.assert_allclose(sc.durations_s[cost.kinds == K.DISPATCH], net.dispatch.time_s)
    np.testing.assert_allclose(sc.durations_s[cost.kinds == K.COMBINE], net.combine.time_s)
    expert = cost.compute.expert_times(traffic.slots, np.broadcast_to(n, (2, 4)))
    np.testing.assert_allclose(sc.durations_s[cost.kinds == K.COMPUTE], expert.max(axis=1))
    assert sc.durations_s[-1] == pytest.approx(7e-6)
    assert sc.total_s == pytest.approx(sc.durations_s.sum())
    np.testing.assert_array_equal(sc.gpu_pairs, traffic.slots.reshape(2, 4, 2).sum(axis=2))
    assert sc.gpu_pairs.sum() == 12 * 2 * 2
    rank = net.dispatch.rank_s + expert + net.combine.rank_s
    np.testing.assert_array_equal(sc.straggler, rank.argmax(axis=1))
    assert np.all(sc.durations_s >= 0)
