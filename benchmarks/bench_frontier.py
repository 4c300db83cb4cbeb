"""Exact frontier and joint-objective bounds, measured.

1. Mixtral-8x7B on 4 GPUs in 2 nodes with 4 redundant slots (real HD-MoE traces from
   ../shared/data, fit on coding + math + reasoning + roleplay as in the README tour, and every
   leave-one-category-out split): the exact frontier of inter-node dispatches against max/mean
   GPU load (:mod:`placer.ilp.frontier`), its wall time, and how far ``placer`` and ``eplb`` land
   from it at their own loads. Also the joint objective: ``placer``'s value, the new lower bound
   (:mod:`placer.ilp.bounds`), the balance-only bound it replaces, and the exact optimum over
   placements whose GPUs hold distinct experts, enclosed by an enumeration of every such
   placement (:func:`joint_optimum_2x2`).
2. DeepSeek-V3 shape (synthetic, 20,000 tokens, 64 GPUs in 8 nodes, 64 redundant slots): the
   ``placer`` result's gap against the new bound and against the balance-only bound.

Every number is recomputed by :func:`placer.metrics.evaluate` /
:func:`placer.ilp.objective.evaluate_objective` on the problem's statistics. Run:

    .venv/bin/python benchmarks/bench_frontier.py [--skip-dsv3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import combinations
from pathlib import Path

import numpy as np

from placer.ilp import PlacementProblem, solve
from placer.ilp.bounds import balance_lower_bound, joint_lower_bound
from placer.ilp.frontier import _split_rows, exact_frontier, frontier_rows
from placer.ilp.objective import evaluate_objective, objective_weights, reference_ratio
from placer.io.routing import gather_routing
from placer.metrics import evaluate
from placer.presets import get_model, make_topology
from placer.stats import compute_stats
from placer.synthetic import synthesize_trace
from placer.types import Placement

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hdmoe-mixtral-mtbench"
CATEGORIES = ("coding", "math", "reasoning", "roleplay", "writing")


def mixtral_problem(held: str) -> PlacementProblem:
    """The CLI's problem for ``placer solve <4 categories> --gpus 4 --nodes 2 --redundant 4``."""
    inputs = [str(DATA / f"experts_{c}_mixtral.json") for c in CATEGORIES if c != held]
    routing = gather_routing(inputs, model=get_model("mixtral-8x7b"))
    return PlacementProblem(routing.stats, routing.model, make_topology("h100", gpus=4, nodes=2), num_redundant=4)


def distance(frontier, problem, placement: Placement) -> dict:
    """Where ``placement`` sits against the frontier: its loads and dispatches on the statistics, the
    frontier's dispatches at its worst-layer load and at its own load in every layer."""
    m = evaluate(placement, problem.topology, problem.model, problem.stats)
    ratio = np.asarray(m["per_layer"]["load_max_over_mean"])
    sends = m["inter_node_nodes_per_token_layer"]
    at_worst = float(frontier.inter_node[frontier.point(float(ratio.max()))])
    per_layer = np.mean([lf.dispatches[np.searchsorted(lf.ratio, r * (1 + 1e-12), side="right") - 1]
                         for lf, r in zip(frontier.layers, ratio, strict=True)]) / frontier.num_tokens
    return {"load_worst": float(ratio.max()), "load_median": float(np.median(ratio)), "inter_node": sends,
            "frontier_at_worst": at_worst, "above_at_worst": sends / at_worst - 1,
            "frontier_per_layer": float(per_layer), "above_per_layer": sends / float(per_layer) - 1}


# --------------------------------------------------------------------------------------------
# The exact joint optimum on 2 nodes x 2 GPUs (distinct experts per GPU), by enumeration
# --------------------------------------------------------------------------------------------


def _zeta(counts: np.ndarray, num_experts: int) -> np.ndarray:
    out = counts.astype(np.int64).copy()
    for bit in range(num_experts):
        view = out.reshape(-1, 2, 1 << bit)
        view[:, 1, :] += view[:, 0, :]
    return out


