"""The ``placer`` method: joint balance + traffic placement with replication chosen jointly.

Standard execution: start from EPLB (:func:`placer.ilp.eplb.rebalance_experts` with the
problem's groups, nodes and GPUs; it decides replica counts by load) and from the contiguous
layout, then improve every layer by simulated annealing on the objective of
:mod:`placer.ilp.objective` (:mod:`placer.ilp.local_search`). Moves swap two slots between GPUs
and move redundant slots between experts, so replica counts and replica locations are chosen
together with the layout: with the ``nearest`` rule a replica in the home node serves locally,
so replicating and co-locating experts that fire together cuts inter-node sends. Layers are
independent subproblems, solved serially, in a process pool or on Ray
(:mod:`placer.ilp.parallel`), identically for a given seed.

The search scores layers under the *expected* dispatch (:mod:`placer.ilp._ls_kernel`); the
reported objective is :func:`~placer.ilp.objective.evaluate_objective` under the problem's
actual dispatch table. Under ``sglang-static`` (SGLang 0.5.23's tables, whose fair spreads are
per-rank random streams that do not coordinate) a third start, :func:`coordinated_map`, keeps
the redundant slots on cold experts, and the balance cap's reference is the better of EPLB and
that start, measured on SGLang's actual tables. The result is never worse on that objective than the better start: if
the searched placement scores worse (possible only through the dispatch table's random fair
spread), the better start is returned instead.

Context-coherent execution is delegated to :func:`placer.ilp.coherent.solve_coherent`.

The search scores each layer on at most ``search_tokens`` (1024) token types of the stats'
sample (a random prefix of it when there are more; Mixtral's 4 GPUs x 28 expert pairs are 112
types, so small models use the whole sample); the reported objective uses the whole sample.

Options (``solve(problem, "placer", ...)``): ``time_limit_s`` (wall clock from the call, numba
compilation on a cold cache included (:mod:`placer._warm`), checked between chunks of annealing
steps; the search stops early enough for the final evaluation; when the limit passes before the
search can start, the best start is returned; status "timeout" when it cut the search,
"feasible" otherwise),
``seed``, ``iterations`` (annealing steps per layer and annealed start, the deterministic
budget; default :func:`default_iterations`), ``search_tokens``, ``num_workers`` (local
processes, default ``min(2, cpus)``), ``ray_address`` (run layer groups on Ray),
``dispatch_seed`` (the dispatch-table seed of the reported objective; default the metrics' 42).
The result is identical for any ``num_workers`` / Ray layout. ``bound`` is the balance term's
lower bound (:func:`balance_lower_bound`, the other terms bounded by 0), valid but loose.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import replace

import numpy as np

from placer.errors import InvalidInputError
from placer.ilp import _ls_kernel
from placer.ilp.base import PlacementProblem, register
from placer.ilp.local_search import LayerTask, SearchConfig, token_types
from placer.ilp.objective import evaluate_objective, objective_weights, reference_ratio
from placer.ilp.simple import contiguous_map
from placer.metrics.dispatch import DEFAULT_DISPATCH_SEED
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


def balance_lower_bound(problem: PlacementProblem) -> np.ndarray:
    """Per-layer lower bound on the busiest GPU's token-slots per batch token, any placement.

    The busiest GPU serves at least the mean, ``sum_e load_e / G``, and at least the share of
    the heaviest expert spread over the most GPUs it can occupy, ``max_e load_e / min(G, R + 1)``.
    """
    load = problem.stats.load.astype(np.float64) / max(problem.stats.num_tokens, 1)
    g = problem.topology.num_gpus
    spread = min(g, problem.num_redundant + 1)
    return np.maximum(load.sum(axis=1) / g, load.max(axis=1) / spread)


def coordinated_map(load: np.ndarray, num_gpus: int, gpus_per_node: int, slots_per_gpu: int) -> np.ndarray:
    """A start whose static-dispatch tables stay balanced under SGLang's uncoordinated spread.

    ``load``: [L, E]. Returns int64 [L, G * slots_per_gpu]. The redundant slots hold extra
    copies of the coldest experts (round robin when there are more slots than experts); every
    copy is an item carrying its expert's load split evenly over its copies. The items are
    packed heaviest first, never onto a GPU that holds the expert already nor onto a node
    holding one of its copies while there are nodes left (so the ranks of each node reach a copy
    on their node and SGLang's table is deterministic there), in four ways, and each layer keeps
    the one with the lighter busiest GPU: each item to the least-loaded GPU with room (good when
    a few experts are hot); in rounds of G items, one per GPU, least-loaded GPU first (good when
    loads are flat: the last light items are not all left to the last GPUs with room); every
    expert's first copy by its whole load before the extra copies; and the first copies by LPT,
    the extra copies then filling the rooms left (:func:`_pack_fill`, which prefers but does not
    force another node).
    When only GPUs breaking the rule have room, an expert of similar load (single-copy ones
    first) that the rule lets into the room moves there, and the copy takes its slot.

    Under ``sglang-static`` the ranks without a local or same-node replica draw from per-rank
    random streams that do not coordinate; with the extra copies on cold experts those draws
    move little load.
    """
    load = np.asarray(load, dtype=np.float64)
    num_layers, num_experts = load.shape
    num_slots = num_gpus * slots_per_gpu
    node = np.arange(num_gpus) // gpus_per_node
    out = np.empty((num_layers, num_slots), dtype=np.int64)
    for layer in range(num_layers):
        row = load[layer]
        copies = np.ones(num_experts, dtype=np.int64)
        cold = np.argsort(row, kind="stable")
        for i in range(num_slots - num_experts):
            copies[cold[i % num_experts]] += 1
        share = row / copies
        items = sorted(((share[e], int(e)) for e in range(num_experts) for _ in range(copies[e])),
                       key=lambda item: (-item[0], item[1]))
        firsts = sorted(((share[e], int(e)) for e in range(num_experts)), key=lambda it: (-row[it[1]], it[1]))
        extras = [(share[e], int(e)) for e in range(num_experts) for _ in range(copies[e] - 1)]
        extras.sort(key=lambda item: (-item[0], item[1]))
        packs = [_pack(items, share, copies, node, slots_per_gpu, False),
                 _pack(items, share, copies, node, slots_per_gpu, True),
                 _pack(firsts + extras, share, copies, node, slots_per_gpu, False),
                 _pack_fill(firsts, extras, share, node, slots_per_gpu)]
        # Two copies on one GPU waste a slot (and vllm-ascend mis-routes them): such a packing is
        # kept only when every packing has one.
        held, _ = min(packs, key=lambda pack: (any(len(set(h)) < len(h) for h in pack[0]), pack[1].max()))
        out[layer] = np.concatenate(held)
    return out


def _pack_fill(firsts: list[tuple[float, int]], extras: list[tuple[float, int]], share: np.ndarray,
               node: np.ndarray, slots_per_gpu: int) -> tuple[list[list[int]], np.ndarray]:
    """The fourth packing of :func:`coordinated_map`: first copies heaviest first onto the
    least-loaded GPU with room, then the extra copies, coldest first, into the rooms left, on
    another node than the expert's first copy where one has room (no moves)."""
    num_gpus = len(node)
    held: list[list[int]] = [[] for _ in range(num_gpus)]
    gpu_load = np.zeros(num_gpus)
    home = {}
    for w, e in firsts:
        g = min((h for h in range(num_gpus) if len(held[h]) < slots_per_gpu), key=lambda h: (gpu_load[h], h))
        held[g].append(e)
        gpu_load[g] += w
        home[e] = g
    for w, e in sorted(extras, key=lambda item: (item[0], item[1])):
        free = [h for h in range(num_gpus) if len(held[h]) < slots_per_gpu and e not in held[h]] or \
            [h for h in range(num_gpus) if len(held[h]) < slots_per_gpu]
        other = [h for h in free if node[h] != node[home[e]]]
        g = min(other or free, key=lambda h: (gpu_load[h], h))
        held[g].append(e)
        gpu_load[g] += w
    return held, gpu_load


def _pack(items: list[tuple[float, int]], share: np.ndarray, copies: np.ndarray, node: np.ndarray,
          slots_per_gpu: int, rounds: bool) -> tuple[list[list[int]], np.ndarray]:
    """One packing of :func:`coordinated_map`: (experts held by each GPU, GPU loads)."""
    num_gpus = len(node)
    num_nodes = int(node[-1]) + 1
    held: list[list[int]] = [[] for _ in range(num_gpus)]
    gpu_load = np.zeros(num_gpus)

    def allowed(g: int, e: int) -> bool:
        if e in held[g]:
            return False
        used = {int(node[h]) for h in range(num_gpus) if e in held[h]}
        return len(used) >= num_nodes or int(node[g]) not in used

    def movable(x: int, src: int, dst: int) -> bool:
        held[src].remove(x)
        ok = allowed(dst, x)
        held[src].append(x)
        return ok

    def free_gpus() -> list[int]:
        return sorted((g for g in range(num_gpus) if len(held[g]) < slots_per_gpu), key=lambda h: (gpu_load[h], h))

    step = num_gpus if rounds else 1
    for start in range(0, len(items), step):
        order = free_gpus()
        for w, e in items[start:start + step]:
            order = [g for g in order if len(held[g]) < slots_per_gpu] or free_gpus()
            ok = [g for g in order if allowed(g, e)]
            if ok:
                g = ok[0]
            else:  # repair: move a similar expert from an allowed GPU into the room
                room = order[0]
                swaps = [(copies[x] > 1, abs(share[x] - w), h, x) for h in range(num_gpus)
                         if h != room and allowed(h, e) for x in held[h] if movable(x, h, room)]
                order.remove(room)
                if not swaps:  # nothing to trade: take the room as it is
                    held[room].append(e)
                    gpu_load[room] += w
                    continue
                _, _, g, x = min(swaps)
                held[g].remove(x)
                gpu_load[g] -= share[x]
                held[room].append(x)
                gpu_load[room] += share[x]
            held[g].append(e)
            gpu_load[g] += w
            if g in order:
                order.remove(g)
    return held, gpu_load


def _starts(problem: PlacementProblem) -> dict[str, np.ndarray]:
    from placer.ilp.eplb import rebalance_experts

    topo, model = problem.topology, problem.model
    if problem.distinct_per_gpu:
        from placer.ilp.eplb import rebalance_experts_hierarchical
        groups, nodes = (model.num_groups, topo.num_nodes) if model.num_groups % topo.num_nodes == 0 else (1, 1)
        eplb, _, _ = rebalance_experts_hierarchical(np.asarray(problem.stats.load, np.float32), problem.num_slots,
                                                    groups, nodes, topo.num_gpus, distinct=True)
    else:
        eplb, _, _ = rebalance_experts(problem.stats.load, problem.num_slots, model.num_groups,
                                       topo.num_nodes, topo.num_gpus)
    starts = {"eplb": eplb.astype(np.int64),
              "contiguous": contiguous_map(model.num_moe_layers, model.num_experts, problem.num_slots).astype(np.int64)}
    if problem.dispatch in ("sglang-static", "vllm-ascend") and problem.num_redundant > 0:
        starts["coordinated"] = coordinated_map(problem.stats.load, topo.num_gpus, topo.gpus_per_node,
                                                problem.slots_per_gpu)
    if problem.distinct_per_gpu:  # every start obeys the constraint the search keeps
        from placer.ilp.distinct import separate_by_load
        for name, start in starts.items():
            starts[name] = separate_by_load(start, problem.slots_per_gpu, problem.stats.load)
    return starts


def _tasks(problem: PlacementProblem, starts: np.ndarray, weights: dict, cfg: SearchConfig,
           search_tokens: int) -> list[LayerTask]:
    stats, topo = problem.stats, problem.topology
    num_layers = stats.num_layers
    load = stats.load.astype(np.float64) / max(stats.num_tokens, 1)
    if stats.sample_size > 0 and (cfg.w_nv > 0 or cfg.w_rdma > 0):
        sample = stats.sample_ids.astype(np.int64)
        raw = stats.sample_home_rank.astype(np.int64)
        home = np.where(raw >= 0, raw, stats.sample_token_index.astype(np.int64) % topo.num_gpus)
    else:
        sample = np.zeros((0, num_layers, stats.top_k), np.int64)
        home = np.zeros(0, np.int64)
    tasks = []
    for layer in range(num_layers):
        ids, hm, wt = token_types(sample[:, layer], home)
        if ids.shape[0] > search_tokens:  # the sample is in random (key) order: take a prefix
            ids, hm, wt = token_types(sample[:search_tokens, layer], home[:search_tokens])
        tasks.append(LayerTask(layer, load[layer], ids, hm, wt, starts[:, layer], weights["balance_cap"]))
    return tasks


@register("placer", forwards_to="placer.ilp.coherent:solve_coherent")
def solve_placer(problem: PlacementProblem, *, time_limit_s: float | None = None, seed: int = 0,
                 num_workers: int | None = None, ray_address: str | None = None,
                 iterations: int | None = None, search_tokens: int = DEFAULT_SEARCH_TOKENS,
                 dispatch_seed: int = DEFAULT_DISPATCH_SEED, **options) -> SolveResult:
    """Joint placement (see the module docstring)."""
    t0 = time.perf_counter()
    if problem.execution == "context-coherent":
        return _coherent(problem, time_limit_s=time_limit_s, seed=seed, num_workers=num_workers,
                         ray_address=ray_address, **options)
    if options:
        raise InvalidInputError(f"unknown options for method placer: {', '.join(sorted(options))}",
                                source="--method")
    from placer._warm import ensure_search_kernels
    from placer.ilp.parallel import run_layer_search

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
                       iterations=iters, seed=int(seed), distinct=problem.distinct_per_gpu)
    start_maps = _starts(problem)
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
    ready = ((search_deadline is None or time.time() < search_deadline)
             and ensure_search_kernels(search_deadline))  # compiles on a cold numba cache
    if ready:
        tasks = _tasks(problem, np.stack([start_maps[n] for n in names]), w, cfg, search_tokens)
        results = run_layer_search(tasks, cfg, search_deadline, num_workers=num_workers,
                                   ray_address=ray_address)
        placement = Placement(np.stack([r.p2l for r in results]), spg, e)
        ev = evaluate_objective(problem, placement, seed=dispatch_seed, weights=w, reference=reference)
    else:  # the deadline passed (e.g. while the kernels compiled): the best start, status "timeout"
        results, placement, ev = [], start_placements["eplb"], start_ev["eplb"]
    best_start = min(start_ev, key=lambda n: start_ev[n]["total"])
    chosen = "search" if ready else "eplb"
    if ev["total"] > start_ev[best_start]["total"]:
        placement, ev, chosen = start_placements[best_start], start_ev[best_start], best_start
    assert ev["total"] <= min(s["total"] for s in start_ev.values())

    lb = float(w["balance"] * balance_lower_bound(problem).sum())
    obj = float(ev["total"])
    gap = max(0.0, (obj - lb) / max(abs(obj), 1e-300)) if obj > 0 else 0.0
    terms = {k: float(ev[k]) for k in _REPORTED}
    terms.update({f"start_{n}": float(start_ev[n]["total"]) for n in start_ev})
    terms["returned_start"] = float(names.index(chosen)) if chosen != "search" else -1.0
    terms["search_primary"] = float(sum(r.primary for r in results))
    terms["iterations"] = float(sum(r.iterations for r in results))
    timed_out = not ready or any(r.timed_out for r in results)
    backend = "numba" if _ls_kernel.HAVE_NUMBA else "python"
    if ray_address:
        backend += "+ray"
    return SolveResult(placement=placement, status="timeout" if timed_out else "feasible", objective=obj,
                       terms=terms, bound=lb, gap=gap, wall_time_s=time.perf_counter() - t0,
                       method="placer", backend=backend)


def _coherent(problem: PlacementProblem, **options) -> SolveResult:
    """Delegate to :func:`placer.ilp.coherent.solve_coherent`; add this module's terms."""
    try:
        from placer.ilp.coherent import solve_coherent
    except ImportError:
        raise InvalidInputError("context-coherent placement needs placer.ilp.coherent, which is not "
                                "available in this installation", source="--execution") from None
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
