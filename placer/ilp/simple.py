"""The serving stacks' default placements: ``contiguous`` and ``round-robin``.

Both ignore routing statistics. With redundant slots they follow vLLM's initial map
(``[0..E-1] + [i % E for i in range(R)]``), then lay the slots out per GPU; where a GPU would
hold two copies of one expert and the problem forbids it (vllm-ascend), copies are swapped apart.
"""

from __future__ import annotations

import numpy as np

from placer.ilp.base import PlacementProblem, register
from placer.ilp.distinct import separate_by_load
from placer.types import Placement, SolveResult


def contiguous_map(num_layers: int, num_experts: int, num_slots: int) -> np.ndarray:
    """Megatron / vLLM ``linear``: slot p holds expert ``p % E``. Shape: int32 [L, P]."""
    return np.tile(np.arange(num_slots, dtype=np.int32) % num_experts, (num_layers, 1))


def round_robin_map(num_layers: int, num_experts: int, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """vLLM ``round_robin``: GPU g holds experts g, g + G, g + 2G, ... (mod E). Shape: int32 [L, P]."""
    gpu = np.arange(num_gpus)[:, None]
    local = np.arange(slots_per_gpu)[None, :]
    row = ((gpu + local * num_gpus) % num_experts).astype(np.int32).ravel()
    return np.tile(row, (num_layers, 1))


def _result(problem: PlacementProblem, p2l: np.ndarray, method: str) -> SolveResult:
    if problem.distinct_per_gpu:  # the layout wraps when a GPU holds more than E / G slots
        p2l = separate_by_load(p2l, problem.slots_per_gpu, problem.stats.load)
    placement = Placement(p2l, problem.slots_per_gpu, problem.model.num_experts)
    return SolveResult(placement=placement, status="feasible", objective=float("nan"), method=method,
                       backend="numpy")


@register("contiguous")
def solve_contiguous(problem: PlacementProblem, *, time_limit_s: float | None = None, seed: int = 0) -> SolveResult:
    """Contiguous blocks of experts per GPU (Megatron, DeepSpeed, vLLM ``linear``)."""
    return _result(problem, contiguous_map(problem.model.num_moe_layers, problem.model.num_experts,
                                           problem.num_slots), "contiguous")


@register("round-robin")
def solve_round_robin(problem: PlacementProblem, *, time_limit_s: float | None = None,
                      seed: int = 0) -> SolveResult:
    """Experts dealt to GPUs in turn (vLLM ``round_robin``)."""
    return _result(problem, round_robin_map(problem.model.num_moe_layers, problem.model.num_experts,
                                            problem.topology.num_gpus, problem.slots_per_gpu), "round-robin")
