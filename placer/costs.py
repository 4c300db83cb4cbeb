"""The seconds-per-token cost model every layer shares: solver objectives, simulator and serve.

One token on one expert costs ``6 * hidden * ffn`` FLOPs (gate, up and down projections: three
GEMMs of ``2 * hidden * ffn`` FLOPs each); at ``COMPUTE_EFFICIENCY`` of the GPU's dense BF16
peak that is :attr:`TokenCosts.expert_s`, the compute-bound time of one token-slot. Moving one
token's activations (``model.token_bytes``) costs ``token_bytes / bandwidth`` over NVLink within
a node and over the NIC between nodes. The simulator refines this linear model (a roofline with
a GEMM-efficiency curve, hop latencies and per-kernel efficiencies); the solvers and ``serve``
use it as it stands, so what they trade off is what the simulator's large-batch limit charges.
"""

from __future__ import annotations

from dataclasses import dataclass

from placer.types import ModelSpec, Topology

COMPUTE_EFFICIENCY = 0.5
"""Share of dense BF16 peak the solvers assume an expert GEMM reaches (half of peak; the
simulator reads its own efficiency from a curve over rows per expert)."""


def ffn_flops(hidden: float, ffn: float) -> float:
    """FLOPs of one token through a SwiGLU FFN of width ``ffn``: ``6 * hidden * ffn``."""
    return 6.0 * hidden * ffn


def expert_flops(model: ModelSpec) -> float:
    """FLOPs of one token on one routed expert: ``6 * hidden * ffn``."""
    return ffn_flops(model.hidden_size, model.expert_ffn_size)


def transfer_seconds(num_bytes, bandwidth_gbps: float):
    """Seconds to move ``num_bytes`` (scalar or array) at ``bandwidth_gbps`` GB/s (10^9 B/s)."""
    return num_bytes / (bandwidth_gbps * 1e9)


@dataclass(frozen=True)
class TokenCosts:
    """Seconds per token: ``expert_s`` (one token-slot of expert compute), ``nvlink_s`` and
    ``nic_s`` (one token's activations over NVLink and over the NIC)."""

    expert_s: float
    nvlink_s: float
    nic_s: float


def token_costs(model: ModelSpec, topology: Topology, *, compute_efficiency: float = COMPUTE_EFFICIENCY) -> TokenCosts:
    """The seconds-per-token costs of ``model`` on ``topology`` (the model's sizes must be known)."""
    return TokenCosts(expert_s=expert_flops(model) / (topology.bf16_flops * compute_efficiency),
                      nvlink_s=float(transfer_seconds(model.token_bytes, topology.nvlink_gbps)),
                      nic_s=float(transfer_seconds(model.token_bytes, topology.nic_gbps)))
