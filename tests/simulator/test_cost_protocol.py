"""The injection points: a StepCostModel factory passed to simulate(), and a registered network
kernel selected by NetworkParams.kernel."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from placer.errors import InvalidInputError
from placer.ilp.simple import contiguous_map
from placer.presets import make_topology
from placer.simulator import (
    KERNEL_PRESETS,
    KERNELS,
    NetworkParams,
    ReplayWorkload,
    ServingWorkload,
    SimConfig,
    kernel_preset,
    simulate,
)
from placer.simulator.config import DEEPEP_LL_FIT
from placer.simulator.cost import (
    BatchShape,
    CostModel,
    PhaseKind,
    StepCost,
    StepCostModel,
    phase_kinds,
)
from placer.simulator.network_kernels import (
    Fabric,
    LinkTokens,
    kernel_names,
    register_kernel,
    unregister_kernel,
)
from placer.simulator.routing import Traffic
from placer.types import ModelSpec, Placement, Topology

pytestmark = pytest.mark.timeout(60)

# Three hidden layers, two of them MoE: 3 attention + 2 x (dispatch, compute, combine) + 1 dense
# + 1 other = 11 phases per step.
MODEL = ModelSpec(name="t", num_hidden_layers=3, moe_layer_ids=(1, 2), num_experts=8, top_k=2, hidden_size=256,
                  expert_ffn_size=512)
TOPO = make_topology("h100", gpus=4)
PLACEMENT = Placement(contiguous_map(2, 8, 8), 2, 8)
PHASE_S = 1e-3


class ConstantCost:
    """Every phase of every step takes PHASE_S; records what it was built with and asked."""

    needs_pairs = False

    def __init__(self, model: ModelSpec, topology: Topology, placement: Placement, config: SimConfig):
        self.built_with = (model, topology, placement, config)
        self.kinds = phase_kinds(model)
        self.layers, self.gpus = model.num_moe_layers, topology.num_gpus
        self.batches: list[BatchShape] = []

    def step_cost(self, traffic: Traffic, batch: BatchShape) -> StepCost:
        self.batches.append(batch)
        layers, g = np.zeros(self.layers), np.zeros((self.gpus, self.gpus))
        return StepCost(kinds=self.kinds, durations_s=np.full(len(self.kinds), PHASE_S),
                        attention_s=layers, dispatch_s=layers, compute_s=layers, combine_s=layers,
                        straggler=np.zeros(self.layers, dtype=np.int64),
                        gpu_pairs=np.zeros((self.layers, self.gpus)), nvlink_bytes=g, rdma_bytes=g,
                        nvlink_busy_s=g, rdma_busy_s=g)


def test_phase_kinds_lay_out_the_step():
    K = PhaseKind
    assert phase_kinds(MODEL).tolist() == [K.ATTENTION, K.DENSE, K.ATTENTION, K.DISPATCH, K.COMPUTE, K.COMBINE,
                                           K.ATTENTION, K.DISPATCH, K.COMPUTE, K.COMBINE, K.OTHER]


def test_an_injected_cost_model_sets_every_step_duration():
    built: list[ConstantCost] = []

    def factory(model, topology, placement, config) -> StepCostModel:
        built.append(ConstantCost(model, topology, placement, config))
        return built[-1]

    config = SimConfig(seed=1, pool_size=128)
    out = simulate(PLACEMENT, TOPO, MODEL, workload=ReplayWorkload(tokens_per_rank=8, iterations=4), config=config,
                   cost_model=factory)
    (cost,) = built
    assert cost.built_with == (MODEL, TOPO, PLACEMENT, config)
    assert len(cost.batches) == 4 and all(b.tokens.tolist() == [8.0] * 4 for b in cost.batches)
    step = 11 * PHASE_S
    it = out.tables["iterations"]
    np.testing.assert_allclose(it["duration_s"], step)
    np.testing.assert_allclose(it["start_s"], np.arange(4) * step)
    np.testing.assert_allclose(it["dispatch_s"], 2 * PHASE_S)
    np.testing.assert_allclose(it["attention_s"], 3 * PHASE_S)
    np.testing.assert_allclose(it["other_s"], 2 * PHASE_S)  # the dense FFN and the step's other
    assert out.summary["simulated_s"] == pytest.approx(4 * step)
    assert out.summary["nvlink_bytes"] == out.summary["rdma_bytes"] == 0.0


def test_serving_with_constant_steps_gives_the_predicted_latencies():
    workload = ServingWorkload(rate=50.0, duration_s=0.2, prompt_len=16, output_len=5, length_dist="fixed")
    out = simulate(PLACEMENT, TOPO, MODEL, workload=workload, config=SimConfig(seed=2, pool_size=128),
                   cost_model=ConstantCost)
    req, step = out.tables["requests"], 11 * PHASE_S
    assert len(req) > 2 and np.isfinite(req["finish_s"]).all()
    # A prompt fits one step's budget: its first token comes at the end of the first step that
    # starts at or after its arrival (at most one step later), then one token per step.
    assert ((req["ttft_s"] >= step - 1e-12) & (req["ttft_s"] <= 2 * step + 1e-12)).all()
    np.testing.assert_allclose(req["finish_s"] - req["first_token_s"], 4 * step)
    np.testing.assert_allclose(out.tables["iterations"]["duration_s"], step)


def test_the_default_cost_model_is_the_roofline_one():
    config = SimConfig(seed=1, pool_size=128)
    run = dict(workload=ReplayWorkload(tokens_per_rank=8, iterations=3), config=config)
    default = simulate(PLACEMENT, TOPO, MODEL, **run)
    explicit = simulate(PLACEMENT, TOPO, MODEL, cost_model=CostModel, **run)
    assert default.summary == explicit.summary


@dataclass(frozen=True)
class NicOnlyKernel:
    """A toy kernel: every token to every rank holding one of its experts, always over the NIC."""

    name: str = "toy-nic-only"
    needs_pairs: bool = False
    fp8_metadata_bytes: float = 0.0

    def link_tokens(self, traffic: Traffic, fabric: Fabric) -> LinkTokens:
        return np.zeros_like(traffic.tokens), traffic.tokens * fabric.off_diag, None


@pytest.fixture
def toy_kernel():
    kernel = register_kernel(NicOnlyKernel())
    yield kernel
    unregister_kernel(kernel.name)


def test_a_registered_kernel_runs_in_a_simulation(toy_kernel):
    assert toy_kernel.name in kernel_names()
    plain = dict(dispatch_dtype="bf16", combine_dtype="bf16", launch_s=1e-6)
    run = dict(workload=ReplayWorkload(tokens_per_rank=16, iterations=3))
    nccl = simulate(PLACEMENT, TOPO, MODEL, config=SimConfig(network=NetworkParams(kernel="nccl", **plain), seed=5),
                    **run)
    toy = simulate(PLACEMENT, TOPO, MODEL,
                   config=SimConfig(network=NetworkParams(kernel=toy_kernel.name, **plain), seed=5), **run)
    # One node: nccl moves everything over NVLink; the toy kernel moves the same bytes (same
    # seeds, same routing draws) over the slower NIC instead.
    assert nccl.summary["rdma_bytes"] == 0.0 and toy.summary["nvlink_bytes"] == 0.0
    assert toy.summary["rdma_bytes"] == nccl.summary["nvlink_bytes"] > 0
    assert set(toy.tables["links"]["kind"]) == {"rdma"}
    assert toy.summary["dispatch_s"] > nccl.summary["dispatch_s"]
    np.testing.assert_array_equal(toy.tables["iterations"]["tokens"], nccl.tables["iterations"]["tokens"])
    # A kernel without a preset starts from the NetworkParams defaults.
    assert kernel_preset(toy_kernel.name, launch_s=2e-6) == NetworkParams(kernel=toy_kernel.name, launch_s=2e-6)


def test_the_registry_refuses_duplicates_and_unknown_names(toy_kernel):
    with pytest.raises(ValueError, match="already registered"):
        register_kernel(NicOnlyKernel())
    assert register_kernel(NicOnlyKernel(), replace=True).name == toy_kernel.name
    with pytest.raises(InvalidInputError, match="unknown kernel 'gloo'.*toy-nic-only"):
        NetworkParams(kernel="gloo")
    with pytest.raises(InvalidInputError, match="unknown kernel"):
        kernel_preset("gloo")


def test_builtin_kernels_keep_their_names_and_presets():
    assert KERNELS == ("nccl", "deepep-normal", "deepep-ll", "deepep-v2")
    assert kernel_names()[:4] == KERNELS
    assert {k: p.kernel for k, p in KERNEL_PRESETS.items()} == {k: k for k in KERNELS}
    assert kernel_preset("deepep-ll").launch_s == DEEPEP_LL_FIT["launch_s"]
    assert kernel_preset("deepep-ll").message_rate == 330e6
