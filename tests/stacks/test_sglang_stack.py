"""placer's SGLang exports run through SGLang 0.5.23's own start-up and dispatch code.

Each case solves a placement, exports it with placer (``.json`` or ``.pt``), and runs, in the
``.venv-stacks`` environment, SGLang's ``prepare_server_args`` on exactly the flags placer
printed and ``compute_initial_expert_location_metadata`` for every EP rank
(``sglang_probe.py metadata``). SGLang must accept the flags, load the map placer wrote, and
build, rank by rank, the same static dispatch tables placer's ``sglang-static`` rule computes.

Stubs: those listed in ``sglang_probe.py``'s docstring (a ``torchvision`` module stub and the
recorder's device helper; both are imported at module level for GPU work and never called
here). Everything on the placement path is the released code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from stacks_support import STACKS_DIR, run_probe

from placer.ilp import PlacementProblem, solve
from placer.io.placements import export_placement
from placer.io.stack_files import sglang_full_map
from placer.metrics.dispatch import dispatch_table
from placer.presets import get_model, make_topology
from placer.stacks import ARCHITECTURES, SGLANG_PLACEABLE
from placer.stats import compute_stats
from placer.synthetic import synthesize_trace

pytestmark = [pytest.mark.stacks, pytest.mark.timeout(900)]
CONFIGS = STACKS_DIR / "configs"


def _argv(flags: list[str]) -> list[str]:
    """The printed flag lines as argv (comments dropped, placeholders filled as an operator would)."""
    out = []
    for line in flags:
        if line.startswith("#"):
            continue
        out += line.split(" ", 1)
    return [a.replace("NODE_RANK", "0").replace("HEAD_IP:PORT", "127.0.0.1:5757") for a in out]


def _metadata(preset: str, argv: list[str]) -> dict:
    return run_probe("sglang_probe.py", "metadata", "--model-config", CONFIGS / f"{preset}.json", "--", *argv)


@pytest.mark.parametrize("preset, gpus, nodes, redundant, method, suffix", [
    ("qwen3-30b-a3b", 8, 1, 8, "eplb", ".json"),        # all-MoE, one node, replicas
    ("qwen3-30b-a3b", 16, 2, 0, "contiguous", ".pt"),   # all-MoE, two nodes, no replicas
    ("deepseek-v2-lite", 16, 2, 16, "eplb", ".pt"),     # dense first layer, two nodes, replicas
    ("deepseek-v3", 16, 2, 32, "eplb", ".json"),        # 3 dense layers, groups, replicas
])
def test_sglang_accepts_the_export_and_builds_placers_tables(tmp_path, preset, gpus, nodes, redundant,
                                                            method, suffix):
    model = get_model(preset)
    topology = make_topology("h100", gpus=gpus, nodes=nodes)
    stats = compute_stats(synthesize_trace(model, 3000, seed=0))
    placement = solve(PlacementProblem(stats, model, topology, num_redundant=redundant,
                                       dispatch="sglang-static"), method, seed=0).placement
    path = tmp_path / f"placement{suffix}"
    flags = export_placement(placement, "sglang", path, model=model, topology=topology)
    got = _metadata(preset, _argv(flags))
    assert got["accepted"], got
    assert got["ep_size"] == gpus and got["num_layers"] == model.num_hidden_layers
    assert got["ep_dispatch_algorithm"] == "static" and got["moe_a2a_backend"] == "deepep"
    np.testing.assert_array_equal(got["physical_to_logical_map"], sglang_full_map(placement, model))
    theirs = np.asarray(got["rank_dispatch"], dtype=np.int64).transpose(1, 0, 2)  # [H, G, E]
    ours = dispatch_table(placement, topology, "sglang-static", model=model)
    np.testing.assert_array_equal(theirs[np.asarray(model.moe_layer_ids)], ours)


def test_flags_placer_printed_before_are_rejected(tmp_path):
    """The check can fail: placer's old flags (no a2a backend, no --tp-size) are refused."""
    model = get_model("qwen3-30b-a3b")
    topology = make_topology("h100", gpus=8)
    placement = solve(PlacementProblem(compute_stats(synthesize_trace(model, 500, seed=0)), model, topology,
                                       num_redundant=8), "eplb").placement
    path = tmp_path / "p.json"
    export_placement(placement, "sglang", path, model=model, topology=topology)
    old = ["--ep-size", "8", "--ep-num-redundant-experts", "8", "--init-expert-location", str(path),
           "--ep-dispatch-algorithm", "static"]
    got = _metadata("qwen3-30b-a3b", old)
    assert not got["accepted"] and got["stage"] == "prepare_server_args", got


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIGS.glob("*.json")))
def test_placers_list_of_placeable_models_agrees_with_sglang(tmp_path, preset):
    """SGLang builds placement metadata exactly for the architectures placer lets it place."""
    config = json.loads((CONFIGS / f"{preset}.json").read_text())
    arch = config["architectures"][0]
    assert ARCHITECTURES[preset] == arch
    model = get_model(preset)
    p2l = np.tile(np.arange(model.num_experts + 8) % model.num_experts, (model.num_hidden_layers, 1))
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"physical_to_logical_map": p2l.tolist()}))
    got = _metadata(preset, ["--tp-size", "8", "--ep-size", "8", "--moe-a2a-backend", "deepep",
                             "--ep-dispatch-algorithm", "static", "--ep-num-redundant-experts", "8",
                             "--init-expert-location", str(path)])
    assert got["accepted"] == (arch in SGLANG_PLACEABLE), got


