"""Conformance rows for vllm-ascend, TensorRT-LLM and DeepSeek's EPLB arrays (the SGLang and vLLM
rows come from ``benchmarks/conformance_stacks.py``).

* vllm-ascend 0.23.0.post1 (run): solve ``eplb`` and ``placer`` with ``--stack vllm-ascend``,
  export, and run the release's ``EplbConfig`` and ``init_eplb_config`` on the printed
  ``--additional-config`` for every (MoE layer, EP rank) (``tests/stacks/vllm_ascend_probe.py``
  in ``.venv-stacks``). Columns: accepted; R derived by the release for every layer; duplicates
  (copies of one expert on one device; "before": the same method without the stack);
  tables (the release's per-rank ``log2phy`` vs placer's ``vllm-ascend`` table); load: median
  over layers of max/mean GPU load when every rank sends ``load[l, e] / G`` where its table
  points, from the release's tables and from placer's prediction, and what ``nearest`` predicted.
* TensorRT-LLM 1.2 (transcribed: its wheel is not on PyPI): the YAML read with PyYAML and
  looked up per MoE decoder layer as ``get_layer_initial_global_assignments(layer_idx)`` does
  (``layer_idx`` counts dense first layers); shifted layers now and with MoE-ordinal keys.
* EPLB arrays (run against the loop-structure port ``tests/ilp/eplb_port.py``, ties lowest
  index first): ``solve --method eplb`` exported; ``phy2log``, ``log2phy``, ``logcnt`` compared.

Run: ``.venv/bin/python benchmarks/conformance_files.py [--stacks-python .venv-stacks/bin/python]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from placer.ilp import PlacementProblem, solve
from placer.io.placements import export_placement
from placer.metrics.dispatch import dispatch_table
from placer.presets import get_model, make_topology
from placer.stats import load_only_stats
from placer.validate import duplicate_copies

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from conformance_stacks import gpu_ratio, qwen_load, synthetic_load, table_load  # noqa: E402

PROBE = ROOT / "tests" / "stacks" / "vllm_ascend_probe.py"
CASES = [  # (preset, gpus, nodes, redundant)
    ("qwen3-30b-a3b", 16, 2, 16),
    ("qwen3-30b-a3b", 8, 1, 8),
    ("deepseek-v2-lite", 16, 2, 16),
    ("deepseek-v2-lite", 8, 1, 8),
    ("deepseek-v3", 16, 2, 32),
]


def load_for(preset: str) -> tuple[np.ndarray, str]:
    return qwen_load() if preset == "qwen3-30b-a3b" else synthetic_load(preset)


def ascend_rows(python: str) -> None:
    print("| stack | model | GPUs / nodes | R | method | accepted | R derived | duplicates (before) | tables | "
          "load: release | placer now | nearest (before) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for preset, gpus, nodes, redundant in CASES:
        model, topology = get_model(preset), make_topology(gpus=gpus, nodes=nodes)
        load, source = load_for(preset)
        stats = load_only_stats(load, model.top_k, model=model)
        for method in ("eplb", "placer"):
            before = solve(PlacementProblem(stats, model, topology, num_redundant=redundant), method, seed=0)
            problem = PlacementProblem(stats, model, topology, num_redundant=redundant, dispatch="vllm-ascend")
            placement = solve(problem, method, seed=0).placement
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "map.json"
                flags = export_placement(placement, "vllm-ascend", path, model=model, topology=topology)
                argv = shlex.split(" ".join(f for f in flags if not f.startswith("#")))
                config = argv[argv.index("--additional-config") + 1]
                proc = subprocess.run([python, str(PROBE), config, "--experts", str(model.num_experts),
                                       "--ep-size", str(gpus)], capture_output=True, text=True, cwd=ROOT)
            out = json.loads(proc.stdout)
            if not out["accepted"]:
                print(f"| vllm-ascend 0.23.0.post1 | {preset} | {gpus} / {nodes} | {redundant} | {method} | no: "
                      f"{out['error']} |")
                continue
            real = np.asarray(out["log2phy"])
            ours = dispatch_table(placement, topology, "vllm-ascend")
            near = dispatch_table(placement, topology, "nearest")
            r_real = gpu_ratio(table_load(load, real, placement.num_slots), gpus)
            r_ours = gpu_ratio(table_load(load, ours, placement.num_slots), gpus)
            r_near = gpu_ratio(table_load(load, near, placement.num_slots), gpus)
            derived = "all " + str(out["n_redundant"][0]) if len(set(out["n_redundant"])) == 1 else "differs"
            label = f"{preset}" + ("" if preset == "qwen3-30b-a3b" else ", synthetic")
            print(f"| vllm-ascend 0.23.0.post1 | {label} | {gpus} / {nodes} | {redundant} | {method} | yes | "
                  f"{derived} | {len(duplicate_copies(placement))} ({len(duplicate_copies(before.placement))}) | "
                  f"{'equal' if np.array_equal(real, ours) else 'DIFFER'} | {r_real:.4f} | {r_ours:.4f} | "
                  f"{r_near:.4f} ({(r_near - r_real) / r_real:+.1%}) |")
        del source


def trtllm_lookup(path: Path, model) -> list[list[int]]:
    """TensorRT-LLM 1.2 (transcribed): each MoE decoder layer asks for its own ``layer_idx``."""
    import yaml

    assignments = yaml.safe_load(path.read_text())["initial_global_assignments"]
    missing = [i for i in model.moe_layer_ids if i not in assignments]
    if missing:
        raise KeyError(f"layer_idx {missing[0]} not found")
    return [assignments[i] for i in model.moe_layer_ids]


def trtllm_rows() -> None:
    print("| stack | model | first dense | GPUs | R | layers looked up | shifted now | shifted with MoE-ordinal keys |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, gpus, nodes, redundant in CASES:
        model, topology = get_model(preset), make_topology(gpus=gpus, nodes=nodes)
        load, _ = load_for(preset)
        placement = solve(PlacementProblem(load_only_stats(load, model.top_k, model=model), model, topology,
                                           num_redundant=redundant), "eplb").placement
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "lb.yaml"
            export_placement(placement, "trtllm", path, model=model, topology=topology)
            rows = trtllm_lookup(path, model)
            shifted = sum(r != p for r, p in zip(rows, placement.physical_to_logical.tolist(), strict=True))
            # the keys placer wrote before (MoE ordinals): layer_idx l reads ordinal l's row
            old = dict(enumerate(placement.physical_to_logical.tolist()))
            before = sum(old.get(i) != p for i, p in zip(model.moe_layer_ids, placement.physical_to_logical.tolist(),
                                                          strict=True))
        dense = model.moe_layer_ids[0]
        print(f"| trtllm 1.2 (transcribed) | {preset} | {dense} | {gpus} | {redundant} | {len(rows)} | {shifted} | "
              f"{before}" + (" (last: KeyError)" if dense else "") + " |")


def eplb_rows() -> None:
    import torch

    spec = importlib.util.spec_from_file_location("eplb_port", ROOT / "tests" / "ilp" / "eplb_port.py")
    port = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(port)
    port.STABLE_SORT = True
    print("| format | model | GPUs / nodes | R | phy2log | log2phy (replica order) | logcnt | log2phy by ascending slot |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, gpus, nodes, redundant in CASES:
        model, topology = get_model(preset), make_topology(gpus=gpus, nodes=nodes)
        load, _ = load_for(preset)
        weight = load.astype(np.float32)
        result = solve(PlacementProblem(load_only_stats(weight, model.top_k, model=model), model, topology,
                                        num_redundant=redundant), "eplb")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "e.npz"
            export_placement(result.placement, "eplb", path, model=model, topology=topology)
            with np.load(path) as z:
                got = [z["phy2log"], z["log2phy"], z["logcnt"]]
        ref = [t.numpy() for t in port.rebalance_experts(torch.from_numpy(weight), model.num_experts + redundant,
                                                          model.num_groups, nodes, gpus)]
        same = ["equal" if np.array_equal(a, b) else "DIFFER" for a, b in zip(got, ref, strict=True)]
        slot = result.placement.log2phy("slot", redundant + 1)
        print(f"| eplb | {preset} | {gpus} / {nodes} | {redundant} | {same[0]} | {same[1]} | {same[2]} | "
              f"{'equal' if np.array_equal(slot, ref[1]) else 'differs'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stacks-python", default=str(ROOT / ".venv-stacks" / "bin" / "python"))
    args = ap.parse_args()
    ascend_rows(args.stacks_python)
    print()
    trtllm_rows()
    print()
    eplb_rows()


if __name__ == "__main__":
    main()
