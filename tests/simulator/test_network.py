"""All-to-all network model: byte accounting per kernel on hand-built cases, the fast port-sum
path against the per-link path, FIFO against the closed form, and monotonicity."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from placer.simulator.config import NetworkParams, ServingWorkload, SimConfig, kernel_preset
from placer.simulator.cost import BatchShape, CostModel
from placer.simulator.cost.network import LinkBytes, NetworkModel, allgather_s, token_bytes
from placer.simulator.routing import Traffic, routing_rates, sample_traffic, token_traffic
from placer.simulator.workload import routing_pool
from placer.types import ModelSpec, Placement, Topology

pytestmark = pytest.mark.timeout(60)

H = 256
MODEL = ModelSpec(name="t", num_hidden_layers=1, moe_layer_ids=(0,), num_experts=8, top_k=3, hidden_size=H,
                  expert_ffn_size=512)
TOPO = Topology(name="t", num_nodes=2, gpus_per_node=2)  # GPUs 0, 1 on node 0; 2, 3 on node 1
CONTIGUOUS = Placement(np.arange(8)[None, :], 2, 8)  # GPU g holds experts 2g, 2g + 1

# Four tokens with known experts (one layer, top-3) and their home ranks.
IDS = np.array([[[0, 1, 2]],   # home 0: GPU 0 (two experts, local), GPU 1
                [[4, 5, 6]],   # home 0: GPU 2 (two experts), GPU 3: one remote node
                [[0, 2, 7]],   # home 3: GPU 0, GPU 1, GPU 3 (local)
                [[6, 7, 3]]])  # home 1: GPU 3 (two experts), GPU 1 (local)
HOME = np.array([0, 0, 3, 1])

FP8 = H + H / 128 * 4          # 264
FP8_LL = FP8 + 16              # 280
BF16 = 2.0 * H                 # 512


def mat(entries, g=4):
    out = np.zeros((g, g))
    for (s, d), v in entries.items():
        out[s, d] = v
    return out


@pytest.fixture(scope="module")
def traffic():
    return token_traffic(CONTIGUOUS, TOPO, IDS, HOME)


def test_token_bytes():
    assert token_bytes(H, "fp8", "deepep-normal") == FP8 == 264.0
    assert token_bytes(H, "fp8", "nccl") == FP8
    assert token_bytes(H, "fp8", "deepep-ll") == FP8_LL == 280.0
    assert token_bytes(H, "bf16", "deepep-ll") == BF16 == token_bytes(H, "bf16", "nccl")
    assert token_bytes(7168, "fp8", "deepep-normal") == 7168 + 224


def test_nccl_sends_each_token_once_per_destination_rank_directly(traffic):
    net = NetworkModel(kernel_preset("nccl"), TOPO, MODEL)
    assert net.dispatch_bytes == net.combine_bytes == BF16
    d, c = net.link_bytes(traffic)
    nv = mat({(0, 1): 1})
    rd = mat({(0, 2): 1, (0, 3): 1, (3, 0): 1, (3, 1): 1, (1, 3): 1})
    np.testing.assert_array_equal(d.nvlink[0], nv * BF16)
    np.testing.assert_array_equal(d.rdma[0], rd * BF16)
    assert d.forward is None and c.forward is None
    np.testing.assert_array_equal(c.nvlink[0], nv.T * BF16)
    np.testing.assert_array_equal(c.rdma[0], rd.T * BF16)


def test_deepep_normal_sends_once_per_remote_node_then_forwards_over_nvlink(traffic):
    net = NetworkModel(kernel_preset("deepep-normal"), TOPO, MODEL)
    assert (net.dispatch_bytes, net.combine_bytes) == (FP8, BF16)
    d, c = net.link_bytes(traffic)
    # RDMA: one message per (token, remote node) to the GPU with the sender's local index:
    # GPU 0 (local 0) -> GPU 2; GPU 3 (local 1) -> GPU 1; GPU 1 (local 1) -> GPU 3.
    rd = mat({(0, 2): 1, (3, 1): 1, (1, 3): 1})
    # Forwarding on the remote node: token 1 lands on GPU 2 and goes on to GPU 3; token 2 lands
    # on GPU 1 and goes on to GPU 0; token 3 lands on GPU 3, its only destination there.
    fw = mat({(2, 3): 1, (1, 0): 1})
    nv = mat({(0, 1): 1}) + fw  # direct intra-node (token 0: 0 -> 1) plus the forwards
    np.testing.assert_array_equal(d.rdma[0], rd * FP8)
    np.testing.assert_array_equal(d.forward[0], fw * FP8)
    np.testing.assert_array_equal(d.nvlink[0], nv * FP8)
    # Combine: the reverse path with bf16 tokens.
    np.testing.assert_array_equal(c.rdma[0], rd.T * BF16)
    np.testing.assert_array_equal(c.forward[0], fw.T * BF16)
    np.testing.assert_array_equal(c.nvlink[0], nv.T * BF16)


def test_deepep_normal_forwarding_on_three_nodes():
    topo = Topology(name="t", num_nodes=3, gpus_per_node=2)
    placement = Placement(np.arange(12)[None, :], 2, 12)  # GPU g holds experts 2g, 2g + 1
    model = replace(MODEL, num_experts=12)
    # From GPU 0 (node 0, local 0) to GPU 1, GPU 3 (node 1, local 1) and GPU 5 (node 2, local 1); from
    # GPU 3 (local 1) to GPU 1 (node 0, local 1: lands there) and GPU 4 (node 2, local 0: via GPU 5).
    tr = token_traffic(placement, topo, np.array([[[6, 10, 2]], [[2, 8, 7]]]), np.array([0, 3]))
    d, _ = NetworkModel(kernel_preset("deepep-normal"), topo, model).link_bytes(tr)
    np.testing.assert_array_equal(d.rdma[0], mat({(0, 2): 1, (0, 4): 1, (3, 1): 1, (3, 5): 1}, 6) * FP8)
    np.testing.assert_array_equal(d.forward[0], mat({(2, 3): 1, (4, 5): 1, (5, 4): 1}, 6) * FP8)
    np.testing.assert_array_equal(d.nvlink[0], mat({(0, 1): 1, (2, 3): 1, (4, 5): 1, (5, 4): 1}, 6) * FP8)
    assert d.rdma.shape == (1, 6, 6)


def test_deepep_ll_sends_once_per_token_expert_pair(traffic):
    net = NetworkModel(kernel_preset("deepep-ll"), TOPO, MODEL)
    assert (net.dispatch_bytes, net.combine_bytes) == (FP8_LL, BF16)
    d, c = net.link_bytes(traffic)
    nv = mat({(0, 1): 1})
    rd = mat({(0, 2): 2, (0, 3): 1, (3, 0): 1, (3, 1): 1, (1, 3): 2})
    np.testing.assert_array_equal(d.nvlink[0], nv * FP8_LL)
    np.testing.assert_array_equal(d.rdma[0], rd * FP8_LL)
    np.testing.assert_array_equal(c.rdma[0], rd.T * BF16)
    np.testing.assert_array_equal(c.nvlink[0], nv.T * BF16)


def test_deepep_ll_needs_pairs(traffic):
    net = NetworkModel(kernel_preset("deepep-ll"), TOPO, MODEL)
    with pytest.raises(ValueError, match="pair"):
        net.link_bytes(replace(traffic, pairs=None))


def test_dtype_overrides_change_the_token_size(traffic):
    net = NetworkModel(kernel_preset("deepep-normal", dispatch_dtype="bf16", combine_dtype="fp8"), TOPO, MODEL)
    d, c = net.link_bytes(traffic)
    assert d.rdma[0, 0, 2] == BF16 and c.rdma[0, 2, 0] == FP8


def test_deepep_normal_on_one_node_is_direct():
    topo = Topology(name="t", num_nodes=1, gpus_per_node=4)
    tr = token_traffic(CONTIGUOUS, topo, IDS, HOME)
    d, _ = NetworkModel(kernel_preset("deepep-normal"), topo, MODEL).link_bytes(tr)
    assert d.forward is None and not d.rdma.any()
    np.testing.assert_array_equal(d.nvlink, tr.tokens * FP8)


def test_context_coherent_adds_state_moves_to_dispatch_only(traffic):
    moves = mat({(0, 1): 2, (2, 0): 3})[None]  # one intra-node, one inter-node move
    cc = replace(traffic, moves=moves)
    for kernel in ("nccl", "deepep-normal", "deepep-ll"):
        net = NetworkModel(kernel_preset(kernel), TOPO, MODEL)
        d0, c0 = net.link_bytes(traffic)
        d1, c1 = net.link_bytes(cc)
        np.testing.assert_array_equal(d1.nvlink - d0.nvlink, mat({(0, 1): 2 * BF16})[None])
        np.testing.assert_array_equal(d1.rdma - d0.rdma, mat({(2, 0): 3 * BF16})[None])
        np.testing.assert_array_equal(c1.nvlink, c0.nvlink)
        np.testing.assert_array_equal(c1.rdma, c0.rdma)


def test_phase_time_closed_form_by_hand():
    """One GPU sends 1000 bf16 tokens over RDMA: hop + bytes / (bandwidth x efficiency) + launch."""
    params = NetworkParams(kernel="nccl", dispatch_dtype="bf16", combine_dtype="bf16", launch_s=1e-6,
                           nvlink_hop_s=2e-6, rdma_hop_s=5e-6, rdma_efficiency=0.5)
    net = NetworkModel(params, TOPO, MODEL)
    rd = np.zeros((1, 4, 4))
    rd[0, 0, 2] = 1000 * BF16
    nv = np.zeros((1, 4, 4))
    nv[0, 1, 0] = 10 * BF16
    t = net.phase_times(LinkBytes(nvlink=nv, rdma=rd))
    rdma_bps = TOPO.nic_gbps * 1e9 * 0.5
    expect_rd = 5e-6 + 1000 * BF16 / rdma_bps + 1e-6
    expect_nv = 2e-6 + 10 * BF16 / (TOPO.nvlink_gbps * 1e9) + 1e-6
    np.testing.assert_allclose(t.rank_s[0], [expect_rd, expect_nv, expect_rd, 1e-6])
    np.testing.assert_allclose(t.time_s, [expect_rd])


def test_fifo_serialises_messages_on_a_port_by_hand():
    params = NetworkParams(kernel="nccl", dispatch_dtype="bf16", combine_dtype="bf16", nvlink_hop_s=1e-6,
                           congestion="fifo")
    topo = Topology(name="t", num_nodes=1, gpus_per_node=4)
    net = NetworkModel(params, topo, MODEL)
    bw = topo.nvlink_gbps * 1e9
    nv = np.zeros((1, 4, 4))
    b = 1e6
    nv[0, 0, 1] = nv[0, 0, 2] = b  # GPU 0 sends b to GPU 1, then b to GPU 2 (NCCL peer order)
    t = net.phase_times(LinkBytes(nvlink=nv, rdma=np.zeros_like(nv)))
    # GPU 0 is done when its last message has landed, as in the closed form.
    np.testing.assert_allclose(t.rank_s[0], [1e-6 + 2 * b / bw, 1e-6 + b / bw, 1e-6 + 2 * b / bw, 0.0])
    np.testing.assert_allclose(t.time_s, [1e-6 + 2 * b / bw])


# --------------------------------------------------------------------------------------------
# Random traffic: fast path == per-link path; FIFO never faster than the closed form
# --------------------------------------------------------------------------------------------

BIG = ModelSpec(name="big", num_hidden_layers=2, moe_layer_ids=(0, 1), num_experts=16, top_k=4,
                hidden_size=7168, expert_ffn_size=2048)


def random_traffic(seed: int, nodes: int, gpn: int, layers: int, scale: int, coherent: bool) -> Traffic:
    """Any non-negative counts (the network model needs no consistency between the fields)."""
    rng = np.random.default_rng(seed)
    g = nodes * gpn
    off = 1.0 - np.eye(g)
    sparse = rng.random((layers, g, g)) < 0.6
    tokens = rng.integers(0, scale + 1, (layers, g, g)) * sparse * off
    node_of = np.arange(g) // gpn
    nodes_arr = rng.integers(0, scale + 1, (layers, g, nodes)).astype(float)
    nodes_arr[:, np.arange(g), node_of] = 0.0
    pairs = tokens * rng.integers(1, 4, tokens.shape) + np.eye(g) * rng.integers(0, scale + 1, (layers, g, 1))
    moves = rng.integers(0, scale // 4 + 1, (layers, g, g)) * off if coherent else None
    return Traffic(src=np.ones((layers, g)), tokens=tokens.astype(float), nodes=nodes_arr,
                   pairs=pairs.astype(float), slots=np.zeros((layers, 16)),
                   moves=None if moves is None else moves.astype(float))


def params_of(kernel: str, congestion: str = "none") -> NetworkParams:
    return kernel_preset(kernel, congestion=congestion)


shapes = st.sampled_from([(1, 2), (1, 4), (2, 1), (2, 2), (2, 3), (3, 2)])


@pytest.mark.parametrize("kernel", ["nccl", "deepep-normal", "deepep-ll"])
@given(seed=st.integers(0, 2**16), shape=shapes, layers=st.integers(1, 3), scale=st.sampled_from([3, 300, 3000]),
       coherent=st.booleans())
def test_evaluate_agrees_with_phase_times_of_link_bytes(kernel, seed, shape, layers, scale, coherent):
    topo = Topology(name="t", num_nodes=shape[0], gpus_per_node=shape[1])
    tr = random_traffic(seed, *shape, layers, scale, coherent)
    net = NetworkModel(params_of(kernel), topo, BIG)
    fast = net.evaluate(tr)
    d, c = net.link_bytes(tr)
    for got, lb in ((fast.dispatch, d), (fast.combine, c)):
        ref = net.phase_times(lb)
        np.testing.assert_allclose(got.time_s, ref.time_s, rtol=1e-9, atol=0)
        np.testing.assert_allclose(got.rank_s, ref.rank_s, rtol=1e-9, atol=0)
    np.testing.assert_allclose(fast.nvlink_bytes, d.nvlink.sum(axis=0) + c.nvlink.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(fast.rdma_bytes, d.rdma.sum(axis=0) + c.rdma.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(fast.nvlink_busy_s, fast.nvlink_bytes / net.nvlink_Bps, rtol=1e-12)
    np.testing.assert_allclose(fast.rdma_busy_s, fast.rdma_bytes / net.rdma_Bps, rtol=1e-12)
    # The FIFO model's evaluate goes through the per-link path and reports the same bytes.
    slow = NetworkModel(params_of(kernel, "fifo"), topo, BIG).evaluate(tr)
    np.testing.assert_allclose(slow.nvlink_bytes, fast.nvlink_bytes, rtol=1e-12)
    np.testing.assert_allclose(slow.rdma_bytes, fast.rdma_bytes, rtol=1e-12)


FIFO_KERNELS = {"nccl": params_of("nccl"), "deepep-ll": params_of("deepep-ll"),
                "deepep-normal": params_of("deepep-normal"),
                "deepep-normal-no-nvlink-hop": replace(params_of("deepep-normal"), nvlink_hop_s=0.0)}


@pytest.mark.parametrize("name", list(FIFO_KERNELS))
@given(seed=st.integers(0, 2**16), shape=shapes, layers=st.integers(1, 2), scale=st.sampled_from([3, 300, 3000]),
       coherent=st.booleans())
def test_fifo_is_never_faster_than_the_closed_form(name, seed, shape, layers, scale, coherent):
    topo = Topology(name="t", num_nodes=shape[0], gpus_per_node=shape[1])
    tr = random_traffic(seed, *shape, layers, scale, coherent)
    closed = NetworkModel(FIFO_KERNELS[name], topo, BIG).evaluate(tr)
    fifo = NetworkModel(replace(FIFO_KERNELS[name], congestion="fifo"), topo, BIG).evaluate(tr)
    for a, b in ((fifo.dispatch, closed.dispatch), (fifo.combine, closed.combine)):
        assert np.all(a.time_s >= b.time_s * (1 - 1e-12)), (a.time_s, b.time_s)


def test_fifo_is_never_faster_than_the_closed_form_deepep_normal_preset():
    # One token from GPU 0 to experts 4, 5 (both on GPU 2): it lands on GPU 2, nothing is forwarded.
    tr = token_traffic(CONTIGUOUS, TOPO, np.array([[[4, 5, 0]]]), np.array([0]))
    closed = NetworkModel(params_of("deepep-normal"), TOPO, MODEL).evaluate(tr)
    fifo = NetworkModel(params_of("deepep-normal", "fifo"), TOPO, MODEL).evaluate(tr)
    assert fifo.dispatch.time_s[0] >= closed.dispatch.time_s[0]


# --------------------------------------------------------------------------------------------
# Monotonicity: more bytes on a link never make a layer finish sooner
# --------------------------------------------------------------------------------------------

MONO_PARAMS = {
    "nccl-no-size-curve": replace(params_of("nccl"), size_curve=False),
    "deepep-normal": params_of("deepep-normal"),
    "deepep-ll": params_of("deepep-ll"),
}


@pytest.mark.parametrize("congestion", ["none", "fifo"])
@pytest.mark.parametrize("name", list(MONO_PARAMS))
@given(seed=st.integers(0, 2**16), shape=shapes, which=st.sampled_from(["nvlink", "rdma", "forward"]),
       extra=st.floats(1.0, 1e8), data=st.data())
def test_adding_bytes_to_a_link_never_makes_a_layer_faster(name, congestion, seed, shape, which, extra, data):
    topo = Topology(name="t", num_nodes=shape[0], gpus_per_node=shape[1])
    rng = np.random.default_rng(seed)
    g = topo.num_gpus
    nv = rng.random((2, g, g)) * 1e6 * (rng.random((2, g, g)) < 0.5) * (1 - np.eye(g))
    rd = rng.random((2, g, g)) * 1e6 * (rng.random((2, g, g)) < 0.5) * (1 - np.eye(g))
    forwarded = name == "deepep-normal" and topo.num_nodes > 1
    fw = nv * 0.5 if forwarded else None
    layer = data.draw(st.integers(0, 1))
    src = data.draw(st.integers(0, g - 1))
    dst = data.draw(st.integers(0, g - 1))
    nv2, rd2, fw2 = nv.copy(), rd.copy(), None if fw is None else fw.copy()
    if which == "rdma":
        rd2[layer, src, dst] += extra
    else:
        nv2[layer, src, dst] += extra
        if which == "forward" and fw2 is not None:
            fw2[layer, src, dst] += extra
    net = NetworkModel(replace(MONO_PARAMS[name], congestion=congestion), topo, BIG)
    before = net.phase_times(LinkBytes(nvlink=nv, rdma=rd, forward=fw))
    after = net.phase_times(LinkBytes(nvlink=nv2, rdma=rd2, forward=fw2))
    assert np.all(after.time_s >= before.time_s * (1 - 1e-12))


def test_adding_bytes_to_a_link_never_makes_a_layer_faster_nccl_size_curve():
    topo = Topology(name="t", num_nodes=1, gpus_per_node=4)
    net = NetworkModel(params_of("nccl"), topo, BIG)
    nv = np.zeros((1, 4, 4))
    nv[0, 0, 1], nv[0, 2, 3], nv[0, 3, 0] = 20e6, 5e6, 5e6  # GPU 0 -> 1 is the bottleneck
    more = nv.copy()
    more[0, 2, 3] += 10e6  # a link that stays below the bottleneck
    before = net.phase_times(LinkBytes(nvlink=nv, rdma=np.zeros_like(nv))).time_s[0]
    after = net.phase_times(LinkBytes(nvlink=more, rdma=np.zeros_like(nv))).time_s[0]
    assert after >= before


# --------------------------------------------------------------------------------------------
# Monotonicity: more tokens on a rank never make a layer's dispatch, compute or combine faster
# --------------------------------------------------------------------------------------------

TINY = ModelSpec(name="t", num_hidden_layers=2, moe_layer_ids=(0, 1), num_experts=8, top_k=2, hidden_size=256,
                 expert_ffn_size=512)
# 8 experts + 4 redundant slots on 2 nodes x 2 GPUs, 3 slots per GPU, different per layer.
REPLICATED = Placement(np.array([[0, 1, 2, 3, 4, 0, 5, 6, 1, 7, 2, 3],
                                 [7, 6, 5, 4, 3, 7, 2, 1, 6, 0, 5, 4]]), 3, 8)


@pytest.fixture(scope="module")
def tiny_rates():
    pool = routing_pool(None, TINY, size=512, seed=0).ids
    return {ex: routing_rates(REPLICATED, TOPO, pool, execution=ex) for ex in ("standard", "context-coherent")}


@pytest.mark.parametrize("execution", ["standard", "context-coherent"])
@pytest.mark.parametrize("congestion", ["none", "fifo"])
@pytest.mark.parametrize("kernel", ["nccl", "deepep-normal", "deepep-ll"])
@given(base=st.lists(st.integers(0, 64), min_size=4, max_size=4), rank=st.integers(0, 3),
       extra=st.integers(1, 64))
def test_adding_tokens_to_a_rank_never_makes_a_layer_faster(tiny_rates, execution, congestion, kernel, base, rank,
                                                            extra):
    config = SimConfig(network=kernel_preset(kernel, congestion=congestion), execution=execution)
    cost = CostModel(TINY, TOPO, REPLICATED, config)
    rates = tiny_rates[execution]

    def step(n):
        n = np.asarray(n, dtype=np.float64)
        shape = BatchShape(prefill_tokens=np.zeros(4), decode_tokens=n, decode_context=n * 512,
                           prefill_positions=np.zeros(4))
        return cost.step_cost(sample_traffic(rates, REPLICATED, TOPO, n, None, with_pairs=True), shape)

    more = list(base)
    more[rank] += extra
    a, b = step(base), step(more)
    for name in ("dispatch_s", "compute_s", "combine_s", "attention_s"):
        assert np.all(getattr(b, name) >= getattr(a, name) * (1 - 1e-12)), name
    assert b.total_s >= a.total_s * (1 - 1e-12)


def test_allgather_is_zero_without_tokens_and_grows_with_them():
    net = NetworkModel(params_of("deepep-normal"), TOPO, TINY)
    assert allgather_s(net, np.zeros(4)) == 0.0
    one, two = allgather_s(net, np.array([1.0, 0, 0, 0])), allgather_s(net, np.array([1.0, 5, 0, 2]))
    assert 0 < one <= two


def test_config_rejects_bad_values():
    from placer.errors import InvalidInputError
    with pytest.raises(InvalidInputError, match="kernel"):
        NetworkParams(kernel="gloo")
    with pytest.raises(InvalidInputError, match="congestion"):
        kernel_preset("nccl", congestion="ecmp")
    with pytest.raises(InvalidInputError, match="kernel"):
        kernel_preset("gloo")
    with pytest.raises(InvalidInputError):
        ServingWorkload(rate=0)


# -- a bandwidth per rank pair (--topology FILE) ----------------------------------------------

def _with_matrix(topology: Topology, m: np.ndarray) -> Topology:
    return replace(topology, bandwidth_gbps=tuple(map(tuple, np.where(np.isinf(m), 0.0, m))))


@pytest.mark.parametrize("kernel", ["nccl", "deepep-normal", "deepep-ll"])
def test_two_level_matrix_gives_the_two_level_times(traffic, kernel):
    params = kernel_preset(kernel)
    plain = NetworkModel(params, TOPO, MODEL).evaluate(traffic)
    matrix = NetworkModel(params, _with_matrix(TOPO, TOPO.bandwidth_matrix()), MODEL).evaluate(traffic)
    for a, b in ((plain.dispatch, matrix.dispatch), (plain.combine, matrix.combine)):
        np.testing.assert_allclose(b.rank_s, a.rank_s, rtol=1e-12)
    np.testing.assert_allclose(matrix.rdma_busy_s, plain.rdma_busy_s, rtol=1e-12)
    np.testing.assert_allclose(matrix.nvlink_busy_s, plain.nvlink_busy_s, rtol=1e-12)


def test_each_pair_is_costed_at_its_own_bandwidth(traffic):
    """Halving the NIC bandwidth of one pair: the NIC time of GPUs sending or receiving on that
    pair grows by exactly that pair's bytes over the lost bandwidth; the other ports are unchanged."""
    params = replace(kernel_preset("nccl"), size_curve=False)
    base = TOPO.bandwidth_matrix()
    slow = base.copy()
    slow[0, 2] = slow[2, 0] = base[0, 2] / 2
    net = NetworkModel(params, _with_matrix(TOPO, base), MODEL)
    slowed = NetworkModel(params, _with_matrix(TOPO, slow), MODEL)
    a, b = net.evaluate(traffic), slowed.evaluate(traffic)
    np.testing.assert_allclose(b.rdma_busy_s[0, 2], 2 * a.rdma_busy_s[0, 2])
    np.testing.assert_array_equal(np.delete(b.rdma_busy_s.ravel(), [2, 8]), np.delete(a.rdma_busy_s.ravel(), [2, 8]))
    _, rd, _ = net.link_tokens(traffic)
    assert rd[0, 0, 2] > 0  # the slowed pair carries the second token's RDMA send
    assert b.dispatch.rank_s[0, 0] > a.dispatch.rank_s[0, 0]
    np.testing.assert_array_equal(b.dispatch.rank_s[0, [1, 3]], a.dispatch.rank_s[0, [1, 3]])
