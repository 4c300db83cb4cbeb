"""The data model of placer: frozen dataclasses over numpy arrays, validated on construction.

Glossary (the symbols are fixed here and used everywhere):

- **L**: number of MoE layers (dense layers are never counted; ``ModelSpec.moe_layer_ids``
  maps MoE ordinal -> absolute hidden-layer index).
- **E**: logical experts per MoE layer, ids ``0..E-1`` as the checkpoint defines them.
- **K**: experts each token picks per layer (top-k).
- **P**: physical experts (slots) per layer, ``P = E + R`` with ``R`` redundant slots.
- **G**: GPUs (EP ranks); **N**: nodes; ``G = N * gpus_per_node``.
- **T**: tokens of a trace; **S**: tokens of a stats reservoir sample.
- **slot-to-GPU rule**: slot ``p`` lives on GPU ``p // slots_per_gpu`` (the rule SGLang, vLLM
  and DeepEP share); GPU ``g`` lives on node ``g // gpus_per_node``.

Only ``Placement.physical_to_logical [L, P]`` is stored; ``log2phy``, ``logcnt`` and the GPU and
node of each replica are derived from it.

Every name is imported from here; the definitions live in :mod:`placer.types.specs` (the model
and the cluster), :mod:`placer.types.routing` (traces and statistics) and
:mod:`placer.types.placement` (the placement map and solver results). The rule vocabularies below are this module's own.
"""

from __future__ import annotations

from placer.types.placement import (
    SOLVE_STATUSES,
    Placement,
    SolveResult,
    check_structure,
    structure_violations,
)
from placer.types.routing import PHASE_CODES, PHASES, TRACE_ORDERS, RoutingStats, RoutingTrace
from placer.types.specs import ModelSpec, Topology

__all__ = [
    "DISPATCH_RULES", "DISTINCT_RULES", "EXECUTION_MODES", "PHASES", "PHASE_CODES", "POSITION_RULES",
    "SOLVE_STATUSES", "TRACE_ORDERS", "ModelSpec", "Placement", "RoutingStats", "RoutingTrace",
    "SolveResult", "Topology", "check_structure", "structure_violations",
]

DISPATCH_RULES = ("nearest", "sglang-static", "sglang-dynamic", "vllm", "vllm-ascend")
"""Replica rules of :mod:`placer.metrics.dispatch`; ``POSITION_RULES`` choose by the token's row in the batch."""
POSITION_RULES = ("sglang-dynamic", "vllm")
# Rules of stacks that cannot use two copies of one expert on one GPU (vllm-ascend keeps one
# local slot per expert): problems under them keep copies on distinct GPUs.
DISTINCT_RULES = ("vllm-ascend",)
EXECUTION_MODES = ("standard", "context-coherent")
