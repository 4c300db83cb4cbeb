"""The one shared placement validator: every placement produced anywhere passes it.

``check_placement`` raises :class:`~placer.errors.PlacementError` naming the first violation;
``placement_violations`` lists them all (what the solver contract tests compare against).
"""

from __future__ import annotations

import numpy as np

from placer.errors import PlacementError
from placer.types import ModelSpec, Placement, Topology


def check_structure(physical_to_logical: np.ndarray, slots_per_gpu: int, num_experts: int) -> None:
    """Checks that need nothing but the map itself.

    ``physical_to_logical``: int [L, P]. Raises on ids out of ``[0, E)``, a slot count that is
    not a multiple of ``slots_per_gpu``, fewer slots than experts, or a logical expert with no
    slot in some layer.
    """
    violations = _structure_violations(physical_to_logical, slots_per_gpu, num_experts)
    if violations:
        raise PlacementError(violations[0], source="placement")


def _structure_violations(p2l: np.ndarray, slots_per_gpu: int, num_experts: int) -> list[str]:
    out: list[str] = []
    if p2l.ndim != 2 or p2l.shape[0] < 1:
        return [f"physical_to_logical must be [layers, slots], got shape {p2l.shape}"]
    num_layers, num_slots = p2l.shape
    if slots_per_gpu < 1:
        return [f"slots_per_gpu must be positive, got {slots_per_gpu}"]
    if num_experts < 1:
        return [f"num_experts must be positive, got {num_experts}"]
    if num_slots % slots_per_gpu:
        out.append(f"{num_slots} slots per layer are not a multiple of slots_per_gpu={slots_per_gpu} "
                   "(every GPU needs the same number of slots)")
    if num_slots < num_experts:
        out.append(f"{num_slots} slots per layer cannot hold {num_experts} experts")
    lo, hi = int(p2l.min()), int(p2l.max())
    if lo < 0 or hi >= num_experts:
        bad = lo if lo < 0 else hi
        layer = int(np.argwhere((p2l < 0) | (p2l >= num_experts))[0, 0])
        out.append(f"layer {layer}: logical id {bad} outside [0, {num_experts})")
        return out
    present = np.zeros((num_layers, num_experts), dtype=bool)
    present[np.repeat(np.arange(num_layers), num_slots), p2l.ravel()] = True
    if not present.all():
        layer, expert = (int(x) for x in np.argwhere(~present)[0])
        out.append(f"layer {layer}: logical expert {expert} has no slot")
    return out


def placement_violations(placement: Placement, model: ModelSpec | None = None,
                         topology: Topology | None = None, *,
                         memory_limit_bytes: float | None = None,
                         distinct_per_gpu: bool = False) -> list[str]:
    """Every invariant ``placement`` breaks for this model and cluster (empty when valid).

    ``distinct_per_gpu``: no GPU may hold two copies of one expert in a layer (vllm-ascend keeps
    one local slot per expert and mis-routes the second copy).
    """
    out = _structure_violations(placement.physical_to_logical, placement.slots_per_gpu,
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
