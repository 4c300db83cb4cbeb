"""Cost models, injected into the simulation: the only place durations are computed.

:class:`StepCostModel` is what the simulator asks of one: the :class:`StepCost` of a step (the
ordered phase durations the events replay, and the per-layer details the collector records)
from its :class:`Traffic` and :class:`BatchShape`. ``simulate(..., cost_model=factory)`` builds
one per placement with a :data:`CostModelFactory`; the default, :class:`CostModel`, composes the
network model (all-to-all, per registered kernel) and the compute model (roofline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

import numpy as np

from placer.simulator.config import SimConfig
from placer.simulator.cost.compute import ComputeModel
from placer.simulator.cost.network import NetworkModel, allgather_s
from placer.simulator.routing import Traffic
from placer.types import ModelSpec, Placement, Topology


class PhaseKind(IntEnum):
    ATTENTION = 0
    DISPATCH = 1
    COMPUTE = 2
    COMBINE = 3
    DENSE = 4
    OTHER = 5


def phase_kinds(model: ModelSpec) -> np.ndarray:
    """The phases of one step in execution order, int8 [n] of :class:`PhaseKind`: per hidden
    layer attention, then dispatch, compute and combine (MoE) or dense; last the step's other."""
    moe = set(model.moe_layer_ids)
    kinds: list[int] = []
    for layer in range(model.num_hidden_layers):
        kinds.append(PhaseKind.ATTENTION)
        kinds.extend((PhaseKind.DISPATCH, PhaseKind.COMPUTE, PhaseKind.COMBINE) if layer in moe
                     else (PhaseKind.DENSE,))
    kinds.append(PhaseKind.OTHER)
    return np.asarray(kinds, dtype=np.int8)


@dataclass(frozen=True)
class BatchShape:
    """What a step runs, per home rank: float [G] each.

    ``tokens`` = ``prefill_tokens + decode_tokens``; ``decode_context``: context tokens read by
    the decode tokens; ``prefill_positions``: the sum of the prefill tokens' positions.
    """

    prefill_tokens: np.ndarray
    decode_tokens: np.ndarray
    decode_context: np.ndarray
    prefill_positions: np.ndarray

    @property
    def tokens(self) -> np.ndarray:
        return self.prefill_tokens + self.decode_tokens


@dataclass(frozen=True)
class StepCost:
    """The cost of one step.

    ``kinds`` int8 [n] and ``durations_s`` float [n]: the phases in execution order. Per MoE layer
    ([L]): ``attention_s``, ``dispatch_s``, ``compute_s``, ``combine_s``, ``straggler`` (the GPU
    with the largest dispatch + compute + combine time). ``gpu_pairs [L, G]``: pairs computed per
    GPU. ``nvlink_bytes``, ``rdma_bytes``, ``nvlink_busy_s``, ``rdma_busy_s`` [G, G]: summed over
    layers and both directions. ``a2a_hidden_s`` [L] (overlapped steps only, else None): the part
    of each MoE layer's dispatch + combine time that ran under compute (:mod:`.overlap`).
    """

    kinds: np.ndarray
    durations_s: np.ndarray
    attention_s: np.ndarray
    dispatch_s: np.ndarray
    compute_s: np.ndarray
    combine_s: np.ndarray
    straggler: np.ndarray
    gpu_pairs: np.ndarray
    nvlink_bytes: np.ndarray
    rdma_bytes: np.ndarray
    nvlink_busy_s: np.ndarray
    rdma_busy_s: np.ndarray
    a2a_hidden_s: np.ndarray | None = None

    @property
    def total_s(self) -> float:
        return float(self.durations_s.sum())


class StepCostModel(Protocol):
    """What the simulator asks of a cost model; the events only replay the durations it returns."""

    @property
    def needs_pairs(self) -> bool:
        """Whether :meth:`step_cost` reads ``Traffic.pairs`` (count-level routing draws them
        only then)."""
        ...

    def step_cost(self, traffic: Traffic, batch: BatchShape) -> StepCost:
        """The cost of one step routed as ``traffic`` with ``batch`` tokens per home rank."""
        ...


