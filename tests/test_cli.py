"""The CLI: one happy path per command, and every bad-input class exits 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import one_line_exit2, run

from placer.cli import cli

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def hdmoe(tmp_path):
    """A small HD-MoE-style JSON trace for Mixtral's shape (32 layers, top-2 of 8)."""
    rng = np.random.default_rng(0)
    tokens = 300
    data = {str(layer): [list(map(int, rng.choice(8, 2, replace=False))) for _ in range(tokens)]
            for layer in range(32)}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(data))
    return path


def test_help_lists_only_built_commands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for cmd in ("synth", "stats", "solve", "evaluate", "export"):
        assert cmd in out
    assert "Example" in out


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help_with_example(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "Example:" in out and f"placer {command}" in out


def test_every_option_of_every_command_has_help_text():
    import click

    from placer.cli.main import cli

    def leaves(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from leaves(sub, [*path, name])
        else:
            yield " ".join(path), cmd

    bare = [(name, p.opts[0]) for name, cmd in leaves(cli, []) for p in cmd.params
            if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert not bare, f"options without help text: {bare}"


@pytest.mark.parametrize("where", ["first", "after the command", "last"])
def test_debug_anywhere_on_the_line_shows_the_traceback(capsys, tmp_path, where):
    argv = ["solve", str(tmp_path / "missing.npz"), "--gpus", "4", "-o", str(tmp_path / "p.json")]
    at = {"first": 0, "after the command": 1, "last": len(argv)}[where]
    code, _, err = run(capsys, *argv[:at], "--debug", *argv[at:])
    assert code == 2
    assert "Traceback" in err and err.strip().splitlines()[-1] == f"placer: error: {tmp_path / 'missing.npz'}: file not found"
    code, _, err = run(capsys, *argv)  # without it: one line
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_stats_solve_evaluate_export(capsys, tmp_path, hdmoe):
    code, out, _ = run(capsys, "stats", hdmoe, "--model", "mixtral-8x7b", "-o", tmp_path / "s.npz")
    assert code == 0 and "max/mean" in out and "successors" in out
    assert (tmp_path / "s.npz").exists()

    p, s = tmp_path / "p.json", tmp_path / "sglang.json"
    # SGLang 0.5.23 cannot place Mixtral: the export is refused with the reason, nothing written.
    code, out, err = run(capsys, "solve", hdmoe, "--model", "mixtral-8x7b", "--gpus", "4", "--method",
                         "contiguous", "-o", p, "--export", f"sglang={s}")
    assert code == 2 and "cannot place mixtral-8x7b" in err and not s.exists()
    code, out, err = run(capsys, "solve", hdmoe, "--model", "mixtral-8x7b", "--gpus", "4", "--stack", "sglang",
                         "-o", p)
    assert code == 2 and "sglang 0.5.23 cannot place mixtral-8x7b" in err and "--dispatch sglang-static" in err
    code, out, _ = run(capsys, "solve", hdmoe, "--model", "mixtral-8x7b", "--gpus", "4", "--method",
                       "contiguous", "-o", p, "--export", f"trtllm={tmp_path / 'lb.yaml'}")
    assert code == 0, out
    assert "--ep_size 4" in out and "dispatch nearest" in out
    placement = json.loads(p.read_text())
    assert placement["method"] == "contiguous" and placement["slots_per_gpu"] == 2
    assert placement["stack"] is None and placement["dispatch"] == "nearest"

    code, out, _ = run(capsys, "evaluate", p, hdmoe, "--json")
    assert code == 0
    metrics = json.loads(out)
    assert 0.0 <= metrics["frac_top1_transitions_cross_gpu"] <= 1.0
    assert metrics["load_max_over_mean_median"] >= 1.0

    code, out, _ = run(capsys, "export", p, "--format", "vllm-ascend", "-o", tmp_path / "a.json")
    assert code == 0 and "expert_map_path" in out
    assert json.loads((tmp_path / "a.json").read_text())["moe_layer_count"] == 32


def test_stats_merges_several_inputs(capsys, hdmoe):
    code, out, _ = run(capsys, "stats", hdmoe, hdmoe, "--json")
    assert code == 0 and json.loads(out)["tokens"] == 600


def test_solve_reproduces_eplb_readme_from_a_load_matrix(capsys, tmp_path):
    weight = tmp_path / "weight.csv"
    weight.write_text("90,132,40,61,104,165,39,4,73,56,183,86\n20,107,104,64,19,197,187,157,172,86,16,27\n")
    out_path = tmp_path / "p.json"
    code, out, _ = run(capsys, "solve", weight, "--gpus", "8", "--nodes", "2", "--redundant", "4",
                       "--groups", "4", "--method", "eplb", "-o", out_path)
    assert code == 0, out + _
    assert json.loads(out_path.read_text())["physical_to_logical_map"] == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]



def test_bad_inputs_exit_2_with_one_line(capsys, tmp_path, hdmoe):
    missing = tmp_path / "nope.json"
    one_line_exit2(capsys, "stats", missing, needle="nope.json")

    truncated = tmp_path / "cut.json"
    truncated.write_bytes(hdmoe.read_bytes()[:500])
    one_line_exit2(capsys, "stats", truncated, needle="cut.json")

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"0": [[0, 1]], "1": [[0, 1], [2, 3]]}))
    one_line_exit2(capsys, "stats", wrong, needle="wrong.json")

    one_line_exit2(capsys, "stats", hdmoe, "--model", "olmoe-1b-7b", needle="trace.json")

    out_of_range = tmp_path / "range.json"
    out_of_range.write_text(json.dumps({str(i): [[0, 9]] for i in range(32)}))
    one_line_exit2(capsys, "stats", out_of_range, "--model", "mixtral-8x7b", needle="range.json")

    nan = tmp_path / "nan.csv"
    nan.write_text("1,2,nan,4\n1,2,3,4\n")
    one_line_exit2(capsys, "stats", nan, needle="nan.csv")
    negative = tmp_path / "neg.csv"
    negative.write_text("1,2,-3,4\n1,2,3,4\n")
    one_line_exit2(capsys, "stats", negative, needle="neg.csv")

    unknown = tmp_path / "trace.xyz"
    unknown.write_text("hello")
    one_line_exit2(capsys, "stats", unknown, needle="trace.xyz")

    one_line_exit2(capsys, "solve", hdmoe, "--model", "mixtral-8x7b", "--gpus", "3", "-o", tmp_path / "p.json",
                    needle="--redundant 1")
    one_line_exit2(capsys, "solve", "--model", "mixtral-8x7b", "--gpus", "16", "-o", tmp_path / "p.json",
                    needle="nearest feasible")
    one_line_exit2(capsys, "solve", "--model", "nope", "--gpus", "4", "-o", tmp_path / "p.json", needle="nope")
    one_line_exit2(capsys, "solve", "--model", "mixtral-8x7b", "--gpus", "4", "-o", tmp_path / "p.json",
                    "--export", "tensorflow=x.json", needle="tensorflow")


