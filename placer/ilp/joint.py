"""The ``placer`` method: joint balance + traffic placement with replication chosen jointly.

Standard execution: start from EPLB (:func:`placer.ilp.eplb.rebalance_experts` with the
problem's groups, nodes and GPUs; it decides replica counts by load), from the contiguous
layout and, on several nodes with a token sample, from :func:`placer.ilp.clustered.clustered_map`
(experts routed together on one node, the hottest on every node), then improve every layer by simulated annealing on the objective of
:mod:`placer.ilp.objective` (:mod:`placer.ilp.local_search`). Moves swap two slots between GPUs
and move redundant slots between experts, so replica counts and replica locations are chosen
together with the layout: with the ``nearest`` rule a replica in the home node serves locally,
so replicating and co-locating experts that fire together cuts inter-node sends. Layers are
independent subproblems, solved serially, in a process pool or on Ray
(:mod:`placer.ilp.parallel`), identically for a given seed.

The search scores layers under the *expected* dispatch (:mod:`placer.ilp._ls_kernel`; the
busiest GPU's load as its expected maximum over the rule's deal, :mod:`placer.ilp.load_model`); the
reported objective is :func:`~placer.ilp.objective.evaluate_objective` under the problem's
actual dispatch table. Under ``sglang-static`` (SGLang 0.5.23's tables, whose fair spreads are
per-rank random streams that do not coordinate) one more start, :func:`placer.ilp.starts.coordinated_map`, keeps
the redundant slots on cold experts, and the balance cap's reference is the better of EPLB and
that start, measured on SGLang's actual tables. The result is never worse on that objective than the better start: if
the searched placement scores worse (possible only through the dispatch table's random fair
spread), the better start is returned instead.

Context-coherent execution is delegated to :func:`placer.ilp.coherent.solve_coherent`.

The search scores each layer on at most ``search_tokens`` (1024) token types of the stats'
sample (a random prefix of it when there are more; Mixtral's 4 GPUs x 28 expert pairs are 112
types, so small models use the whole sample); the reported objective uses the whole sample.

Options (``solve(problem, "placer", ...)``): ``time_limit_s`` (wall clock from the call, numba
compilation on a cold cache included (:mod:`placer.ilp.warmup`), checked between chunks of annealing
steps; the search stops early enough for the final evaluation; when the limit passes before the
search can start, the best start is returned; status "timeout" when it cut the search,
"feasible" otherwise),
``seed``, ``iterations`` (annealing steps per layer and annealed start, the deterministic
budget; default :func:`default_iterations`), ``search_tokens``, ``num_workers`` (local
processes, default ``min(2, cpus)``), ``ray_address`` (run layer groups on Ray; the terms
``ray_tasks`` and ``ray_nodes`` count the tasks and the Ray nodes they ran on),
``dispatch_seed`` (the dispatch-table seed of the reported objective; default the metrics' 42).
The result is identical for any ``num_workers`` / Ray layout. ``bound`` is
:func:`placer.ilp.bounds.joint_lower_bound`: balance and traffic bounded per layer (co-location
pairs and home capacity), the cap's penalty by 0; ``terms`` carry its parts (``bound_balance``,
``bound_traffic``, and the bounds on ``other_ranks`` / ``inter_node`` sends per token-layer),
``bound_covers_traffic`` (1, or 0 when the time limit left no room for the traffic part after
the search, about 2 s on DeepSeek-V3; the bound is then the balance term's) and ``bound_balance_only`` (the
balance term's bound alone, the bound before the traffic part).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import replace

import numpy as np

from placer.errors import InvalidInputError
from placer.ilp import _ls_kernel
from placer.ilp.base import PlacementProblem, register
from placer.ilp.bounds import (
    BOUND_COVERS,
    balance_lower_bound,
    balance_only_bound,
    bound_seconds,
    joint_lower_bound,
)
from placer.ilp.coherent import solve_coherent
from placer.ilp.frontier import enumeration_size, exact_frontier, frontier_refusal, placement_under
from placer.ilp.load_model import rank_loads
from placer.ilp.local_search import LayerTask, SearchConfig, token_types
from placer.ilp.objective import (
    evaluate_objective,
    link_scale,
    objective_weights,
    reference_ratio,
)
from placer.ilp.parallel import run_layer_search
from placer.ilp.starts import start_maps as starts_for
from placer.ilp.warmup import ensure_search_kernels
from placer.metrics.dispatch import DEFAULT_DISPATCH_SEED, sample_home_ranks
from placer.types import Placement, SolveResult

__all__ = ["balance_lower_bound", "default_iterations", "solve_placer"]

DEFAULT_SEARCH_TOKENS = 1024
"""Token types per layer the search scores (a random prefix of the sample beyond that)."""
_REPORTED = ("balance", "traffic", "affinity", "balance_cap", "max_load_per_token",
             "load_max_over_mean_median", "expected_load_max_over_mean_median",
             "nvlink_sends_per_token_layer", "rdma_sends_per_token_layer")


def default_iterations(problem: PlacementProblem) -> int:
    """Annealing steps per layer and annealed start (20 000, in 16 cooling cycles)."""
    return 20000


def _tasks(problem: PlacementProblem, starts: np.ndarray, weights: dict, cfg: SearchConfig,
           search_tokens: int, move_cost: np.ndarray | None = None) -> list[LayerTask]:
    stats, topo = problem.stats, problem.topology
    num_layers = stats.num_layers
    load = stats.load.astype(np.float64) / max(stats.num_tokens, 1)
    tokens = max(stats.num_tokens, 1)
    loads = rank_loads(stats, topo.num_gpus)  # per batch token, as ``load``
    rank, rank_sq, noise = (None, None, None) if loads is None else (
        loads.shares / tokens, loads.squares / tokens ** 2, loads.noise / tokens)
    if (stats.sample_size > 0 and (cfg.w_nv > 0 or cfg.w_rdma > 0) and stats.sample_ids is not None
            and stats.sample_home_rank is not None and stats.sample_token_index is not None):
        sample = stats.sample_ids.astype(np.int64)
        home = sample_home_ranks(stats, topo.num_gpus)
    else:
        sample = np.zeros((0, num_layers, stats.top_k), np.int64)
        home = np.zeros(0, np.int64)
    tasks = []
    for layer in range(num_layers):
        ids, hm, wt = token_types(sample[:, layer], home)
        if ids.shape[0] > search_tokens:  # the sample is in random (key) order: take a prefix
            ids, hm, wt = token_types(sample[:search_tokens, layer], home[:search_tokens])
        tasks.append(LayerTask(layer, load[layer], ids, hm, wt, starts[:, layer], weights["balance_cap"],
                               None if move_cost is None else move_cost[layer], None if rank is None else rank[layer],
                               None if rank_sq is None else rank_sq[layer], None if noise is None else noise[layer]))
    return tasks


@register("placer", forwards_to="placer.ilp.coherent:solve_coherent")
def solve_placer(problem: PlacementProblem, *, time_limit_s: float | None = None, seed: int = 0,
                 num_workers: int | None = None, ray_address: str | None = None,
                 iterations: int | None = None, search_tokens: int = DEFAULT_SEARCH_TOKENS,
                 dispatch_seed: int = DEFAULT_DISPATCH_SEED, anchor: Placement | None = None,
                 anchor_cost: np.ndarray | None = None, **options) -> SolveResult:
    """Joint placement (see the module docstring).

    ``anchor`` (a placement of the problem's shape) and ``anchor_cost`` (float [L, G, E], the
    cost, in the objective's units, of GPU g holding expert e in layer l; 0 where ``anchor``
    holds it): movement-aware re-placement (:func:`placer.ilp.movement.solve_from`). The anchor
    replaces the contiguous start, the cost is added to the searched energy once per (layer,
    GPU, expert) held, and the returned placement is the best by objective plus that cost (the
    term ``movement_term``).
    """
    t0 = time.perf_counter()
    if problem.execution == "context-coherent":
        if anchor is not None or anchor_cost is not None:
            raise InvalidInputError("an anchored (movement-aware) search needs standard execution",
                                    source="--from")
        return _coherent(problem, time_limit_s=time_limit_s, seed=seed, num_workers=num_workers,
                         ray_address=ray_address, **options)
    if options:
        raise InvalidInputError(f"unknown options for method placer: {', '.join(sorted(options))}",
                                source="--method")
    deadline = None if time_limit_s is None else time.time() + float(time_limit_s)
    w = objective_weights(problem)
    topo, model = problem.topology, problem.model
    iters = default_iterations(problem) if iterations is None else int(iterations)
    if iters < 0 or search_tokens < 1:
        raise InvalidInputError(f"need iterations >= 0 and search_tokens >= 1, got {iterations}, "
                                f"{search_tokens}", source="--method")
    cfg = SearchConfig(num_gpus=topo.num_gpus, num_nodes=topo.num_nodes, gpus_per_node=topo.gpus_per_node,
                       slots_per_gpu=problem.slots_per_gpu, num_experts=model.num_experts,
                       num_slots=problem.num_slots, top_k=problem.stats.top_k, rule=problem.dispatch,
                       w_bal=w["balance"], w_nv=w["traffic_nvlink"], w_rdma=w["traffic_rdma"],
                       pen=w["cap_penalty"] * w["balance_base"] if w["balance_cap"] is not None else 0.0,
                       iterations=iters, seed=int(seed), distinct=bool(problem.distinct_per_gpu),
                       link_scale=link_scale(topo), time_scale=None if topo.gpu_speed is None else topo.time_scale())
    start_maps = starts_for(problem)
    if (anchor is None) != (anchor_cost is None):
        raise InvalidInputError("anchor and anchor_cost go together", source="--from")
    if anchor is not None:
        start_maps.pop("contiguous", None)  # far from any running placement
        start_maps["anchor"] = np.asarray(anchor.physical_to_logical, dtype=np.int64)
    names = list(start_maps)  # eplb first: the cap's reference
    spg, e = problem.slots_per_gpu, model.num_experts
    start_placements = {n: Placement(start_maps[n], spg, e) for n in names}
    t_eval = time.time()
    ev_eplb = evaluate_objective(problem, start_placements["eplb"], seed=dispatch_seed,
                                 weights={**w, "balance_cap": None})
    reference = ev_eplb["per_layer"]["expected_load_max_over_mean"] if w["balance_cap"] is not None else None
    if reference is not None and "coordinated" in start_placements:
        reference = reference_ratio(problem)  # sglang-static: the better of EPLB and the coordinated start
    start_ev = {"eplb": ev_eplb if reference is None else
                evaluate_objective(problem, start_placements["eplb"], seed=dispatch_seed, weights=w,
                                   reference=reference)}
    eval_s = time.time() - t_eval
    for n in names[1:]:  # before the search: after it, one evaluation is left
        if deadline is not None and time.time() + eval_s > deadline:
            break  # out of time: the starts scored so far (always EPLB's)
        t_eval = time.time()
        start_ev[n] = evaluate_objective(problem, start_placements[n], seed=dispatch_seed, weights=w,
                                         reference=reference)
        eval_s = min(eval_s, time.time() - t_eval)
    # The search stops early enough for the last evaluation to end by the deadline.
    search_deadline = None if deadline is None else deadline - 1.5 * eval_s - 0.1
    ray_nodes: list[str] = []
    ready = ((search_deadline is None or time.time() < search_deadline)
             and ensure_search_kernels(search_deadline))  # compiles on a cold numba cache
    if ready:
        tasks = _tasks(problem, np.stack([start_maps[n] for n in names]), w, cfg, search_tokens, anchor_cost)
        results = run_layer_search(tasks, cfg, search_deadline, num_workers=num_workers,
                                   ray_address=ray_address, ray_nodes=ray_nodes)
        placement = Placement(np.stack([r.p2l for r in results]), spg, e)
        ev = evaluate_objective(problem, placement, seed=dispatch_seed, weights=w, reference=reference)
    else:  # the deadline passed (e.g. while the kernels compiled): the best start, status "timeout"
        results, placement, ev = [], start_placements["eplb"], start_ev["eplb"]
    def moved(p: Placement) -> float:  # the movement term of an anchored solve, else 0
        if anchor_cost is None:
            return 0.0
        return float(anchor_cost[_held(p, topo.num_gpus)].sum())

    total = {n: float(start_ev[n]["total"]) + moved(start_placements[n]) for n in start_ev}
    best_start = min(total, key=lambda n: total[n])
    chosen = "search" if ready else "eplb"
    if float(ev["total"]) + moved(placement) > total[best_start]:
        placement, ev, chosen = start_placements[best_start], start_ev[best_start], best_start
    assert float(ev["total"]) + moved(placement) <= min(total.values()) + 1e-12 * max(1.0, abs(min(total.values())))
    exact_layers = 0
    if anchor_cost is None and (deadline is None or time.time() + 1.0 < deadline):
        placement, ev, exact_layers = _exact_layers(problem, placement, ev, w, reference, dispatch_seed)

    # The bound after the search, so that it never takes the search's time: where the limit
    # leaves no room for it, the balance term's bound alone.
    if deadline is None or time.time() + 2 * bound_seconds(problem) < deadline:
        bound = joint_lower_bound(problem, w)
    else:
        bound = balance_only_bound(problem, w, "the time limit left no room for the traffic bound")
    lb = bound.total
    obj = float(ev["total"])
    gap = max(0.0, (obj - lb) / max(abs(obj), 1e-300)) if obj > 0 else 0.0
    terms = {k: float(ev[k]) for k in _REPORTED}
    terms.update({"bound_balance": float(bound.balance.sum()), "bound_traffic": float(bound.traffic.sum()),
                  "bound_covers_traffic": float(bound.covers == BOUND_COVERS),
                  "bound_other_ranks_per_token_layer": float(bound.other_ranks.mean()),
                  "bound_inter_node_per_token_layer": float(bound.remote_nodes.mean()),
                  "bound_balance_only": float(w["balance"] * balance_lower_bound(problem).sum())})
    terms.update({f"start_{n}": float(start_ev[n]["total"]) for n in start_ev})
    terms["returned_start"] = float(names.index(chosen)) if chosen != "search" else -1.0
    if anchor_cost is not None:
        terms["movement_term"] = moved(placement)
    terms["exact_layers"] = float(exact_layers)
    terms["search_primary"] = float(sum(r.primary for r in results))
    terms["iterations"] = float(sum(r.iterations for r in results))
    timed_out = not ready or any(r.timed_out for r in results)
    backend = "numba" if _ls_kernel.HAVE_NUMBA else "python"
    if ray_address:
        backend += "+ray"
        terms["ray_tasks"] = float(len(ray_nodes))
        terms["ray_nodes"] = float(len(set(ray_nodes)))  # Ray nodes the layer searches ran on
    return SolveResult(placement=placement, status="timeout" if timed_out else "feasible", objective=obj,
                       terms=terms, bound=lb, gap=gap, wall_time_s=time.perf_counter() - t0,
                       method="placer", backend=backend)


EXACT_LAYERS_WORK = 20_000_000
"""Largest exact frontier (:func:`placer.ilp.frontier.enumeration_size`) the search's result is checked against."""


