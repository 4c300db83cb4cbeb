"""The kernel presets against DeepEP's published rows (benchmarks/fidelity.md): fitted rows within
the fit's tolerance, predicted rows within the issue's targets. A preset change that breaks the
calibration fails here; rerun benchmarks/calibrate_deepep*.py and update fidelity.md."""

from __future__ import annotations

import numpy as np
import pytest

from placer.simulator.a2a import a2a_benchmark
from placer.simulator.config import kernel_preset
from placer.simulator.cost.network import LinkBytes, NetworkModel
from placer.types import ModelSpec, Topology

pytestmark = pytest.mark.timeout(120)


def rel(got: float, want: float) -> float:
    return abs(got / want - 1)


# V1 low-latency (docs/legacy.md): H800, 128 tokens per rank, hidden 7168, top-8, 288 experts
# (the largest multiple of EP not above 288), us per kernel call.
@pytest.mark.parametrize(("ep", "dispatch_us", "combine_us"), [(8, 77.0, 114.0), (16, 118.0, 195.0)])
def test_low_latency_fitted_rows_within_5_percent(ep, dispatch_us, combine_us):
    out = a2a_benchmark(cluster="h800", ep=ep, tokens_per_rank=128, hidden=7168, top_k=8, experts=288 // ep * ep,
                        kernel="deepep-ll", routing="uniform")
    assert rel(out["dispatch_us"], dispatch_us) <= 0.05
    assert rel(out["combine_us"], combine_us) <= 0.05
    # DeepEP's own count: every selection at the token size (7,408 B fp8 + scales + metadata).
    assert out["deepep_count"] == "selections"
    assert out["deepep_dispatch_gbps"] == pytest.approx(128 * 8 * 7408 / (out["dispatch_us"] * 1e-6) / 1e9)


def test_low_latency_predictions_grow_with_ep_and_stay_nic_bound():
    """Predictions written to fidelity.md: time rises with the share of remote selections."""
    times = [a2a_benchmark(cluster="h800", ep=ep, tokens_per_rank=128, experts=288 // ep * ep, kernel="deepep-ll",
                           routing="uniform") for ep in (32, 64, 128, 256)]
    assert all(t["bottleneck"] == "rdma" for t in times)
    d = [t["dispatch_us"] for t in times]
    assert d == sorted(d)


# V1 normal (docs/legacy.md): H800, 4096 tokens per rank, routed as DeepEP's tests route.
@pytest.mark.parametrize(("ep", "dispatch", "combine", "tol"),
                         [(8, 153.0, 158.0, 0.03), (16, 43.0, 43.0, 0.01), (32, 58.0, 57.0, 0.15),
                          (64, 51.0, 50.0, 0.15)])
def test_normal_kernels_within_15_percent_of_the_published_table(ep, dispatch, combine, tol):
    out = a2a_benchmark(cluster="h800", ep=ep, tokens_per_rank=4096, experts=256, kernel="deepep-normal",
                        routing="deepep")
    key = "deepep_{}_gbps" if out["bottleneck"] == "rdma" else "{}_gbps"
    assert rel(out[key.format("dispatch")], dispatch) <= tol
    assert rel(out[key.format("combine")], combine) <= tol


# V2 (README): SM90 + CX7, 8192 tokens per rank, logical bandwidth (tokens x nodes hit).
def test_v2_fitted_on_8x2_predicts_8x4_within_10_percent():
    def run(ep):
        return a2a_benchmark(cluster="h100", ep=ep, tokens_per_rank=8192, experts=256, kernel="deepep-v2",
                             routing="uniform")
    fit, pred = run(16), run(32)
    assert fit["deepep_count"] == pred["deepep_count"] == "nodes-hit"
    assert rel(fit["deepep_dispatch_gbps"], 90.0) <= 0.01
    assert rel(pred["deepep_dispatch_gbps"], 61.0) <= 0.10
    assert rel(pred["deepep_combine_gbps"], 61.0) <= 0.10


def test_deepep_routing_is_uniform_in_a_node_and_node_grouped_across():
    one = a2a_benchmark(cluster="h800", ep=8, tokens_per_rank=64, experts=64, routing="deepep", top_k=8)
    uni = a2a_benchmark(cluster="h800", ep=8, tokens_per_rank=64, experts=64, routing="uniform", top_k=8)
    assert one["dispatch_us"] == uni["dispatch_us"]
    # 8 nodes: at most 4 nodes per token, so DeepEP's count is at most 4 nodes per token.
    eight = a2a_benchmark(cluster="h800", ep=64, tokens_per_rank=64, experts=256, routing="deepep", top_k=8)
    per_token = eight["deepep_dispatch_gbps"] * eight["dispatch_us"] * 1e3 / 64 / (7168 * (1 + 4 / 128))
    assert 1 < per_token <= 4 + 1e-9


MODEL = ModelSpec(name="t", num_hidden_layers=1, moe_layer_ids=(0,), num_experts=8, top_k=2, hidden_size=128,
                  expert_ffn_size=1)
TOPO = Topology(name="t", num_nodes=2, gpus_per_node=1)


def test_message_rate_bounds_small_messages_and_bandwidth_large_ones():
    params = kernel_preset("deepep-ll", launch_s=0.0, recv_hbm_passes=0.0, rdma_hop_s=0.0, message_rate=1e6)
    net = NetworkModel(params, TOPO, MODEL)
    for messages, size in ((1000.0, 100.0), (10.0, 1e7)):
        rd = np.zeros((1, 2, 2))
        rd[0, 0, 1] = messages * size
        msgs = np.zeros((1, 2, 2))
        msgs[0, 0, 1] = messages
        t = net.phase_times(LinkBytes(nvlink=np.zeros_like(rd), rdma=rd, rdma_messages=msgs)).time_s[0]
        want = max(messages / 1e6, messages * size / net.rdma_Bps)
        assert t == pytest.approx(want)
        fifo = NetworkModel(kernel_preset("deepep-ll", launch_s=0.0, recv_hbm_passes=0.0, rdma_hop_s=0.0,
                                          message_rate=1e6, congestion="fifo"), TOPO, MODEL)
        assert fifo.phase_times(LinkBytes(nvlink=np.zeros_like(rd), rdma=rd, rdma_messages=msgs)).time_s[0] >= t


def test_receive_side_pack_counts_local_selections_over_hbm():
    params = kernel_preset("deepep-ll", launch_s=0.0, recv_hbm_passes=2.0)
    net = NetworkModel(params, TOPO, MODEL)
    zero = np.zeros((1, 2, 2))
    received = np.array([[3e6, 0.0]])
    t = net.phase_times(LinkBytes(nvlink=zero, rdma=zero, received=received))
    np.testing.assert_allclose(t.rank_s[0], [2 * 3e6 / net.hbm_Bps, 0.0])