def _node_entries(load, zeta_own, zeta_other, num_experts, spg):
    """Per node code and oriented split: (busiest GPU load, NVLink sends it causes), inf-padded.

    Returns ``maxload`` and ``sends`` float64 [3**E, rows], ``lanes`` int [3**E, rows, 2] (the
    bit masks of each lane's experts). ``sends``: intra-node sends of the node's own tokens plus
    the forwarded sends of the other node's tokens to this node's non-landing GPU (a copy held
    by both GPUs is taken as the landing one: the rule's random spread can only add sends).
    """
    full = (1 << num_experts) - 1
    width = 2 * max(len(_split_rows(a, 2, spg)) for a in range(spg, min(2 * spg, num_experts) + 1))
    maxload = np.full((3 ** num_experts, width), np.inf)
    sends = np.full((3 ** num_experts, width), np.inf)
    lanes = np.zeros((3 ** num_experts, width, 2), dtype=np.int64)
    powers = 3 ** np.arange(num_experts)
    for size in range(spg, min(2 * spg, num_experts) + 1):
        rows = _split_rows(size, 2, spg).astype(np.int64)
        rows = np.concatenate([rows, -rows]) if np.any(rows) else rows            # both orientations
        shared = (np.arange(2 ** size)[:, None] >> np.arange(size)[None, :]) & 1  # [2^a, a]
        for support in combinations(range(num_experts), size):
            bits = 1 << np.asarray(support)
            codes = ((1 + shared) * powers[list(support)]).sum(axis=1)
            traffic = load[list(support)][None, :] / (1.0 + shared)                # [2^a, a]
            lane0 = traffic @ np.where(rows > 0, 1.0, np.where(rows == 0, 0.5, 0.0)).T
            lane1 = traffic @ np.where(rows < 0, 1.0, np.where(rows == 0, 0.5, 0.0)).T
            only = [(rows == 1) @ bits, (rows == -1) @ bits]                         # singles per lane [m]
            both = (rows == 0) @ bits
            intra = sum(zeta_own[lane][-1] - zeta_own[lane][full & ~only[1 - lane]] for lane in (0, 1))
            xbits = shared @ bits                                                    # [2^a] shared with the other node
            fwd = 0
            for lane in (0, 1):  # the other node's tokens on lane `lane` land on this node's GPU `lane`
                y = only[1 - lane][None, :] & ~xbits[:, None]                       # exclusive singles off-lane
                fwd = fwd + zeta_other[lane][-1] - zeta_other[lane][full & ~y]
            m = len(rows)
            maxload[codes, :m] = np.maximum(lane0, lane1)
            sends[codes, :m] = intra[None, :] + fwd
            lanes[codes, :m, 0] = (only[0] | both)[None, :]
            lanes[codes, :m, 1] = (only[1] | both)[None, :]
    return maxload, sends, lanes