CostModelFactory = Callable[[ModelSpec, Topology, Placement, SimConfig], StepCostModel]
"""Builds the cost model of one (model, cluster, placement, config); :class:`CostModel` is one."""


class CostModel:
    """The roofline :class:`StepCostModel`: network and compute models of one (model, cluster,
    placement, config)."""

    def __init__(self, model: ModelSpec, topology: Topology, placement: Placement, config: SimConfig):
        self.model = model
        self.topology = topology
        self.config = config
        self.network = NetworkModel(config.network, topology, model)
        self.compute = ComputeModel(config.compute, topology, model, placement.slots_per_gpu)
        self.needs_pairs = self.network.kernel.needs_pairs
        moe = set(model.moe_layer_ids)
        self.kinds = phase_kinds(model)
        self._moe_attention = np.array([i for i, layer in enumerate(range(model.num_hidden_layers)) if layer in moe])

    def step_cost(self, traffic: Traffic, batch: BatchShape) -> StepCost:
        """Cost of one step routed as ``traffic`` with ``batch`` tokens per home rank."""
        model, net, comp = self.model, self.network, self.compute
        num_moe = model.num_moe_layers
        step_net = net.evaluate(traffic)
        dispatch, combine = step_net.dispatch, step_net.combine
        tokens = batch.tokens
        coherent = traffic.moves is not None
        local = traffic.src if coherent else np.broadcast_to(tokens, traffic.src.shape)
        expert = comp.expert_times(traffic.slots, local)
        compute_s = expert.max(axis=1)
        # Attention runs where the token's state is: the home rank, or (context-coherent) the
        # GPU of the previous layer's top-1 expert. Context per token moves with it.
        total = max(float(tokens.sum()), 1e-12)
        ctx_per_token = batch.decode_context.sum() / max(float(batch.decode_tokens.sum()), 1e-12)
        pos_per_token = batch.prefill_positions.sum() / max(float(batch.prefill_tokens.sum()), 1e-12)
        decode_share = batch.decode_tokens.sum() / total
        if coherent:
            where = np.concatenate([tokens[None, :], traffic.src[:-1]], axis=0)  # [L, G]
            moe_attn = comp.attention_times(where, where * decode_share * ctx_per_token,
                                            where * (1 - decode_share) * pos_per_token).max(axis=1)
        else:
            moe_attn = np.full(num_moe, comp.attention_times(tokens, batch.decode_context,
                                                             batch.prefill_positions).max())
        home_attn = float(comp.attention_times(tokens, batch.decode_context, batch.prefill_positions).max())
        dense = float(comp.dense_times(tokens).max())
        other = self.config.compute.step_overhead_s + (allgather_s(net, tokens) if coherent else 0.0)
        durations = np.empty(len(self.kinds))
        kinds = self.kinds
        durations[kinds == PhaseKind.DENSE] = dense
        attention = np.full(model.num_hidden_layers, home_attn)
        attention[self._moe_attention] = moe_attn
        durations[kinds == PhaseKind.ATTENTION] = attention
        durations[kinds == PhaseKind.DISPATCH] = dispatch.time_s
        durations[kinds == PhaseKind.COMPUTE] = compute_s
        durations[kinds == PhaseKind.COMBINE] = combine.time_s
        durations[kinds == PhaseKind.OTHER] = other
        rank = dispatch.rank_s + expert + combine.rank_s
        spg = self.compute.spg
        return StepCost(
            kinds=kinds, durations_s=durations, attention_s=moe_attn, dispatch_s=dispatch.time_s,
            compute_s=compute_s, combine_s=combine.time_s, straggler=rank.argmax(axis=1),
            gpu_pairs=traffic.slots.reshape(num_moe, -1, spg).sum(axis=2),
            nvlink_bytes=step_net.nvlink_bytes, rdma_bytes=step_net.rdma_bytes,
            nvlink_busy_s=step_net.nvlink_busy_s, rdma_busy_s=step_net.rdma_busy_s)
