"""``placer simulate run | a2a | sweep``: happy paths on tiny inputs, and bad input exits 2 with
one line naming the input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from cli_helpers import one_line_exit2, run

from placer.app.sweep import SWEEP_COLUMNS
from placer.cli import main
from placer.cli.simulate import KERNEL_CHOICES
from placer.ilp import PlacementProblem, solve
from placer.io.placements import write_placement_json
from placer.presets import get_model, make_topology
from placer.simulator import KERNELS
from placer.simulator.results import TABLES, read_results
from placer.stats import load_only_stats

pytestmark = pytest.mark.timeout(120)

MIXTRAL = get_model("mixtral-8x7b")
SERVING = ["--rate", "10", "--duration", "0.3", "--prompt-len", "16", "--output-len", "4", "--length-dist", "fixed"]


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    """A tiny synthetic Mixtral trace written by ``placer synth``."""
    path = tmp_path_factory.mktemp("trace") / "trace.npz"
    assert main(["synth", "--model", "mixtral-8x7b", "--tokens", "256", "--seed", "1", "-o", str(path)]) == 0
    return path


def write_solved(path, model, gpus, method):
    topo = make_topology("h100", gpus=gpus)
    stats = load_only_stats(np.ones((model.num_moe_layers, model.num_experts)), model.top_k,
                            model=model)
    result = solve(PlacementProblem(stats, model, topo), method)
    write_placement_json(path, result.placement, model=model, topology=topo, dispatch="nearest", method=method,
                         status=result.status, solve_seconds=0.0)
    return path


@pytest.fixture(scope="module")
def placements(tmp_path_factory):
    d = tmp_path_factory.mktemp("placements")
    return (write_solved(d / "contiguous.json", MIXTRAL, 4, "contiguous"),
            write_solved(d / "round-robin.json", MIXTRAL, 4, "round-robin"))


def test_run_replay_with_two_placement_files_writes_the_results_layout(capsys, tmp_path, trace, placements):
    out = tmp_path / "sim"
    code, stdout, err = run(capsys, "simulate", "run", trace, "--placement", placements[0], "--placement",
                            placements[1], "--workload", "replay", "--tokens-per-rank", "8", "-o", out)
    assert code == 0, err
    assert "mixtral-8x7b on 4 x h100" in stdout and "replay" in stdout
    header = stdout.splitlines()[1].split()
    assert header == ["metric", "contiguous", "round-robin", "round-robin/contiguous"]
    assert f"results in {out}/" in stdout
    for name in ("metrics.json", "report.html", *(f"{t}.csv" for t in TABLES)):
        assert (out / name).is_file(), name
    res = read_results(out)
    assert res.labels == ["contiguous", "round-robin"]
    assert res.summaries["contiguous"]["iterations"] == 256 // 32
    assert res.summaries["contiguous"]["tokens"] == 256
    assert res.inputs["placements"]["contiguous"]["path"] == str(placements[0])
    assert res.inputs["placements"]["contiguous"]["sha256"] is not None
    assert res.inputs["routing"]["tokens"] == 256 and res.inputs["routing"]["synthetic"] is True
    html = (out / "report.html").read_text()
    assert "round-robin" in html


def test_run_serving_with_methods_prints_json(capsys, trace):
    code, stdout, err = run(capsys, "simulate", "run", trace, "--gpus", "4", "--method", "contiguous", "--method",
                            "round-robin", *SERVING, "--json")
    assert code == 0, err
    summaries = json.loads(stdout)
    assert list(summaries) == ["contiguous", "round-robin"]
    for s in summaries.values():
        assert s["requests"] > 0 and s["requests_finished"] == s["requests"]
        assert s["routing_pool"] == "trace"
    # The same seed gives both placements the same requests.
    assert summaries["contiguous"]["requests"] == summaries["round-robin"]["requests"]


def test_run_synthetic_routing_context_coherent(capsys):
    code, stdout, err = run(capsys, "simulate", "run", "--model", "mixtral-8x7b", "--gpus", "4", "--method",
                            "contiguous", "--execution", "context-coherent", "--kernel", "deepep-ll",
                            "--congestion", "fifo", "--level", "token", *SERVING, "--json")
    assert code == 0, err
    s = json.loads(stdout)["contiguous"]
    assert s["kv_replication"] == 4 and s["routing_pool"] == "synthetic:mixtral-8x7b"


def test_a2a_json_has_the_documented_keys(capsys):
    code, stdout, err = run(capsys, "simulate", "a2a", "--cluster", "h800", "--gpus", "16", "--tokens-per-rank", "16",
                            "--top-k", "4", "--hidden", "512", "--experts", "64", "--routing", "group-limited",
                            "--groups", "8", "--topk-groups", "2", "--json")
    assert code == 0, err
    r = json.loads(stdout)
    for key in ("dispatch_us", "combine_us", "dispatch_gbps", "combine_gbps"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["bottleneck"] == "rdma" and r["ep"] == 16 and r["routing"] == "group-limited"
    code, stdout, _ = run(capsys, "simulate", "a2a", "--gpus", "8", "--tokens-per-rank", "8", "--top-k", "2",
                          "--hidden", "256", "--experts", "16")
    assert code == 0 and "bottleneck" in stdout and "nvlink" in stdout


@pytest.mark.parametrize(("kernel", "ep", "extra", "count", "published_us"),
                         [("deepep-ll", 16, ("--experts", "288"), "selections", 118.0),
                          ("deepep-v2", 16, ("--tokens-per-rank", "8192", "--cluster", "h100"), "nodes-hit", None)])
def test_a2a_prints_one_published_row_per_command(capsys, kernel, ep, extra, count, published_us):
    code, stdout, err = run(capsys, "simulate", "a2a", "--gpus", str(ep), "--kernel", kernel, *extra)
    assert code == 0, err
    rows = dict(line.split(None, 1) for line in stdout.splitlines())
    assert rows["deepep_count"] == count
    if published_us is not None:  # DeepEP's low-latency EP16 dispatch: 118 us
        assert abs(float(rows["dispatch_us"]) / published_us - 1) <= 0.05
    else:  # DeepEP V2's EP 8 x 2 dispatch: 90 GB/s logical
        assert rows["deepep_dispatch_gbps"].endswith(" GB/s")
        assert abs(float(rows["deepep_dispatch_gbps"].split()[0]) / 90.0 - 1) <= 0.01


def test_sweep_over_two_gpu_counts_runs_locally(capsys, tmp_path):
    out = tmp_path / "sweep"
    code, stdout, err = run(capsys, "simulate", "sweep", "--model", "mixtral-8x7b", "--gpus", "4,8", "--method",
                            "contiguous", "--workers", "1", *SERVING, "-o", out)
    assert code == 0, err
    table = pd.read_csv(out / "sweep.csv")
    assert list(table.columns) == list(SWEEP_COLUMNS)
    assert table["gpus"].tolist() == [4, 8] and table["rate"].tolist() == [10.0, 10.0]
    assert (out / "gpus4-rate10" / "metrics.json").is_file() and (out / "report.html").is_file()
    assert "sweep.csv" in stdout


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_sweep_on_ray(capsys, tmp_path, ray_session):
    """The session's Ray instance is already initialised; the sweep reuses it."""
    out = tmp_path / "ray"
    code, stdout, err = run(capsys, "simulate", "sweep", "--model", "mixtral-8x7b", "--gpus", "4", "--method",
                            "contiguous", "--method", "round-robin", *SERVING, "--ray-address", "auto", "--json",
                            "-o", out)
    assert code == 0, err
    rows = json.loads(stdout)
    assert [(r["gpus"], r["placement"]) for r in rows] == [(4, "contiguous"), (4, "round-robin")]
    assert len(pd.read_csv(out / "sweep.csv")) == 2
    assert read_results(out / "gpus4-rate10").labels == ["contiguous", "round-robin"]
    assert ray_session.is_initialized()