def joint_optimum_2x2(problem: PlacementProblem) -> dict:
    """The joint objective's optimum over placements with distinct experts per GPU, enclosed.

    ``lower``: the minimum over every such placement of the objective with each copy held by
    both GPUs of a remote node counted as landing (a lower bound on the optimum: the rule's spread
    can only add forwarded sends); ``upper``: :func:`evaluate_objective` of that minimiser
    (the objective as defined, seeded spread). Standard execution, dispatch nearest, 2 nodes x 2 GPUs.
    """
    stats, topo, e = problem.stats, problem.topology, problem.model.num_experts
    assert topo.num_nodes == 2 and topo.gpus_per_node == 2 and problem.dispatch == "nearest"
    w = objective_weights(problem)
    ref = reference_ratio(problem)
    spg, tokens, sample = problem.slots_per_gpu, stats.num_tokens, stats.sample_size
    pen = w["cap_penalty"] * w["balance_base"] if w["balance_cap"] is not None else 0.0
    cap = w["balance_cap"] if w["balance_cap"] is not None else 0.0
    ids = np.asarray(stats.sample_ids, dtype=np.int64)
    raw = np.asarray(stats.sample_home_rank, dtype=np.int64)
    home = np.where(raw >= 0, raw, np.asarray(stats.sample_token_index, dtype=np.int64) % topo.num_gpus)
    digit = ((np.arange(3 ** e)[:, None] // 3 ** np.arange(e)) % 3)
    powers, bits = 3 ** np.arange(e), 1 << np.arange(e)
    code = [(np.where(digit == n, 1, np.where(digit == 2, 2, 0)) * powers).sum(axis=1) for n in (0, 1)]
    support = [((digit == n) | (digit == 2)) @ bits for n in (0, 1)]
    lower, rows = 0.0, []
    for layer in range(stats.num_layers):
        load = stats.load[layer].astype(np.float64)
        masks = np.bitwise_or.reduce(1 << ids[:, layer], axis=1)
        zeta = [_zeta(np.bincount(masks[home == h], minlength=1 << e), e) for h in range(4)]
        entries = [_node_entries(load, zeta[2 * n:2 * n + 2], zeta[2 - 2 * n:4 - 2 * n], e, spg) for n in (0, 1)]
        m0, s0, l0 = (a[code[0]] for a in entries[0])
        m1, s1, l1 = (a[code[1]] for a in entries[1])
        rdma = sum(zeta[2 * n][-1] + zeta[2 * n + 1][-1] - zeta[2 * n][support[n]] - zeta[2 * n + 1][support[n]]
                   for n in (0, 1))
        mx = np.maximum(m0[:, :, None], m1[:, None, :]) / tokens                   # [S, R, R]
        emean = load.sum() / topo.num_gpus / tokens
        value = (w["balance"] * mx + pen * np.maximum(0.0, mx - (ref[layer] + cap) * emean)
                 + w["traffic_nvlink"] * (s0[:, :, None] + s1[:, None, :]) / sample
                 + w["traffic_rdma"] * rdma[:, None, None] / sample)
        flat = int(np.argmin(np.where(np.isfinite(value), value, np.inf)))
        state, r0, r1 = np.unravel_index(flat, value.shape)
        lower += float(value[state, r0, r1])
        gpus = [l0[state, r0, 0], l0[state, r0, 1], l1[state, r1, 0], l1[state, r1, 1]]
        rows.append([x for g in gpus for x in range(e) if int(g) >> x & 1])
    placement = Placement(np.asarray(rows, dtype=np.int32), spg, e)
    upper = evaluate_objective(problem, placement, weights=w, reference=ref)["total"]
    return {"lower": lower, "upper": float(upper), "placement": placement}


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def mixtral(held: str, *, full: bool) -> dict:
    problem = mixtral_problem(held)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        frontier = exact_frontier(problem)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    exact = solve(problem, "exact")
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    placer = solve(problem, "placer", seed=0)
    placer_s = time.perf_counter() - t0
    eplb = solve(problem, "eplb")
    out = {"held_out": held, "sample_tokens": frontier.num_tokens, "frontier_points": len(frontier.load_cap),
           "frontier_s_min_of_3": min(times), "exact_solve_s": exact_s, "exact_objective": exact.objective,
           "placer_s": placer_s, "placer": distance(frontier, problem, placer.placement),
           "eplb": distance(frontier, problem, eplb.placement)}
    if full:
        out["frontier"] = frontier_rows(frontier)
        w = objective_weights(problem)
        t0 = time.perf_counter()
        bound = joint_lower_bound(problem, w)
        bound_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        opt = joint_optimum_2x2(problem)
        opt_s = time.perf_counter() - t0
        ev_placer = evaluate_objective(problem, placer.placement, weights=w)
        out["joint"] = {"placer_objective": placer.objective, "placer_total_recomputed": ev_placer["total"],
                        "bound": bound.total, "bound_s": bound_s, "bound_balance": float(bound.balance.sum()),
                        "bound_traffic": float(bound.traffic.sum()),
                        "bound_other_ranks": float(bound.other_ranks.mean()),
                        "bound_inter_node": float(bound.remote_nodes.mean()),
                        "balance_only_bound": float(w["balance"] * balance_lower_bound(problem).sum()),
                        "optimum_lower": opt["lower"], "optimum_upper": opt["upper"], "optimum_s": opt_s,
                        "placer_gap": placer.gap, "units": w["units"],
                        "placer_other_ranks": ev_placer["nvlink_sends_per_token_layer"],
                        "placer_inter_node": ev_placer["rdma_sends_per_token_layer"]}
    return out


def dsv3(tokens: int = 20000, time_limit_s: float = 120.0) -> dict:
    model = get_model("deepseek-v3")
    stats = compute_stats(synthesize_trace(model, tokens, seed=0), sample_size=min(tokens, 16384), seed=0)
    problem = PlacementProblem(stats, model, make_topology("h100", gpus=64, nodes=8), num_redundant=64)
    w = objective_weights(problem)
    t0 = time.perf_counter()
    bound = joint_lower_bound(problem, w)
    bound_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = solve(problem, "placer", seed=0, time_limit_s=time_limit_s)
    placer_s = time.perf_counter() - t0
    balance_only = float(w["balance"] * balance_lower_bound(problem).sum())
    return {"tokens": tokens, "placer_s": placer_s, "placer_status": res.status, "objective": res.objective,
            "bound": bound.total, "bound_s": bound_s, "gap": res.gap, "balance_only_bound": balance_only,
            "balance_only_gap": 1 - balance_only / res.objective, "bound_balance": float(bound.balance.sum()),
            "bound_traffic": float(bound.traffic.sum()), "placer_balance": res.terms["balance"],
            "placer_traffic": res.terms["traffic"], "bound_other_ranks": float(bound.other_ranks.mean()),
            "bound_inter_node": float(bound.remote_nodes.mean()),
            "placer_nvlink_sends": res.terms["nvlink_sends_per_token_layer"],
            "placer_inter_node": res.terms["rdma_sends_per_token_layer"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-dsv3", action="store_true")
    parser.add_argument("--json", default=None, help="Write every figure to this JSON file.")
    args = parser.parse_args()
    results: dict = {"mixtral": [mixtral(held, full=held == "writing") for held in CATEGORIES]}
    for r in results["mixtral"]:
        p, q = r["placer"], r["eplb"]
        print(f"held out {r['held_out']:9s}: frontier {r['frontier_points']} points in {r['frontier_s_min_of_3']:.3f} s; "
              f"placer {p['inter_node']:.4f} at worst {p['load_worst']:.4f}: {p['above_at_worst']:+.2%} vs the "
              f"frontier there, {p['above_per_layer']:+.2%} at its own per-layer loads; eplb "
              f"{q['above_per_layer']:+.2%}")
    joint = results["mixtral"][-1]["joint"]
    print("mixtral joint objective:", json.dumps(joint, indent=1))
    if not args.skip_dsv3:
        results["dsv3"] = dsv3()
        print("deepseek-v3:", json.dumps(results["dsv3"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