DYNAMIC_SCRIPT = '''
import json, sys
import torch
from sglang.srt.eplb.expert_location_dispatch import (
    ExpertLocationDispatchInfo, _topk_ids_logical_to_physical_dynamic)
spec = json.load(open(sys.argv[1]))
out = []
for layer, ids in enumerate(spec["topk_ids"]):
    info = ExpertLocationDispatchInfo(
        ep_dispatch_algorithm="dynamic", partial_logical_to_rank_dispatch_physical_map=None,
        partial_logical_to_all_physical_map=torch.tensor(spec["all_physical"][layer]),
        partial_logical_to_all_physical_map_num_valid=torch.tensor(spec["num_valid"][layer]),
        num_physical_experts=spec["num_physical"], rank_invariant=True)
    out.append(_topk_ids_logical_to_physical_dynamic(torch.tensor(ids), info).tolist())
print(json.dumps({"physical": out}))
'''


def test_sglang_dynamic_rule_is_sglangs_own(tmp_path):
    """``sglang-dynamic`` = SGLang 0.5.23's dynamic dispatch without an a2a backend (row in the batch
    modulo replicas), checked by running its ``_topk_ids_logical_to_physical_dynamic`` on the
    candidate lists its own metadata built from placer's file."""
    from placer.metrics.dispatch import select_slots
    from placer.types import Topology

    model = get_model("qwen3-30b-a3b")
    topology = Topology("t", 1, 4)
    placement = solve(PlacementProblem(compute_stats(synthesize_trace(model, 800, seed=2)), model, topology,
                                       num_redundant=12, dispatch="sglang-dynamic"), "eplb").placement
    path = tmp_path / "p.json"
    export_placement(placement, "sglang", path, model=model, topology=topology)
    got = _metadata("qwen3-30b-a3b", ["--tp-size", "4", "--ep-size", "4", "--ep-dispatch-algorithm", "dynamic",
                                      "--ep-num-redundant-experts", "12", "--init-expert-location", str(path)])
    assert got["accepted"] and got["moe_a2a_backend"] == "none", got
    layers = [0, 1, 47]
    ids = synthesize_trace(model, 64, seed=5).expert_ids.astype(np.int64)  # [T, L, K]: rows of one batch
    spec = {"topk_ids": [ids[:, layer].tolist() for layer in layers], "num_physical": placement.num_slots,
            "all_physical": [got["logical_to_all_physical_map"][0][layer] for layer in layers],
            "num_valid": [got["num_valid"][0][layer] for layer in layers]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    script = tmp_path / "dynamic.py"
    script.write_text(DYNAMIC_SCRIPT)
    theirs = np.asarray(run_probe(script, tmp_path / "spec.json")["physical"])  # [layers, T, K]
    ours = select_slots(placement, topology, ids, rule="sglang-dynamic")[:, layers].transpose(1, 0, 2)
    np.testing.assert_array_equal(theirs, ours)
    assert len(np.unique(ours[:, :, 0])) > len(np.unique(ids[:, layers, 0]))  # replicas in use
