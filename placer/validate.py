"""The one shared placement validator: every placement produced anywhere passes it.

``check_placement`` raises :class:`~placer.errors.PlacementError` naming the first violation;
``placement_violations`` lists them all (what the solver contract tests compare against).
"""

from __future__ import annotations

import numpy as np

from placer.errors import PlacementError
from placer.types import ModelSpec, Placement, Topology, structure_violations


def placement_violations(placement: Placement, model: ModelSpec | None = None,
                         topology: Topology | None = None, *,
                         memory_limit_bytes: float | None = None,
                         distinct_per_gpu: bool = False) -> list[str]:
    """Every invariant ``placement`` breaks for this model and cluster (empty when valid).

    ``distinct_per_gpu``: no GPU may hold two copies of one expert in a layer (vllm-ascend keeps
    one local slot per expert and mis-routes the second copy).
    """
    out = structure_violations(placement.physical_to_logical, placement.slots_per_gpu,
                                placement.num_experts)
    if distinct_per_gpu and not out:
        dup = duplicate_copies(placement)
        if dup:
            layer, gpu, expert = dup[0]
            out.append(f"layer {layer}: GPU {gpu} holds expert {expert} twice ({len(dup)} such "
                       "(layer, GPU, expert) duplicates; vllm-ascend keeps one local slot per expert)")
    if model is not None:
        if placement.num_layers != model.num_moe_layers:
            out.append(f"placement has {placement.num_layers} layers, model {model.name} has "
                       f"{model.num_moe_layers} MoE layers")
        if placement.num_experts != model.num_experts:
            out.append(f"placement has {placement.num_experts} experts, model {model.name} has "
                       f"{model.num_experts}")
    if topology is not None and placement.num_gpus != topology.num_gpus:
        out.append(f"placement spans {placement.num_gpus} GPUs, cluster has {topology.num_gpus}")
    limit = memory_limit_bytes if memory_limit_bytes is not None else (
        topology.memory_bytes if topology is not None else None)
    if model is not None and model.sizes_known and limit is not None:
        need = expert_memory_per_gpu(placement, model)
        if need > limit:
            out.append(f"expert weights need {need / 1e9:.1f} GB per GPU, more than the "
                       f"{limit / 1e9:.1f} GB available")
    return out


def duplicate_copies(placement: Placement) -> list[tuple[int, int, int]]:
    """(layer, GPU, expert) for every expert held more than once by one GPU, sorted."""
    per_gpu = np.sort(placement.gpu_experts(), axis=2)
    layer, gpu, pos = np.nonzero(per_gpu[:, :, 1:] == per_gpu[:, :, :-1])
    found = {(int(a), int(b), int(per_gpu[a, b, c])) for a, b, c in zip(layer, gpu, pos, strict=True)}
    return sorted(found)


def expert_memory_per_gpu(placement: Placement, model: ModelSpec) -> float:
    """Bytes of routed-expert weights on each GPU (every slot holds one expert copy)."""
    return float(placement.slots_per_gpu * placement.num_layers * model.expert_weight_bytes)


def check_placement(placement: Placement, model: ModelSpec | None = None,
                    topology: Topology | None = None, *,
                    memory_limit_bytes: float | None = None, distinct_per_gpu: bool = False) -> Placement:
    """Raise :class:`PlacementError` on the first violated invariant; return ``placement``.

    Checks: every logical expert at least once per layer, equal slots per GPU, ids in range,
    layer and expert counts match the model, GPU count matches the cluster, and the expert
    weights fit in GPU memory when sizes are known; with ``distinct_per_gpu``, no GPU holds two
    copies of one expert.
    """
    violations = placement_violations(placement, model, topology, memory_limit_bytes=memory_limit_bytes,
                                      distinct_per_gpu=distinct_per_gpu)
    if violations:
        raise PlacementError(violations[0], source="placement")
    return placement