def _exact_layers(problem: PlacementProblem, placement: Placement, ev: dict, w: dict, reference, seed: int
                  ) -> tuple[Placement, dict, int]:
    """Where the structure allows an exact answer (:func:`placer.ilp.frontier.frontier_refusal`:
    standard execution, ``nearest``, 1-2 nodes of 1-2 GPUs, a small enumeration; equal GPUs and
    every pair of a tier at one bandwidth), each layer takes the exact frontier's placement with the fewest
    inter-node dispatches at the search's own max GPU load in that layer, when that lowers the
    layer's objective. Layers are independent in standard execution, so the total never rises.
    Returns (placement, its evaluation, layers replaced)."""
    topo = problem.topology
    scale = link_scale(topo)  # the frontier counts sends, not their pairs' bandwidths: uniform tiers only
    uniform = scale is None or bool(np.allclose(scale[~np.eye(topo.num_gpus, dtype=bool)], 1.0, rtol=1e-12))
    if (not uniform or topo.gpu_speed is not None or frontier_refusal(problem) is not None
            or enumeration_size(problem.model.num_experts, topo.num_nodes, topo.gpus_per_node,
                                problem.slots_per_gpu, problem.model.num_moe_layers) > EXACT_LAYERS_WORK):
        return placement, ev, 0
    frontier = exact_frontier(problem)
    cap = np.asarray(ev["per_layer"]["max_load_per_token"], dtype=np.float64) * problem.stats.num_tokens
    exact = placement_under(frontier, cap)
    ev_exact = evaluate_objective(problem, exact, seed=seed, weights=w, reference=reference)

    def layer_total(e: dict) -> np.ndarray:
        pl = e["per_layer"]
        return pl["balance"] + pl["traffic"] + pl["affinity"] + pl["balance_cap"]

    take = layer_total(ev_exact) < layer_total(ev) * (1 - 1e-9)
    if not take.any():
        return placement, ev, 0
    merged = Placement(np.where(take[:, None], exact.physical_to_logical, placement.physical_to_logical)
                       .astype(placement.physical_to_logical.dtype), placement.slots_per_gpu, placement.num_experts)
    ev_merged = evaluate_objective(problem, merged, seed=seed, weights=w, reference=reference)
    if float(ev_merged["total"]) > float(ev["total"]):  # cannot happen: the layers' terms add up
        return placement, ev, 0
    return merged, ev_merged, int(take.sum())


