"""``placer serve`` from the command line: flag errors, and a real process over HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from serve_helpers import MODEL, TOPOLOGY, Client, shifted_load, wait_for

from placer.cli import main
from placer.ilp.simple import contiguous_map
from placer.io.placements import read_placement_json, write_placement_json
from placer.types import Placement


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.timeout(60)
def test_non_local_bind_without_token_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("PLACER_SERVE_TOKEN", raising=False)
    assert main(["serve", "--model", "mixtral-8x7b", "--gpus", "4", "--host", "0.0.0.0", "--port", "0"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("placer: error: --host: binding the non-local address 0.0.0.0 needs a token")


@pytest.mark.timeout(60)
def test_flag_errors_exit_2(capsys, tmp_path):
    assert main(["serve", "--gpus", "4"]) == 2
    assert "serve needs --model PRESET" in _one_error_line(capsys)
    assert main(["serve", "--model", "mixtral-8x7b", "--gpus", "4", "--method", "magic"]) == 2
    assert "unknown method 'magic'" in _one_error_line(capsys)
    state = tmp_path / "s.json"
    state.write_text("{truncated")
    assert main(["serve", "--model", "mixtral-8x7b", "--gpus", "4", "--state", str(state), "--port", "0"]) == 2
    assert f"{state}: cannot read the state file" in _one_error_line(capsys)
    assert main(["serve", "--model", "mixtral-8x7b", "--gpus", "4", "--watch", str(tmp_path / "nope")]) == 2
    assert "not a directory" in _one_error_line(capsys)
    assert main(["serve", "--model", "mixtral-8x7b", "--gpus", "4", "--stack", "sglang", "--port", "0"]) == 2
    assert "sglang 0.5.23 cannot place mixtral-8x7b" in _one_error_line(capsys)


@pytest.mark.timeout(60)
def test_help_has_an_example(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Example:" in out and "placer serve --model" in out and "PLACER_SERVE_TOKEN" in out


@pytest.mark.timeout(60)
def test_serve_process_publishes_after_a_posted_shift_and_stops_on_sigterm(tmp_path):
    initial = tmp_path / "initial.json"
    write_placement_json(initial, Placement(contiguous_map(4, 8, 8), 2, 8), model=MODEL, topology=TOPOLOGY,
                         dispatch="nearest", method="contiguous", status="feasible", solve_seconds=0.0)
    out, state = tmp_path / "placement.json", tmp_path / "state.npz"
    env = dict(os.environ, PLACER_SERVE_TOKEN="tok-123")
    proc = subprocess.Popen([sys.executable, "-m", "placer", "serve", "--initial", str(initial), "--port", "0",
                             "--state", str(state), "-o", str(out), "--interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+) \(tiny-moe, 4 GPUs", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert "initial placement from" in line
        client = Client(match.group(1), token="tok-123")
        assert client.request("GET", "/healthz", token=None)[0] == 401  # the env token applies locally too
        assert client.get_json("/healthz") == {"status": "ok"}
        assert client.post_stats({"load": shifted_load()})[0] == 202
        wait_for(lambda: client.metrics()["placer_placements_published_total"] == 1, what="a publication")
        assert read_placement_json(out).method == "eplb"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "stopped; state saved" in stdout
    assert "published" in stderr and "Traceback" not in stderr
    assert state.exists() and read_placement_json(out).metrics["published"] == 1


@pytest.mark.timeout(60)
def test_serve_json_prints_events_as_json_lines_and_quiet_logs_no_decisions(tmp_path):
    import json

    initial = tmp_path / "initial.json"
    write_placement_json(initial, Placement(contiguous_map(4, 8, 8), 2, 8), model=MODEL, topology=TOPOLOGY,
                         dispatch="nearest", method="contiguous", status="feasible", solve_seconds=0.0)
    env = {k: v for k, v in os.environ.items() if k != "PLACER_SERVE_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "placer", "serve", "--initial", str(initial), "--port", "0",
                             "--interval", "0.1", "--json", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        event = json.loads(proc.stdout.readline())
        assert event["event"] == "listening" and event["model"] == "tiny-moe" and event["gpus"] == 4
        client = Client(event["url"])
        assert client.post_stats({"load": shifted_load()})[0] == 202
        wait_for(lambda: client.get_json("/status")["evaluated_observations"] == 1, what="an evaluation")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert [json.loads(line)["event"] for line in stdout.splitlines()] == ["stopped"]
    assert "re-solving" not in stderr and "evaluated" not in stderr and "Traceback" not in stderr
