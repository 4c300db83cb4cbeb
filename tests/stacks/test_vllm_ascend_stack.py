"""vllm-ascend 0.23.0.post1: placer's expert map and flags through the release's own EPLB code.

The sdist cannot be built here (Ascend toolchain), so ``vllm_ascend_probe.py`` loads the
release's ``ascend_config.py`` and ``eplb/core/eplb_utils.py`` by file from the unpacked source
(fetched and sha256-checked by stacks.mk) and runs them on CPU; the only stub is
``Tensor.npu`` (identity). The vLLM half of the printed flags goes through vLLM 0.34.0's own
argument parser and ``ParallelConfig`` (``vllm_probe.py flags``). What is not run: the NPU
kernels and the MoE comm methods (MC2, all-to-all, all-gather) that consume ``log2phy``.
"""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
from stacks_support import run_probe

from placer.ilp import PlacementProblem, solve
from placer.io.placements import export_placement
from placer.metrics.dispatch import dispatch_table
from placer.presets import get_model, make_topology
from placer.stats import load_only_stats
from placer.types import Placement
from placer.validate import duplicate_copies

pytestmark = [pytest.mark.stacks, pytest.mark.timeout(600)]


def _config(flags: list[str]) -> str:
    argv = shlex.split(" ".join(f for f in flags if not f.startswith("#")))
    return argv[argv.index("--additional-config") + 1]


def _load(model, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(0.0, 1.5, (model.num_moe_layers, model.num_experts)) * 1000


@pytest.mark.parametrize("method", ["eplb", "placer"])
def test_vllm_ascend_loads_placers_map_and_routes_as_predicted(tmp_path, method):
    """The issue's shape (DeepSeek-V2-Lite, 16 GPUs, 16 redundant): the release accepts the
    config, derives R = 16 for every layer, and its per-rank log2phy is placer's vllm-ascend
    table entry for entry."""
    model, topology = get_model("deepseek-v2-lite"), make_topology(gpus=16, nodes=2)
    problem = PlacementProblem(load_only_stats(_load(model, 3), 6, model=model), model, topology,
                               num_redundant=16, dispatch="vllm-ascend")
    options = {"iterations": 2000, "num_workers": 1} if method == "placer" else {}
    placement = solve(problem, method, seed=0, **options).placement
    assert duplicate_copies(placement) == []
    path = tmp_path / "map.json"
    flags = export_placement(placement, "vllm-ascend", path, model=model, topology=topology)
    out = run_probe("vllm_ascend_probe.py", _config(flags), "--experts", "64", "--ep-size", "16")
    assert out["accepted"], out["error"]
    assert out["config"]["expert_map_path"] == str(path) and out["config"]["num_redundant_experts"] == 16
    assert out["n_redundant"] == [16] * model.num_moe_layers and out["mtp"]["n_redundant"] == 16
    table = dispatch_table(placement, topology, "vllm-ascend")
    np.testing.assert_array_equal(np.asarray(out["log2phy"]), table)
    # every rank's local map holds its device's experts at their local slots
    experts = placement.gpu_experts()
    for layer in (0, model.num_moe_layers - 1):
        for rank in range(16):
            local = np.asarray(out["expert_map"][layer][rank])
            held = np.flatnonzero(local >= 0)
            assert sorted(held.tolist()) == sorted(experts[layer, rank].tolist())
            assert (experts[layer, rank][local[held]] == held).all()


def test_vllm_parses_the_vllm_half_of_the_flags(tmp_path):
    model, topology = get_model("deepseek-v2-lite"), make_topology(gpus=8, nodes=1)
    problem = PlacementProblem(load_only_stats(_load(model, 1), 6, model=model), model, topology,
                               num_redundant=8, dispatch="vllm-ascend")
    flags = export_placement(solve(problem, "eplb").placement, "vllm-ascend", tmp_path / "m.json", model=model,
                             topology=topology)
    argv = shlex.split(" ".join(f for f in flags if not f.startswith("#")))
    out = run_probe("vllm_probe.py", "flags", "--", *argv)
    assert out["accepted"], out["error"]
    assert out["enable_expert_parallel"] and out["ep_size"] == 8 and out["data_parallel_size"] == 8
    assert out["tensor_parallel_size"] == 1


def test_two_copies_on_device_zero_misroute_in_the_release(tmp_path):
    """Why export refuses duplicates: the release keeps one local slot per expert; a duplicate on
    device 0 makes every rank's log2phy point at slots that hold other experts."""
    model, topology = get_model("deepseek-v2-lite"), make_topology(gpus=8, nodes=1)
    row = list(range(64)) + list(range(8))  # 72 slots, 9 per device
    row[1] = 0  # device 0 holds expert 0 twice; expert 1 moves to the redundant slots' place
    row[64] = 1
    p2l = np.asarray([row] * model.num_moe_layers)
    placement = Placement(p2l, 9, 64)
    assert duplicate_copies(placement)
    path = tmp_path / "dup.json"
    experts = placement.gpu_experts()
    path.write_text(json.dumps({"moe_layer_count": model.num_moe_layers, "layer_list": [
        {"layer_id": layer, "device_count": 8, "device_list": [
            {"device_id": d, "device_expert": experts[layer, d].tolist()} for d in range(8)]}
        for layer in range(model.num_moe_layers)]}))
    config = json.dumps({"eplb_config": {"expert_map_path": str(path), "num_redundant_experts": 8}})
    out = run_probe("vllm_ascend_probe.py", config, "--experts", "64", "--ep-size", "8", "--layers", "1")
    assert out["accepted"], out["error"]
    l2p = np.asarray(out["log2phy"][0])  # [G, E] physical slot per rank and expert
    wrong = int((p2l[0][l2p] != np.arange(64)[None, :]).sum())
    assert wrong > 0, "the release routes every (rank, expert) to a slot holding another expert"
    with pytest.raises(Exception, match="keeps one local slot per expert"):
        export_placement(placement, "vllm-ascend", tmp_path / "refused.json", model=model, topology=topology)


def test_tensor_parallel_changes_the_release_rule(tmp_path):
    """With --tensor-parallel-size T > 1 the release picks (r % T + r // T + expert) % n, not r % n:
    the printed flags keep T = 1, where placer's rule is exact."""
    model, topology = get_model("deepseek-v2-lite"), make_topology(gpus=8, nodes=1)
    problem = PlacementProblem(load_only_stats(_load(model, 2), 6, model=model), model, topology,
                               num_redundant=8, dispatch="vllm-ascend")
    placement = solve(problem, "eplb").placement
    flags = export_placement(placement, "vllm-ascend", tmp_path / "m.json", model=model, topology=topology)
    out = run_probe("vllm_ascend_probe.py", _config(flags), "--experts", "64", "--ep-size", "8", "--tp-size", "8",
                    "--layers", "2")
    table = dispatch_table(placement, topology, "vllm-ascend")[:2]
    log2phy, cnt = placement.log2phy(), placement.logcnt()
    ranks = np.arange(8)[None, :, None]
    expert = np.arange(64)[None, None, :]
    pick = (ranks % 8 + ranks // 8 + expert) % cnt[:2, None, :]
    np.testing.assert_array_equal(np.asarray(out["log2phy"]), log2phy[np.arange(2)[:, None, None], expert, pick])
    assert not np.array_equal(np.asarray(out["log2phy"]), table)
