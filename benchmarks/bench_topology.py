"""Benchmark: placements on clusters beyond "nodes of 8", costed by each rank pair's bandwidth.

Per case one table, one row per method, scored on the fitting routing and on held-out routing
(``placer.metrics.evaluate``, ``nearest`` dispatch):

- ``bal fit`` / ``bal held``: max/mean GPU load, median over layers;
- ``link us fit`` / ``link us held``: the bandwidth-weighted traffic, microseconds of link time per
  token-layer (every dispatch send's bytes over its own rank pair's bandwidth,
  ``link_time_per_token_layer_s``);
- ``inter-node``: RDMA sends (remote NVLink domains) per token-layer, held out;
- ``solve s``: wall seconds of the library call.

The last line of a case gives ``placer`` against ``eplb``: link time (held out) and the balance
difference. Methods: ``eplb``; ``placer`` (the joint objective, its default budget); on a file
matrix also ``placer, tiers only``: the same search on the cluster without its matrix (every pair
at its tier's mean bandwidth), scored on the matrix, to show what costing each pair buys.

Cases:

- ``nvl72``: DeepSeek-V3 shape on one GB200 NVL72 (72 GPUs on one NVLink domain, preset
  ``gb200-nvl72``), 32 redundant slots (4 per GPU); synthetic routing (labelled), 16,000 fitting (--tokens)
  and 16,000 held-out tokens (another seed);
- ``2x nvl72``: the same on two NVL72 racks joined by InfiniBand (144 GPUs), 32 redundant;
- ``racks.csv``: a matrix read from a CSV file as ``--topology FILE`` reads it: 32 H100s in 4 nodes
  of 8 in 2 racks (NVLink 370 GB/s, InfiniBand 48.5 inside a rack, 24.25 across the 2:1
  oversubscribed spine), DeepSeek-V3 shape, 32 redundant;
- ``two-level.csv``: Mixtral-8x7B on 4 H100s in 2 nodes, 4 redundant, real routing (the 5 MT-Bench
  categories of ``../shared/data/hdmoe-mixtral-mtbench``: fitted on coding, math, reasoning and
  roleplay, held out on writing; skipped with one line when absent): the cluster given as flags
  and as its own two-level matrix in a file must give the same rows;
- ``slow gpu``: the same Mixtral case with rank 3 at half speed (``--gpu-speed 3=0.5``): balance
  is the busiest GPU's load as time; also ``placer, speeds unknown`` (solved as if the GPUs were
  equal, scored with the speeds).

Run: ``.venv/bin/python benchmarks/bench_topology.py [--cases nvl72 racks.csv ...] [--tokens 4000]``
(about 5 minutes on 2 shared cores at the default 16,000 tokens; deterministic given the seed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from placer.ilp import PlacementProblem, solve
from placer.io.routing import gather_routing
from placer.io.topology import read_topology
from placer.metrics import evaluate
from placer.presets import get_model, make_topology
from placer.stats import compute_stats
from placer.synthetic import synthesize_trace
from placer.types import Topology

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CATEGORIES = ("coding", "math", "reasoning", "roleplay", "writing")
CASES = ("nvl72", "2x nvl72", "racks.csv", "two-level.csv", "slow gpu")


def write_matrix(path: Path, m: np.ndarray) -> str:
    """The matrix as ``--topology FILE`` reads it (CSV rows, GB/s, a zero diagonal)."""
    m = np.where(np.isinf(m), 0.0, m)
    path.write_text("# GB/s between ranks\n" + "\n".join(",".join(f"{v:g}" for v in row) for row in m) + "\n")
    return str(path)


def racks_matrix() -> np.ndarray:
    node, rack = np.arange(32) // 8, np.arange(32) // 16
    m = np.where(rack[:, None] == rack[None, :], 48.5, 24.25)
    return np.where(node[:, None] == node[None, :], 370.0, m)


def synthetic(model_name: str, tokens: int, seed: int) -> tuple:
    model = get_model(model_name)
    return model, synthesize_trace(model, tokens, seed=seed), synthesize_trace(model, tokens, seed=seed + 1000)


def mixtral(data: Path) -> tuple | str:
    folder = data / "hdmoe-mixtral-mtbench"
    files = [folder / f"experts_{c}_mixtral.json" for c in CATEGORIES]
    if not all(f.exists() for f in files):
        return f"two-level.csv: skipped, {folder} or one of its category files is absent"
    model = get_model("mixtral-8x7b")
    fit, held = (gather_routing([str(f) for f in part], model=model, keep_trace=True).trace
                 for part in (files[:4], files[4:]))
    return model, fit, held


def rows_for(label: str, topology: Topology, model, fit, held, redundant: int, seed: int,
             tiers_only: bool = False, speeds_unknown: bool = False) -> list[dict]:
    stats = compute_stats(fit, seed=seed)
    problem = PlacementProblem(stats, model, topology, num_redundant=redundant)
    methods = [("eplb", problem), ("placer", problem)]
    if tiers_only:
        methods.append(("placer, tiers only", replace(problem, topology=replace(topology, bandwidth_gbps=None))))
    if speeds_unknown:
        methods.append(("placer, speeds unknown", replace(problem, topology=replace(topology, gpu_speed=None))))
    rows = []
    for name, prob in methods:
        t0 = time.perf_counter()
        result = solve(prob, name.split(",")[0], seed=seed)
        wall = time.perf_counter() - t0
        a, b = (evaluate(result.placement, topology, model, data) for data in (fit, held))
        rows.append({"case": label, "method": name, "bal fit": a["load_max_over_mean_median"],
                     "bal held": b["load_max_over_mean_median"],
                     "link us fit": a["link_time_per_token_layer_s"] * 1e6,
                     "link us held": b["link_time_per_token_layer_s"] * 1e6,
                     "inter-node": b["inter_node_nodes_per_token_layer"], "solve s": wall})
    return rows


def print_case(title: str, rows: list[dict]) -> None:
    print(f"\n### {title}\n")
    cols = ["method", "bal fit", "bal held", "link us fit", "link us held", "inter-node", "solve s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r[c] if isinstance(r[c], str) else f"{r[c]:.4f}" if c != "solve s" else f"{r[c]:.1f}"
                                for c in cols) + " |")
    by = {r["method"]: r for r in rows}
    e, p = by["eplb"], by["placer"]
    print(f"\nplacer vs eplb: link time held out {p['link us held'] / e['link us held'] - 1:+.1%}, "
          f"fit {p['link us fit'] / e['link us fit'] - 1:+.1%}; balance held out "
          f"{p['bal held'] - e['bal held']:+.4f}, fit {p['bal fit'] - e['bal fit']:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--tokens", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            if case in ("nvl72", "2x nvl72"):
                gpus = 72 if case == "nvl72" else 144
                topo = make_topology("gb200-nvl72", gpus=gpus)
                model, fit, held = synthetic("deepseek-v3", args.tokens, args.seed)
                title = (f"{case}: DeepSeek-V3 shape (synthetic), {gpus} GB200 in {topo.num_nodes} NVLink domain(s) "
                         f"of {topo.gpus_per_node}, 32 redundant")
                print_case(title, rows_for(case, topo, model, fit, held, 32, args.seed, tiers_only=False))
            elif case == "racks.csv":
                path = write_matrix(Path(tmp) / "racks.csv", racks_matrix())
                topo = read_topology(path, cluster="h100")
                model, fit, held = synthetic("deepseek-v3", args.tokens, args.seed)
                title = ("racks.csv: DeepSeek-V3 shape (synthetic), 32 H100 in 4 nodes of 8 in 2 racks "
                         "(NVLink 370, IB 48.5 in a rack, 24.25 across), 32 redundant")
                print_case(title, rows_for(case, topo, model, fit, held, 32, args.seed, tiers_only=True))
            elif case == "slow gpu":
                loaded = mixtral(args.data)
                if isinstance(loaded, str):
                    print(loaded.replace("two-level.csv", case))
                    continue
                model, fit, held = loaded
                topo = replace(make_topology("h100", gpus=4, nodes=2), gpu_speed=(1.0, 1.0, 1.0, 0.5))
                title = ("slow gpu: Mixtral-8x7B (real, held out: writing), 4 H100 in 2 nodes, rank 3 at half speed "
                         "(--gpu-speed 3=0.5), 4 redundant; bal = the busiest GPU's load as time")
                print_case(title, rows_for(case, topo, model, fit, held, 4, args.seed, speeds_unknown=True))
            else:
                loaded = mixtral(args.data)
                if isinstance(loaded, str):
                    print(loaded)
                    continue
                model, fit, held = loaded
                flags = make_topology("h100", gpus=4, nodes=2)
                path = write_matrix(Path(tmp) / "two-level.csv", flags.bandwidth_matrix())
                from_file = read_topology(path, cluster="h100")
                title_flags = "two-level: Mixtral-8x7B (real, held out: writing), 4 H100 in 2 nodes, flags"
                a = rows_for("flags", flags, model, fit, held, 4, args.seed, tiers_only=False)
                b = rows_for("file", from_file, model, fit, held, 4, args.seed, tiers_only=False)
                print_case(title_flags, a)
                print_case("two-level.csv: the same cluster as its matrix in a file", b)
                diff = max(abs(ra[c] - rb[c]) / max(abs(ra[c]), 1e-300) for ra, rb in zip(a, b, strict=True)
                           for c in ra if c not in ("case", "method", "solve s"))
                same = [ra["method"] for ra in a] == [rb["method"] for rb in b]
                print(f"\nthe same rows (every figure but solve s): {same and diff <= 1e-12} (largest relative "
                      f"difference {diff:.1e}: the file's link time sums every pair, the flags' two tiers)")


if __name__ == "__main__":
    main()
