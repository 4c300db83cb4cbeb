"""One interface for every placement method: ``PlacementProblem`` in, ``SolveResult`` out.

A method is a plain function ``(problem, *, time_limit_s, seed) -> SolveResult`` registered
under a name. :func:`solve` looks it up, runs it, and passes the result through the shared
validator before returning it.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from placer.errors import InfeasibleError, InvalidInputError
from placer.types import (
    DISPATCH_RULES,
    DISTINCT_RULES,
    EXECUTION_MODES,
    ModelSpec,
    RoutingStats,
    SolveResult,
    Topology,
)
from placer.validate import check_placement, expert_memory_per_gpu

Method = Callable[..., SolveResult]
METHODS: dict[str, Method] = {}


def register(name: str, forwards_to: str | None = None) -> Callable[[Method], Method]:
    """Decorator adding a method to the registry under ``name``.

    A method declares its options as keyword parameters; one that passes ``**options`` on to
    another function names it in ``forwards_to`` (``"module:function"``, imported when asked;
    its keyword parameters are then accepted too).
    :func:`solve` refuses any other option, naming the method and the option.
    """
    def wrap(func: Method) -> Method:
        METHODS[name] = func
        func.forwards_to = forwards_to  # type: ignore[attr-defined]
        return func
    return wrap


_COMMON = ("time_limit_s", "seed")


def method_options(method: str) -> tuple[str, ...]:
    """The options ``method`` accepts (beyond ``time_limit_s`` and ``seed``), sorted."""
    func = METHODS[method]
    targets: list = [func]
    forwards = getattr(func, "forwards_to", None)
    if forwards:
        module, _, name = forwards.partition(":")
        targets.append(getattr(importlib.import_module(module), name))
    names: set[str] = set()
    for f in targets:
        params = inspect.signature(f).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return tuple(sorted(names - set(_COMMON) - {"problem", "method"}))


@dataclass(frozen=True)
class PlacementProblem:
    """Everything a placement method needs.

    ``stats`` may be load-only for balance methods. ``num_redundant`` is R, so every GPU holds
    ``(E + R) / G`` slots. ``memory_limit_bytes`` bounds routed-expert weights per GPU
    (default: the cluster's GPU memory). ``distinct_per_gpu``: no GPU may hold two copies of one
    expert in a layer (vllm-ascend's constraint); every method honours it. None (the default)
    turns it on for the rules of stacks that need it (:data:`placer.types.DISTINCT_RULES`).
    """

    stats: RoutingStats
    model: ModelSpec
    topology: Topology
    num_redundant: int = 0
    dispatch: str = "nearest"
    execution: str = "standard"
    memory_limit_bytes: float | None = None
    weights: dict[str, float] = field(default_factory=dict)
    distinct_per_gpu: bool | None = None

    def __post_init__(self) -> None:
        if self.distinct_per_gpu is None:  # as the dispatch rule needs (vllm-ascend's)
            object.__setattr__(self, "distinct_per_gpu", self.dispatch in DISTINCT_RULES)
        if self.stats.load.shape != (self.model.num_moe_layers, self.model.num_experts):
            raise InvalidInputError(
                f"statistics have shape {self.stats.load.shape} (layers, experts), model {self.model.name} "
                f"has {self.model.num_moe_layers} MoE layers x {self.model.num_experts} experts", source="input")
        if self.dispatch not in DISPATCH_RULES:
            raise InvalidInputError(f"unknown dispatch rule {self.dispatch!r}", source="--dispatch")
        if self.execution not in EXECUTION_MODES:
            raise InvalidInputError(f"unknown execution mode {self.execution!r}", source="--execution")
        check_feasible(self.model, self.topology, self.num_redundant, self.memory_limit_bytes)
        if self.distinct_per_gpu and self.slots_per_gpu > self.model.num_experts:
            raise InfeasibleError(f"{self.slots_per_gpu} slots per GPU cannot hold distinct experts: the model has "
                                  f"{self.model.num_experts}; at most --redundant "
                                  f"{self.model.num_experts * self.topology.num_gpus - self.model.num_experts}")

    @property
    def num_slots(self) -> int:
        return self.model.num_experts + self.num_redundant

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.topology.num_gpus


def check_feasible(model: ModelSpec, topology: Topology, num_redundant: int,
                   memory_limit_bytes: float | None = None) -> None:
    """Raise :class:`InfeasibleError` naming the nearest feasible setting when sizes admit no placement."""
    e, g = model.num_experts, topology.num_gpus
    if num_redundant < 0:
        raise InfeasibleError(f"--redundant must be >= 0, got {num_redundant}")
    p = e + num_redundant
    if p < g:
        raise InfeasibleError(f"{g} GPUs need at least {g} slots per layer but there are {e} experts + "
                              f"{num_redundant} redundant = {p}; nearest feasible: --redundant {g - e} "
                              f"or --gpus {_largest_divisor_at_most(p, g)}")
    limit = memory_limit_bytes if memory_limit_bytes is not None else topology.memory_bytes
    if p % g:
        up = (-p) % g
        down = p % g
        options = [r for r in (num_redundant - down, num_redundant + up) if r >= 0]
        if model.sizes_known:  # only settings whose slots fit GPU memory
            fit_r = int(limit // (model.num_moe_layers * model.expert_weight_bytes)) * g - e
            if fit_r >= 0 and not [r for r in options if r <= fit_r]:
                raise InfeasibleError(f"{e} experts + {num_redundant} redundant = {p} slots per layer do not split "
                                      f"evenly over {g} GPUs, and --redundant {num_redundant} exceeds what fits in "
                                      f"GPU memory; the largest that fits on {g} GPUs is --redundant {fit_r}")
        hint = " or ".join(f"--redundant {r}" for r in options)
        raise InfeasibleError(f"{e} experts + {num_redundant} redundant = {p} slots per layer do not split "
                              f"evenly over {g} GPUs; nearest feasible: {hint}")
    if model.sizes_known:
        per_slot = model.num_moe_layers * model.expert_weight_bytes
        need = p // g * per_slot
        if need > limit:
            fit = int(limit // per_slot)
            head = (f"{p // g} slots per GPU need {need / 1e9:.1f} GB of expert weights, more than the "
                    f"{limit / 1e9:.1f} GB available; at most {fit} slots per GPU fit")
            if num_redundant > 0 and fit * g >= e:  # the redundancy is what does not fit
                raise InfeasibleError(f"{head}: --redundant {num_redundant} exceeds what fits in GPU memory; "
                                      f"the largest that fits on {g} GPUs is --redundant {fit * g - e}")
            raise InfeasibleError(head + (f" (e.g. --gpus {-(-e // fit)} or more)" if fit > 0 else ""))


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def solve(problem: PlacementProblem, method: str = "contiguous", *, time_limit_s: float | None = None,
          seed: int = 0, **options) -> SolveResult:
    """Run ``method`` on ``problem``; the returned placement has passed :func:`check_placement`."""
    try:
        func = METHODS[method]
    except KeyError:
        raise InvalidInputError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}",
                                source="--method") from None
    unknown = sorted(set(options) - set(method_options(method)))
    if unknown:
        known = method_options(method)
        raise InvalidInputError(f"method {method} takes no option {unknown[0]!r} (its options: "
                                f"{', '.join(known) if known else 'none'})", source="--method")
    start = time.perf_counter()
    result = func(problem, time_limit_s=time_limit_s, seed=seed, **options)
    if result.placement is not None:
        check_placement(result.placement, problem.model, problem.topology,
                        memory_limit_bytes=problem.memory_limit_bytes, distinct_per_gpu=bool(problem.distinct_per_gpu))
    if not result.wall_time_s:
        result = replace(result, wall_time_s=time.perf_counter() - start)
    return result


__all__ = ["METHODS", "PlacementProblem", "check_feasible", "expert_memory_per_gpu", "method_options", "register",
           "solve"]
