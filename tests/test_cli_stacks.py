"""``--stack``: one switch selects the file format, the stack's exact dispatch rule, its
constraints and its flags, on solve, evaluate, simulate, serve and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import one_line_exit2, run

from placer.io.placements import read_placement_json
from placer.io.routing import gather_routing
from placer.metrics import gpu_load
from placer.metrics.dispatch import dispatch_table
from placer.presets import get_model

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def v2lite(tmp_path_factory):
    """A synthetic DeepSeek-V2-Lite trace (1 dense layer first, 26 MoE layers, top-6 of 64)."""
    from placer.cli import main
    path = tmp_path_factory.mktemp("v2") / "v2.npz"
    assert main(["synth", "--model", "deepseek-v2-lite", "--tokens", "600", "--seed", "1", "-o", str(path)]) == 0
    return path


def test_solve_for_sglang_records_the_stack_and_scores_its_tables(capsys, tmp_path, v2lite):
    p, s = tmp_path / "p.json", tmp_path / "s.json"
    code, out, err = run(capsys, "solve", v2lite, "--stack", "sglang", "--gpus", "8", "--nodes", "2",
                         "--redundant", "8", "--method", "eplb", "-o", p, "--export", f"sglang={s}")
    assert code == 0, err
    assert "for sglang 0.5.23, dispatch sglang-static" in out
    assert "--moe-a2a-backend deepep" in out and "--tp-size 8" in out and "--ep-dispatch-algorithm static" in out
    pf = read_placement_json(p)
    assert pf.stack.label == "sglang 0.5.23" and pf.dispatch == "sglang-static"
    doc = json.loads(p.read_text())
    assert doc["stack"] == {"name": "sglang", "release": "0.5.23"}
    # The reported balance is the one SGLang's own per-rank tables give (dense row included).
    model = get_model("deepseek-v2-lite")
    trace = gather_routing([str(v2lite)], model=model).data
    table = dispatch_table(pf.placement, pf.topology, "sglang-static", model=model)
    load = gpu_load(pf.placement, pf.topology, trace, dispatch="sglang-static", table=table)
    ratio = load.max(axis=1) / load.mean(axis=1)
    assert doc["metrics"]["load_max_over_mean_median"] == pytest.approx(float(np.median(ratio)))
    full = json.loads(s.read_text())["physical_to_logical_map"]
    assert len(full) == 27 and full[1:] == pf.placement.physical_to_logical.tolist()

    # export reads the stack from the file; --stack vllm prints vLLM's own EPLB flags and exits 2
    code, out, err = run(capsys, "export", p, "-o", tmp_path / "again.pt")
    assert code == 0, err
    assert "for sglang 0.5.23" in out and (tmp_path / "again.pt").exists()
    code, out, err = run(capsys, "export", p, "--stack", "vllm", "-o", tmp_path / "v.json")
    assert code == 2 and not (tmp_path / "v.json").exists()
    assert "--enable-eplb" in out and "num_redundant_experts\": 8" in out
    assert err.count("\n") == 1 and "vllm 0.34.0 loads no placement file; it re-balances itself every " \
                                   "step_interval steps" in err
    one_line_exit2(capsys, "export", p, "-o", tmp_path / "plain", needle="reads --init-expert-location as .json or .pt")

    # evaluate re-scores under another stack's rule on request
    code, out, err = run(capsys, "evaluate", p, v2lite, "--stack", "vllm", "--json")
    assert code == 0, err
    vllm = json.loads(out)
    assert vllm["stack"] == "vllm 0.34.0" and vllm["dispatch"] == "vllm"
    code, out, _ = run(capsys, "evaluate", p, v2lite, "--json")
    assert json.loads(out)["dispatch"] == "sglang-static"


def test_export_of_a_nearest_placement_says_how_to_rescore(capsys, tmp_path, v2lite):
    p = tmp_path / "p.json"
    code, _, err = run(capsys, "solve", v2lite, "--gpus", "8", "--redundant", "8", "--method", "eplb", "-o", p)
    assert code == 0, err
    one_line_exit2(capsys, "export", p, "-o", tmp_path / "s.json", needle="give --stack or --format")
    code, out, err = run(capsys, "export", p, "--stack", "sglang", "-o", tmp_path / "s.json")
    assert code == 0, err
    assert "solved and scored under dispatch nearest; sglang 0.5.23 runs sglang-static" in out
    assert "--stack sglang" in out
    code, out, err = run(capsys, "export", p, "--stack", "sglang", "-o", tmp_path / "s2.json", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == "sglang" and doc["output"] == str(tmp_path / "s2.json") and doc["stack"] == "sglang 0.5.23"
    assert "--ep-dispatch-algorithm static" in doc["flags"] and "runs sglang-static" in doc["notes"][0]


def test_stack_refuses_what_it_cannot_place(capsys, tmp_path):
    line = one_line_exit2(capsys, "solve", "--model", "mixtral-8x7b", "--gpus", "4", "--stack", "sglang",
                          "--method", "contiguous", "-o", tmp_path / "p.json",
                          needle="sglang 0.5.23 cannot place mixtral-8x7b")
    assert "MixtralForCausalLM" in line and "--dispatch sglang-static" in line and "qwen3-30b-a3b" in line
    one_line_exit2(capsys, "simulate", "run", "--model", "mixtral-8x7b", "--gpus", "4", "--method", "contiguous",
                   "--stack", "sglang", needle="cannot place mixtral-8x7b")


def test_simulate_runs_under_the_stack_rule(capsys, tmp_path, v2lite):
    out_dir = tmp_path / "sim"
    code, out, err = run(capsys, "simulate", "run", v2lite, "--gpus", "8", "--method", "eplb", "--redundant", "8",
                         "--stack", "sglang", "--workload", "replay", "--tokens-per-rank", "8", "--iterations", "3",
                         "-o", out_dir)
    assert code == 0, err
    assert "dispatch sglang-static (sglang 0.5.23)" in out
    from placer.simulator.results import read_results
    assert read_results(out_dir).inputs["config"]["dispatch"] == "sglang-static"


def test_serve_renders_only_what_the_stack_loads():
    from placer.app.serve.service import _render
    from placer.stacks import STACKS
    from placer.types import Placement, Topology
    topology = Topology("t", 1, 4)
    v2 = get_model("deepseek-v2-lite")
    placement = Placement(np.tile(np.arange(64), (v2.num_moe_layers, 1)), 16, 64)
    docs = _render(placement, v2, topology, "sglang-static", "eplb", {}, STACKS["sglang"])
    assert set(docs) == {"placer", "sglang"}
    assert json.loads(docs["placer"])["stack"] == {"name": "sglang", "release": "0.5.23"}
    assert len(json.loads(docs["sglang"])["physical_to_logical_map"]) == 27
    mixtral = get_model("mixtral-8x7b")
    docs = _render(Placement(np.tile(np.arange(8), (32, 1)), 2, 8), mixtral, topology, "nearest", "eplb", {})
    assert set(docs) == {"placer"}  # SGLang 0.5.23 cannot place Mixtral; vLLM loads no file


def test_solve_export_for_vllm_prints_its_flags_and_exits_2(capsys, tmp_path, v2lite):
    code, out, err = run(capsys, "solve", v2lite, "--gpus", "8", "--redundant", "8", "--method", "eplb",
                         "-o", tmp_path / "p.json", "--export", f"vllm={tmp_path / 'v.json'}")
    assert code == 2 and "--eplb-config '{\"num_redundant_experts\": 8}'" in out
    assert "vllm 0.34.0 loads no placement file" in err and not (tmp_path / "v.json").exists()