# --------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming the input
# --------------------------------------------------------------------------------------------

def test_missing_placement_file(capsys, tmp_path, trace):
    one_line_exit2(capsys, "simulate", "run", trace, "--placement", tmp_path / "nope.json", needle="nope.json")


def test_placement_for_another_model(capsys, tmp_path, trace):
    olmoe = write_solved(tmp_path / "olmoe.json", get_model("olmoe-1b-7b"), 4, "contiguous")
    line = one_line_exit2(capsys, "simulate", "run", trace, "--placement", olmoe, needle="olmoe.json")
    assert "olmoe-1b-7b" in line


def test_gpus_that_contradict_a_placement_file(capsys, trace, placements):
    line = one_line_exit2(capsys, "simulate", "run", trace, "--placement", placements[0], "--gpus", "8",
                          needle="contiguous.json")
    assert "4 GPUs" in line and "8" in line


def test_other_bad_inputs(capsys, tmp_path, trace):
    one_line_exit2(capsys, "simulate", "run", "--gpus", "4", "--method", "contiguous", needle="--model")
    one_line_exit2(capsys, "simulate", "run", trace, "--gpus", "4", "--method", "nope", needle="--method")
    one_line_exit2(capsys, "simulate", "run", trace, "--gpus", "4", "--method", "contiguous", "--rate", "0",
                   needle="--rate")
    one_line_exit2(capsys, "simulate", "sweep", "--model", "mixtral-8x7b", "--gpus", "4,x", "--method",
                   "contiguous", "-o", tmp_path / "s", needle="--gpus")
    one_line_exit2(capsys, "simulate", "a2a", "--gpus", "6", "--experts", "64", needle="--gpus")
    one_line_exit2(capsys, "simulate", "a2a", "--ep", "8", needle="--ep is now --gpus")
    one_line_exit2(capsys, "simulate", "run", tmp_path / "missing.npz", "--gpus", "4", "--method", "contiguous",
                   needle="missing.npz")