def _held(placement: Placement, num_gpus: int) -> np.ndarray:
    """Whether each GPU holds each expert: bool [L, G, E]."""
    p2l = np.asarray(placement.physical_to_logical, dtype=np.int64)
    num_layers, num_slots = p2l.shape
    e = placement.num_experts
    layer = np.repeat(np.arange(num_layers), num_slots)
    gpu = np.tile(np.arange(num_slots) // (num_slots // num_gpus), num_layers)
    counts = np.bincount((layer * num_gpus + gpu) * e + p2l.ravel(), minlength=num_layers * num_gpus * e)
    return counts.reshape(num_layers, num_gpus, e) > 0


def _coherent(problem: PlacementProblem, **options) -> SolveResult:
    """Delegate to :func:`placer.ilp.coherent.solve_coherent`; add this module's terms."""
    params = inspect.signature(solve_coherent).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    passed = {k: v for k, v in options.items()
              if (v is not None or k in ("time_limit_s",)) and (takes_any or k in params)}
    result = solve_coherent(problem, **passed)
    if result.placement is None:
        return replace(result, method="placer")
    ev = evaluate_objective(problem, result.placement)
    terms = dict(result.terms)
    terms.update({f"placer_{k}": float(ev[k]) for k in (*_REPORTED, "total")})
    return replace(result, method="placer", terms=terms)
