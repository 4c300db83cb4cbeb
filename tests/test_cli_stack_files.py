"""vllm-ascend and TRT-LLM through ``--stack``, and every stack's placement file as an input.

vllm-ascend 0.23.0.post1 and TensorRT-LLM 1.2 cannot be installed here (the first is a source
package that needs Ascend's toolchain, the second a placeholder for NVIDIA's index): the
behaviour these tests encode is transcribed from vllm-ascend's released source
(``vllm_ascend/eplb/core/eplb_utils.py``: ``expert_file_to_tensor``, ``generate_log2phy_map``;
``ascend_config.py``) and from TensorRT-LLM 1.2 as ../shared/reference/serving-formats.md
states it (errata first). Transcribed, not run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import one_line_exit2, run

from placer.io.placements import import_placement, read_placement_file, read_placement_json
from placer.presets import get_model, make_topology
from placer.validate import duplicate_copies

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def v2lite(tmp_path_factory):
    """A synthetic DeepSeek-V2-Lite trace (1 dense layer first, 26 MoE layers, top-6 of 64)."""
    from placer.cli import main
    path = tmp_path_factory.mktemp("v2") / "v2.npz"
    assert main(["synth", "--model", "deepseek-v2-lite", "--tokens", "800", "--seed", "2", "-o", str(path)]) == 0
    return path


@pytest.mark.parametrize("method", ["eplb", "placer"])
def test_solve_for_vllm_ascend_never_stacks_copies(capsys, tmp_path, v2lite, method):
    """The issue's shape: DeepSeek-V2-Lite, 16 GPUs, 16 redundant (7 and 17 duplicates before)."""
    p, a = tmp_path / "p.json", tmp_path / "a.json"
    args = ["solve", v2lite, "--gpus", "16", "--nodes", "2", "--redundant", "16", "--method", method, "-o", p]
    if method == "placer":
        args += ["--seed", "0"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert duplicate_copies(read_placement_json(p).placement), "without the stack the solver stacks copies"
    code, out, err = run(capsys, *args, "--stack", "vllm-ascend", "--export", f"vllm-ascend={a}")
    assert code == 0, err
    pf = read_placement_json(p)
    assert duplicate_copies(pf.placement) == []
    assert pf.stack.label == "vllm-ascend 0.23.0.post1" and pf.dispatch == "vllm-ascend"
    assert "--enable-expert-parallel" in out and "--data-parallel-size 16" in out
    assert '"num_redundant_experts": 16' in out and "--tensor-parallel-size 1" in out
    doc = json.loads(a.read_text())
    assert doc["moe_layer_count"] == 26 and len(doc["layer_list"][0]["device_list"]) == 16
    # every device lists 5 distinct experts (80 slots over 16 devices)
    assert all(len(set(d["device_expert"])) == 5 for layer in doc["layer_list"] for d in layer["device_list"])


def test_export_refuses_duplicates_for_vllm_ascend(capsys, tmp_path, v2lite):
    p = tmp_path / "p.json"
    code, _, err = run(capsys, "solve", v2lite, "--gpus", "16", "--nodes", "2", "--redundant", "16",
                       "--method", "eplb", "-o", p)
    assert code == 0, err
    one_line_exit2(capsys, "export", p, "--stack", "vllm-ascend", "-o", tmp_path / "a.json",
                   needle="keeps one local slot per expert")
    assert not (tmp_path / "a.json").exists()


def test_vllm_ascend_rule_is_rank_mod_copies():
    from placer.metrics.dispatch import dispatch_table
    from placer.types import Placement

    # expert 0 on GPUs 0, 1 and 3 (slots 0, 2, 7); ranks 0..3 take copies r % 3: slots 0, 2, 7, 0
    placement = Placement([[0, 1, 0, 2, 3, 4, 5, 0]], 2, 6)
    table = dispatch_table(placement, make_topology(gpus=4, nodes=1), "vllm-ascend")
    assert table[0, :, 0].tolist() == [0, 2, 7, 0]
    assert table[0, :, 1].tolist() == [1, 1, 1, 1]


def test_trtllm_keys_decoder_layers_and_states_its_requirements(capsys, tmp_path, v2lite):
    yaml = pytest.importorskip("yaml")
    p, y = tmp_path / "p.json", tmp_path / "lb.yaml"
    one_line_exit2(capsys, "solve", v2lite, "--gpus", "8", "--redundant", "8", "--stack", "trtllm", "-o", p,
                   needle="does not reproduce trtllm 1.2's replica choice")
    code, out, err = run(capsys, "solve", v2lite, "--gpus", "8", "--redundant", "8", "--stack", "trtllm",
                         "--dispatch", "nearest", "--method", "eplb", "-o", p, "--export", f"trtllm={y}")
    assert code == 0, err
    doc = yaml.safe_load(y.read_text())  # PyYAML: what TensorRT-LLM parses the options with
    model = get_model("deepseek-v2-lite")
    assert sorted(doc["initial_global_assignments"]) == list(model.moe_layer_ids) == list(range(1, 27))
    pf = read_placement_json(p)
    assert doc["initial_global_assignments"][1] == pf.placement.physical_to_logical[0].tolist()
    assert doc["num_slots"] == 72 and doc["layer_updates_per_iter"] == 0
    assert "--ep_size 8" in out and "enable_attention_dp: true" in out and f"load_balancer: {y}" in out
    assert "only with attention data parallelism and EP > 1" in out


@pytest.mark.parametrize("fmt, name", [("sglang", "s.json"), ("vllm-ascend", "a.json"), ("trtllm", "t.yaml"),
                                       ("eplb", "e.npz")])
def test_every_stack_file_is_an_input(capsys, tmp_path, v2lite, fmt, name):
    """evaluate, simulate run --placement, serve --initial (one shot) and export read every format."""
    p, f = tmp_path / "p.json", tmp_path / name
    code, _, err = run(capsys, "solve", v2lite, "--gpus", "8", "--nodes", "2", "--redundant", "8",
                       "--stack", "vllm-ascend", "--method", "eplb", "-o", p, "--export", f"{fmt}={f}")
    assert code == 0, err
    want = read_placement_json(p).placement.physical_to_logical
    model, topology = get_model("deepseek-v2-lite"), make_topology(gpus=8, nodes=2)
    np.testing.assert_array_equal(import_placement(f, fmt, model=model, topology=topology).physical_to_logical,
                                  want)
    shape = ["--model", "deepseek-v2-lite", "--gpus", "8", "--nodes", "2"]
    code, out, err = run(capsys, "evaluate", f, v2lite, *shape, "--dispatch", "vllm-ascend", "--json")
    assert code == 0, err
    ours = json.loads(out)
    code, out, err = run(capsys, "evaluate", p, v2lite, "--json")
    assert code == 0, err
    assert ours["load_max_over_mean_median"] == pytest.approx(json.loads(out)["load_max_over_mean_median"])
    code, out, err = run(capsys, "simulate", "run", v2lite, "--placement", f, *shape, "--dispatch", "vllm-ascend",
                         "--iterations", "2", "--workload", "replay")
    assert code == 0, err
    # a stack file without the shape says what it needs, in one line
    one_line_exit2(capsys, "evaluate", f, v2lite, needle="holds only the map: give --model and the cluster")


def test_file_names_its_stack_and_a_contradicting_stack_is_refused(capsys, tmp_path, v2lite):
    p, s = tmp_path / "p.json", tmp_path / "s.json"
    code, _, err = run(capsys, "solve", v2lite, "--gpus", "8", "--redundant", "8", "--stack", "sglang",
                       "--method", "eplb", "-o", p, "--export", f"sglang={s}")
    assert code == 0, err
    pf = read_placement_file(s, model=get_model("deepseek-v2-lite"), topology=make_topology(gpus=8))
    assert pf.stack.name == "sglang" and pf.dispatch == "sglang-static" and pf.method == "file:sglang"
    code, out, err = run(capsys, "evaluate", s, v2lite, "--model", "deepseek-v2-lite", "--gpus", "8")
    assert code == 0, err
    assert "dispatch sglang-static (sglang 0.5.23)" in out
    one_line_exit2(capsys, "evaluate", s, v2lite, "--model", "deepseek-v2-lite", "--gpus", "8",
                   "--stack", "vllm-ascend", needle="this is a sglang 0.5.23 file (sglang); --stack vllm-ascend loads")
    one_line_exit2(capsys, "evaluate", tmp_path / "x.txt", v2lite, needle="cannot tell the placement format")


def test_serve_initial_reads_a_stack_file(capsys, tmp_path, v2lite):
    """serve --initial starts from the file the server runs now (a vllm-ascend map here)."""
    import os
    import re
    import signal
    import subprocess
    import sys

    p, a = tmp_path / "p.json", tmp_path / "a.json"
    code, _, err = run(capsys, "solve", v2lite, "--gpus", "8", "--redundant", "8", "--stack", "vllm-ascend",
                       "--method", "eplb", "-o", p, "--export", f"vllm-ascend={a}")
    assert code == 0, err
    out = tmp_path / "now.json"
    env = dict(os.environ, PLACER_SERVE_TOKEN="tok")
    proc = subprocess.Popen([sys.executable, "-m", "placer", "serve", "--initial", str(a), "--model",
                             "deepseek-v2-lite", "--gpus", "8", "--port", "0", "-o", str(out), "--interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert re.search(r"listening on http://127\.0\.0\.1:\d+ \(deepseek-v2-lite, 8 GPUs", line), \
            (line, proc.stderr.read() if proc.poll() is not None else "")
        assert f"initial placement from {a}" in line
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    written = read_placement_json(out)
    assert written.dispatch == "vllm-ascend" and written.stack.name == "vllm-ascend"
    np.testing.assert_array_equal(written.placement.physical_to_logical,
                                  read_placement_json(p).placement.physical_to_logical)