@pytest.mark.parametrize("command", [["run", "--model", "mixtral-8x7b", "--gpus", "4", "--method", "contiguous"],
                                     ["a2a", "--gpus", "8"]])
def test_unknown_kernel_exits_2_naming_the_option(capsys, command):
    code, out, err = run(capsys, "simulate", *command, "--kernel", "gloo")
    assert code == 2 and "Traceback" not in err
    assert any("--kernel" in line and "gloo" in line for line in err.splitlines())


def test_unknown_kernel_is_one_line(capsys):
    one_line_exit2(capsys, "simulate", "a2a", "--gpus", "8", "--kernel", "gloo", needle="--kernel")


def test_dispatch_defaults_to_the_placement_files_rule(capsys, tmp_path, trace):
    topo = make_topology("h100", gpus=4)
    path = tmp_path / "static.json"
    result = solve(PlacementProblem(load_only_stats(np.ones((32, 8)), 2, model=MIXTRAL), MIXTRAL, topo,
                                    num_redundant=4, dispatch="sglang-static"), "eplb")
    write_placement_json(path, result.placement, model=MIXTRAL, topology=topo, dispatch="sglang-static",
                         method="eplb", status=result.status, solve_seconds=0.0)
    out = tmp_path / "sim"
    code, _, err = run(capsys, "simulate", "run", trace, "--placement", path, "--workload", "replay",
                       "--tokens-per-rank", "8", "-o", out)
    assert code == 0, err
    assert read_results(out).inputs["config"]["dispatch"] == "sglang-static"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("command, sig, code", [("run", "SIGINT", 130), ("sweep", "SIGTERM", 143)])
def test_interrupted_run_or_sweep_leaves_no_output_directory(tmp_path, command, sig, code):
    """Ctrl-C or SIGTERM after the results directory is started: exit 130 / 143, and the directory
    (created by the run, with its parent) is gone."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "new" / "sim"
    args = ["--model", "mixtral-8x7b", "--method", "contiguous", "--method", "eplb", "--duration", "100000",
            "--rate", "50", "-o", str(out)]
    args = (["run", "--gpus", "8"] if command == "run" else ["sweep", "--gpus", "8", "--workers", "1"]) + args
    proc = subprocess.Popen([sys.executable, "-m", "placer", "simulate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and \
                not any(p.suffix == ".json" for p in out.rglob("*")):
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        assert any(p.suffix == ".json" for p in out.rglob("*")), "the run never wrote into its directory"
        proc.send_signal(getattr(signal, sig))
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == code, stderr
        assert "Traceback" not in stderr
        assert list(tmp_path.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_kernel_choices_are_the_registered_builtins():
    # The CLI lists the built-in kernels without importing the simulator (start-up time); the
    # list must be the registry's. A kernel registered by a library user is not a CLI choice.
    assert tuple(KERNEL_CHOICES) == tuple(KERNELS)
