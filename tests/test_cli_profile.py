"""``placer profile``: the embedded default and a tiny family model end to end, and bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from placer.cli import main
from placer.io.native import read_stats_npz

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(120)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_profile_embedded_default_then_stats_and_solve_without_model(tmp_path, capsys):
    out = tmp_path / "stats.npz"
    code, text, err = run(capsys, "profile", "--max-prompts", "6", "--quiet", "-o", out)
    assert code == 0, err
    assert "placer-embedded-mixtral" in text and f"wrote {out}" in text
    stats = read_stats_npz(out)
    assert stats.model.name == "placer-embedded-mixtral"
    assert (stats.load.sum(axis=1) == stats.num_tokens * stats.top_k).all() and stats.num_tokens > 1000
    code, text, _ = run(capsys, "stats", out)
    assert code == 0 and "successors" in text
    code, text, err = run(capsys, "solve", out, "--gpus", "4", "-o", tmp_path / "p.json")
    assert code == 0, err


def test_profile_tiny_family_with_generate_and_trace(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("print('hello')\nx = [i * i for i in range(10)]\nimport sys\n")
    out, trace = tmp_path / "s.npz", tmp_path / "t.parquet"
    code, text, err = run(capsys, "profile", "--hf-model", "deepseek-v3", "--prompts", prompts, "--max-new-tokens", "3",
                          "--batch-size", "2", "-o", out, "--trace", trace)
    assert code == 0, err
    assert "phases prefill" in text and "decode" in text
    for phase in ("all", "prefill", "decode"):
        s = read_stats_npz(out, phase)
        assert (s.load.sum(axis=1) == s.num_tokens * 2).all()
        assert s.model.moe_layer_ids == (1, 2)
    code, text, _ = run(capsys, "stats", trace, "--phase", "decode")
    assert code == 0 and "phase=decode" in text
    assert np.array_equal(read_stats_npz(out, "decode").load,
                          np.asarray(read_stats_npz(out).load) - read_stats_npz(out, "prefill").load)


@pytest.mark.parametrize("args, needle", [
    (["--hf-model", "no-such-model"], "neither a model directory nor a family"),
    (["--model", "mixtral"], "a checkpoint directory or a family to run is --hf-model"),
    (["--model", "mixtral-8x7b"], "the model to run is --hf-model"),
    (["--prompts", "missing.txt"], "missing.txt: file not found"),
    (["--hf-model", "mixtral", "-o", "s.csv"], "written as .npz"),
    (["--hf-model", "mixtral", "--trace", "t.csv"], "written as .parquet"),
    (["--sglang", "http://127.0.0.1:9"], "--sglang needs --dump-dir"),
    (["--sglang", "http://127.0.0.1:9", "--vllm-r3", "x.npy"], "one of --sglang, --vllm-r3 and --sglang-r3"),
    (["--vllm-r3", "x.npy", "--placement", "p.json"], "--placement applies to --sglang-r3 imports"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    if "-o" not in args:
        args = [*args, "-o", "s.npz"]
    code, _, err = run(capsys, "profile", *args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_help_works_without_importing_torch():
    code = ("import sys; from placer.cli import main; rc = main(['profile', '--help']); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "Example:" in res.stdout, res.stderr