def test_placement_file_is_authoritative(capsys, tmp_path, hdmoe):
    p = tmp_path / "p.json"
    assert run(capsys, "solve", hdmoe, "--model", "mixtral-8x7b", "--gpus", "4", "-o", p)[0] == 0
    one_line_exit2(capsys, "evaluate", p, hdmoe, "--gpus", "8", needle="contradicts")
    one_line_exit2(capsys, "evaluate", p, hdmoe, "--model", "olmoe-1b-7b", needle="contradicts")
    broken = tmp_path / "broken.json"
    broken.write_text(p.read_text()[:100])
    one_line_exit2(capsys, "export", broken, "--format", "sglang", "-o", tmp_path / "s.json", needle="broken.json")
    one_line_exit2(capsys, "export", p, "--format", "onnx", "-o", tmp_path / "s.json", needle="onnx")


def test_console_script_exit_codes(tmp_path):
    """Through a real process: exit 2 and one line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "placer", "stats", str(tmp_path / "missing.npz")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "missing.npz" in proc.stderr and "Traceback" not in proc.stderr


def test_core_cli_does_not_import_torch():
    code = ("import sys; from placer.cli import main; "
            "rc = main(['--help']); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_solve_from_a_running_placement_moves_less_and_says_what_it_moves(capsys, tmp_path):
    from placer.ilp.movement import doubled
    from placer.io.placements import read_placement_json

    shape = ["--model", "mixtral-8x7b", "--gpus", "8", "--nodes", "2", "--redundant", "8", "--method", "eplb"]
    for name, seed, perturb in (("a", 1, "0"), ("b", 2, "0.5")):
        assert run(capsys, "synth", "--model", "mixtral-8x7b", "--tokens", "2000", "--seed", str(seed), "--perturb",
                   perturb, "-o", str(tmp_path / f"{name}.npz"))[0] == 0
    assert run(capsys, "solve", str(tmp_path / "a.npz"), *shape, "-o", str(tmp_path / "a.json"),
               "--export", f"eplb={tmp_path / 'a-eplb.npz'}")[0] == 0
    moves = {}
    for running in ("a.json", "a-eplb.npz"):  # placer's file, or a stack's (shaped by --model and --gpus)
        for horizon in ("0.5", "600"):
            code, out, err = run(capsys, "solve", str(tmp_path / "b.npz"), *shape, "--from", str(tmp_path / running),
                                 "--horizon-s", horizon, "-o", str(tmp_path / "b.json"), "--json")
            assert code == 0, err
            m = json.loads(out)["movement"]
            assert m["horizon_s"] == float(horizon) and m["rounds"] >= (m["transfers"] > 0)
            assert not doubled(read_placement_json(tmp_path / "b.json").placement)
            moves[running, horizon] = m
    assert moves["a.json", "0.5"] == moves["a-eplb.npz", "0.5"]
    short = moves["a.json", "0.5"]
    assert short["bytes_moved"] < 0.5 * short["resolve_bytes_moved"]  # far less than the re-solve as it is
    assert moves["a.json", "0.5"]["bytes_moved"] < moves["a.json", "600"]["bytes_moved"]  # a short horizon moves less
    assert moves["a.json", "600"]["objective_ratio"] < moves["a.json", "0.5"]["objective_ratio"]  # a long one gains more
    code, out, _ = run(capsys, "solve", str(tmp_path / "b.npz"), *shape, "--from", str(tmp_path / "a.json"),
                       "-o", str(tmp_path / "b.json"))
    assert code == 0 and f"from {tmp_path / 'a.json'}: " in out and " pays back " in out and " rounds)" in out


def test_stats_of_a_plain_load_matrix_does_not_invent_tokens_or_top_k(capsys, tmp_path):
    path = tmp_path / "weight.csv"
    path.write_text("90,132,40,61\n20,107,104,64\n")
    code, out, _ = run(capsys, "stats", path)
    assert code == 0
    assert out.splitlines()[0] == ("custom: counts only: 323 expert selections in the busiest layer, 2 MoE layers, E=4 "
                                   "(top-k and tokens unknown: give --model), phase=all")
    assert "top_k=1" not in out
