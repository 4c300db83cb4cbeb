"""Conformance matrix: placer's SGLang exports fed to SGLang 0.5.23's own start-up code, and the
GPU load placer predicts against the load SGLang's own dispatch tables give.

For each stack x model shape x redundancy: solve ``eplb`` and ``placer`` under ``sglang-static``,
export the SGLang file, run SGLang's ``prepare_server_args`` on exactly the printed flags and
``compute_initial_expert_location_metadata`` for every EP rank (``tests/stacks/sglang_probe.py``
in the ``.venv-stacks`` environment that ``make test`` builds), then compare:

* accepted: SGLang's start-up code raised nothing;
* tables: placer's ``sglang-static`` tables equal SGLang's per-rank
  ``logical_to_rank_dispatch_physical_map`` entry for entry;
* load: median over MoE layers of max/mean GPU load when every rank sends ``load[l, e] / G``
  token-slots of expert ``e`` where its table points, from SGLang's tables ("real"), from
  placer's ``sglang-static`` (now) and from ``nearest`` (what placer predicted before).

Load: Qwen3-30B-A3B from ``shared/data/qwen3-30b-a3b-load`` (real per-layer top-8 fractions,
all datasets averaged), DeepSeek-V2-Lite and DeepSeek-V3 from synthetic traces (labelled).

Run: ``.venv/bin/python benchmarks/conformance_stacks.py [--stacks-python .venv-stacks/bin/python]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from placer.ilp import PlacementProblem, solve
from placer.io.placements import export_placement
from placer.io.stack_files import sglang_full_map
from placer.metrics.dispatch import dispatch_table, slot_load
from placer.presets import get_model, make_topology
from placer.stats import load_only_stats

ROOT = Path(__file__).resolve().parents[1]
SHARED = next((d for d in (ROOT.parent / "shared", ROOT / "shared") if d.is_dir()), ROOT.parent / "shared")
PROBE = ROOT / "tests" / "stacks" / "sglang_probe.py"
CONFIGS = ROOT / "tests" / "stacks" / "configs"
CASES = [  # (preset, config file, gpus, nodes, redundant)
    ("qwen3-30b-a3b", "qwen3-30b-a3b.json", 16, 2, 0),
    ("qwen3-30b-a3b", "qwen3-30b-a3b.json", 16, 2, 16),
    ("qwen3-30b-a3b", "qwen3-30b-a3b.json", 8, 1, 8),
    ("deepseek-v2-lite", "deepseek-v2-lite.json", 16, 2, 0),
    ("deepseek-v2-lite", "deepseek-v2-lite.json", 16, 2, 16),
    ("deepseek-v2-lite", "deepseek-v2-lite.json", 8, 1, 8),
    ("deepseek-v3", "deepseek-v3.json", 16, 2, 0),
    ("deepseek-v3", "deepseek-v3.json", 16, 2, 32),
]


def qwen_load() -> tuple[np.ndarray, str]:
    import pandas as pd

    files = sorted((SHARED / "data" / "qwen3-30b-a3b-load").glob("*.csv"))
    if not files:
        return synthetic_load("qwen3-30b-a3b")
    parts = []
    for f in files:
        df = pd.read_csv(f)
        cols = [c for c in df.columns if c.startswith("Expert_")]
        parts.append(df.groupby("Layer")[cols].mean().sort_index().to_numpy(np.float64))
    return np.mean(parts, axis=0), "real (qwen3-30b-a3b-load, all datasets)"


def synthetic_load(preset: str) -> tuple[np.ndarray, str]:
    from placer.synthetic import synthesize_trace

    model = get_model(preset)
    trace = synthesize_trace(model, 20000, seed=0)
    ids = trace.expert_ids.astype(np.int64)
    off = (np.arange(model.num_moe_layers) * model.num_experts)[None, :, None]
    load = np.bincount((ids + off).ravel(), minlength=model.num_moe_layers * model.num_experts)
    return load.reshape(model.num_moe_layers, model.num_experts).astype(np.float64), "synthetic"


def gpu_ratio(per_slot: np.ndarray, num_gpus: int) -> float:
    """Median over layers of max/mean GPU load. ``per_slot``: [L, P]."""
    per_gpu = per_slot.reshape(per_slot.shape[0], num_gpus, -1).sum(axis=2)
    return float(np.median(per_gpu.max(axis=1) / per_gpu.mean(axis=1)))


def table_load(load: np.ndarray, table: np.ndarray, num_slots: int) -> np.ndarray:
    """Per-slot load [L, P] when every rank sends load / G of each expert where ``table`` [L, G, E] points."""
    num_layers, num_gpus, _ = table.shape
    out = np.zeros((num_layers, num_slots))
    rows = np.repeat(np.arange(num_layers), num_gpus * table.shape[2])
    np.add.at(out, (rows, table.ravel()), np.broadcast_to(load[:, None, :] / num_gpus, table.shape).ravel())
    return out


def probe(python: str, config: Path, flags: list[str]) -> dict:
    argv = [f for line in flags if not line.startswith("#") for f in line.split(" ", 1)]
    argv = [a.replace("NODE_RANK", "0").replace("HEAD_IP:PORT", "127.0.0.1:5757") for a in argv]
    done = subprocess.run([python, str(PROBE), "metadata", "--model-config", str(config), "--", *argv],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stacks-python", default=str(ROOT / ".venv-stacks" / "bin" / "python"))
    parser.add_argument("--suffix", default=".json", choices=[".json", ".pt"])
    args = parser.parse_args()
    if not Path(args.stacks_python).exists():
        sys.exit(f"{args.stacks_python} not found: run 'make test' (it builds .venv-stacks) first")
    print("stack         model             GPUs nodes   R method  accepted  tables  load: SGLang real  "
          "placer sglang-static  placer nearest (before)  load source")
    for preset, config, gpus, nodes, redundant in CASES:
        model = get_model(preset)
        load, source = qwen_load() if preset == "qwen3-30b-a3b" else synthetic_load(preset)
        topology = make_topology("h100", gpus=gpus, nodes=nodes)
        stats = load_only_stats(load, model.top_k, model=model)
        problem = PlacementProblem(stats, model, topology, num_redundant=redundant, dispatch="sglang-static")
        for method in ("eplb", "placer"):
            placement = solve(problem, method, seed=0).placement
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"placement{args.suffix}"
                flags = export_placement(placement, "sglang", path, model=model, topology=topology)
                got = probe(args.stacks_python, CONFIGS / config, flags)
            accepted = bool(got.get("accepted"))
            ours = dispatch_table(placement, topology, "sglang-static", model=model)
            real = ours_static = ours_nearest = float("nan")
            same = "-"
            if accepted and got.get("rank_dispatch") is not None:
                theirs = np.asarray(got["rank_dispatch"], dtype=np.int64).transpose(1, 0, 2)  # [H, G, E]
                theirs = theirs[np.asarray(model.moe_layer_ids)]
                same = "equal" if np.array_equal(theirs, ours) else f"{int((theirs != ours).sum())} differ"
                real = gpu_ratio(table_load(load, theirs, placement.num_slots), gpus)
                assert np.array_equal(np.asarray(got["physical_to_logical_map"]), sglang_full_map(placement, model))
            ours_static = gpu_ratio(slot_load(load, placement, topology, "sglang-static", model=model), gpus)
            ours_nearest = gpu_ratio(slot_load(load, placement, topology, "nearest"), gpus)
            error = "" if accepted else f"  rejected at {got.get('stage')}: {got.get('error')}"
            print(f"sglang 0.5.23 {preset:<17} {gpus:>4} {nodes:>5} {redundant:>3} {method:<7} {str(accepted):>8} "
                  f"{same:>7}  {real:>17.4f}  {ours_static:>20.4f}  {ours_nearest:>23.4f}  {source}{error}")


if __name__ == "__main__":
    main()
