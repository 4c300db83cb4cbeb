"""When to publish a new placement: simulated gain against migration cost, with a margin.

For the window's statistics ``S``, the current placement ``A`` and the method's solve ``B`` on
``S`` (movement-aware from ``A`` over the horizon by default, :func:`placer.ilp.movement.solve_from`;
then relabelled by :func:`~placer.runtime.plan.plan_migration` to move the fewest weights):

* ``T(X)``: mean simulated step time of ``X`` on ``S`` (:func:`placer.simulator.simulate`,
  replay workload of ``iterations`` decode steps of ``tokens_per_rank`` tokens per rank, count
  level, pool drawn from ``S``; both placements see the same seeded draws).
* ``gain = (T(A) - T(B)) / T(A)``: the relative step-time reduction.
* ``migration_s``: the slowest GPU's transfer time, max over GPUs of the bytes it receives (and,
  separately, sends) in the plan, intra-node bytes over NVLink plus inter-node bytes over its
  NIC at the cluster's per-GPU bandwidths; counted as lost serving time.
* ``cost = migration_s / horizon_s``: that loss amortised over the horizon the new placement is
  expected to serve.
* publish iff ``gain - cost > threshold``.

The threshold is the hysteresis: going back from ``B`` to ``A`` later needs ``A`` to beat ``B``
by the same margin on the window then, so noise below the margin never flips the placement.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from placer._ray import init as ray_init
from placer.costs import transfer_seconds
from placer.errors import InvalidInputError
from placer.ilp import PlacementProblem, method_options, solve
from placer.ilp.movement import solve_from
from placer.metrics import gpu_load, load_balance
from placer.runtime.plan import plan_migration
from placer.simulator import ReplayWorkload, SimConfig, simulate
from placer.types import DISPATCH_RULES, ModelSpec, Placement, RoutingStats, SolveResult, Topology
from placer.validate import check_placement


@dataclass(frozen=True)
class PolicyConfig:
    """Decision parameters (see the module docstring)."""

    method: str = "eplb"
    redundant: int = 0
    dispatch: str = "nearest"
    threshold: float = 0.05
    horizon_s: float = 600.0
    tokens_per_rank: int = 512
    iterations: int = 8
    pool_size: int = 1024
    time_limit_s: float | None = None
    seed: int = 0
    ray_address: str | None = None
    movement_aware: bool = True

    def __post_init__(self) -> None:
        if self.dispatch not in DISPATCH_RULES:
            raise InvalidInputError(f"unknown dispatch rule {self.dispatch!r}", source="--dispatch")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise InvalidInputError(f"must be a non-negative fraction, got {self.threshold}", source="--threshold")
        if not self.horizon_s > 0 or not math.isfinite(self.horizon_s):
            raise InvalidInputError(f"must be positive seconds, got {self.horizon_s}", source="--horizon")
        for flag, v in (("--tokens-per-rank", self.tokens_per_rank), ("--iterations", self.iterations),
                        ("pool_size", self.pool_size)):
            if v < 1:
                raise InvalidInputError(f"must be at least 1, got {v}", source=flag)
        if self.redundant < 0:
            raise InvalidInputError(f"must be >= 0, got {self.redundant}", source="--redundant")


@dataclass(frozen=True)
class Decision:
    """One evaluation of a candidate against the current placement."""

    observations: int
    method: str
    publish: bool
    reason: str
    gain: float | None = None
    current_step_s: float | None = None
    candidate_step_s: float | None = None
    migration_bytes: float = 0.0
    migration_s: float = 0.0
    migration_cost: float = 0.0
    net_gain: float | None = None
    threshold: float = 0.0
    current_imbalance: float | None = None
    candidate_imbalance: float | None = None
    solve_s: float = 0.0
    decide_s: float = 0.0
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def imbalance(placement: Placement, topology: Topology, stats: RoutingStats, dispatch: str = "nearest") -> float:
    """Max/mean GPU load of ``placement`` on ``stats``, median over layers."""
    return load_balance(gpu_load(placement, topology, stats, dispatch=dispatch))["median"]


def step_time(placement: Placement, topology: Topology, model: ModelSpec, stats: RoutingStats,
              config: PolicyConfig) -> float:
    """Mean simulated step time of ``placement`` on ``stats`` (seconds)."""
    out = simulate(placement, topology, model, routing=stats,
                   workload=ReplayWorkload(tokens_per_rank=config.tokens_per_rank, iterations=config.iterations),
                   config=SimConfig(dispatch=config.dispatch, seed=config.seed, pool_size=config.pool_size),
                   label="serve", level="count")
    return float(out.tables["iterations"]["duration_s"].mean())


def migration_seconds(plan: Any, topology: Topology) -> float:
    """Slowest GPU's weight-transfer time in ``plan`` (a MigrationPlan), intra-node over NVLink, across over the NIC."""
    t = plan.transfers
    if len(t) == 0:
        return 0.0
    gpn, g = topology.gpus_per_node, topology.num_gpus
    cross = (t.src_gpu // gpn) != (t.dst_gpu // gpn)
    worst = 0.0
    for end in (t.src_gpu, t.dst_gpu):
        intra = np.bincount(end[~cross], weights=t.bytes[~cross], minlength=g)
        inter = np.bincount(end[cross], weights=t.bytes[cross], minlength=g)
        seconds = transfer_seconds(intra, topology.nvlink_gbps) + transfer_seconds(inter, topology.nic_gbps)
        worst = max(worst, float(seconds.max()))
    return worst


def should_publish(gain: float, migration_cost: float, threshold: float) -> tuple[bool, str]:
    """The rule: publish iff ``gain - migration_cost > threshold``; returns (publish, reason)."""
    net = gain - migration_cost
    if net > threshold:
        return True, f"net gain {net:.4f} > threshold {threshold:.4f}"
    return False, f"net gain {net:.4f} <= threshold {threshold:.4f}"


def _solve(problem: PlacementProblem, method: str, current: Placement | None, horizon_s: float,
           **kwargs: Any) -> SolveResult:
    if current is None:
        return solve(problem, method, **kwargs)
    return solve_from(problem, method, current, horizon_s=horizon_s, **kwargs)


def resolve(problem: PlacementProblem, config: PolicyConfig, current: Placement | None = None) -> SolveResult:
    """The re-solve: movement-aware from ``current`` over ``config.horizon_s`` when given and
    ``config.movement_aware`` (:func:`placer.ilp.movement.solve_from`), in this process or on
    the Ray cluster at ``config.ray_address`` (a method that splits into layer subproblems
    spreads them over the cluster; any other runs as one Ray task there). Call
    :func:`placer._ray.init` from the main thread first (``placer serve`` does)."""
    kwargs: dict[str, Any] = dict(time_limit_s=config.time_limit_s, seed=config.seed)
    start = current if config.movement_aware else None
    if config.ray_address is None:
        return _solve(problem, config.method, start, config.horizon_s, **kwargs)
    if "ray_address" in method_options(config.method):
        return _solve(problem, config.method, start, config.horizon_s, ray_address=config.ray_address, **kwargs)
    ray = ray_init(config.ray_address, "re-solving on a Ray cluster (--ray-address)")
    result = ray.get(ray.remote(num_cpus=1)(_solve).remote(problem, config.method, start, config.horizon_s,
                                                           **kwargs))
    if result.placement is not None:  # validated where it ran; and here, before it is used
        check_placement(result.placement, problem.model, problem.topology,
                        memory_limit_bytes=problem.memory_limit_bytes,
                        distinct_per_gpu=bool(problem.distinct_per_gpu))
    return result


def evaluate(current: Placement, stats: RoutingStats, model: ModelSpec, topology: Topology,
             config: PolicyConfig, observations: int = 0) -> tuple[Decision, Placement | None]:
    """Solve on ``stats``, simulate both placements, apply the rule.

    Returns the decision and the candidate (relabelled to move the fewest weights; None when
    the solver gave nothing new).
    """
    start = time.perf_counter()
    base: dict[str, Any] = dict(observations=observations, method=config.method, threshold=config.threshold, time=time.time())
    problem = PlacementProblem(stats, model, topology, num_redundant=config.redundant, dispatch=config.dispatch)
    result = resolve(problem, config, current)
    solve_s = time.perf_counter() - start
    cur_imb = imbalance(current, topology, stats, config.dispatch)
    if result.placement is None:
        return Decision(publish=False, reason=f"{config.method} found no placement ({result.status})",
                        current_imbalance=cur_imb, solve_s=solve_s,
                        decide_s=time.perf_counter() - start, **base), None
    plan = plan_migration(current, result.placement, topology, expert_bytes=model.expert_weight_bytes)
    candidate = plan.new
    cand_imb = imbalance(candidate, topology, stats, config.dispatch)
    if np.array_equal(candidate.physical_to_logical, current.physical_to_logical):
        return Decision(publish=False, reason="the candidate is the current placement", gain=0.0, net_gain=0.0,
                        current_imbalance=cur_imb, candidate_imbalance=cand_imb, solve_s=solve_s,
                        decide_s=time.perf_counter() - start, **base), None
    t_cur = step_time(current, topology, model, stats, config)
    t_new = step_time(candidate, topology, model, stats, config)
    gain = (t_cur - t_new) / t_cur if t_cur > 0 else 0.0
    mig_s = migration_seconds(plan, topology)
    cost = mig_s / config.horizon_s
    publish, reason = should_publish(gain, cost, config.threshold)
    decision = Decision(publish=publish, reason=reason, gain=gain, current_step_s=t_cur, candidate_step_s=t_new,
                        migration_bytes=plan.bytes_moved, migration_s=mig_s, migration_cost=cost,
                        net_gain=gain - cost, current_imbalance=cur_imb, candidate_imbalance=cand_imb,
                        solve_s=solve_s, decide_s=time.perf_counter() - start, **base)
    return decision, candidate
