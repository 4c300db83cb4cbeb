"""The progress display (:mod:`placer.cli.progress`) and ``--quiet`` / ``--json`` on the commands."""

from __future__ import annotations

import io
import json
import re
import time

import pytest
from cli_helpers import run
from readme_doctest import mask

from placer.cli import cli, progress
from placer.cli.progress import Progress

pytestmark = pytest.mark.timeout(180)

LINE = re.compile(r"^placer [a-z ]+: .*\d+ s elapsed")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _wait_for(stream: io.StringIO, text: str, timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while text not in stream.getvalue() and time.monotonic() < end:
        time.sleep(0.02)


def test_piped_progress_is_a_line_every_interval_with_what_is_left():
    stream = io.StringIO()
    with Progress("simulate run", total=1000, unit="steps", stream=stream, interval_s=0.1) as bar:
        bar.update(100, note="eplb")  # before the first interval: nothing
        time.sleep(0.15)
        bar.update(250, note="eplb")
        bar.update(260, note="eplb")  # within the interval of the last line: nothing
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and LINE.match(lines[0]), lines
    assert "eplb, 250/1,000 steps (25%)" in lines[0] and "s left" in lines[0]


def test_a_ticker_prints_while_the_work_makes_no_callbacks():
    stream = io.StringIO()
    with Progress("profile", total=60, unit="s", clock=True, ticker=True, stream=stream, interval_s=0.05) as bar:
        bar.update(note="recording expert distribution")
        _wait_for(stream, "\n")
    assert LINE.match(stream.getvalue().splitlines()[0]) and "60 s limit" in stream.getvalue()


def test_no_thread_runs_beside_the_work_unless_asked(monkeypatch):
    import threading

    before = threading.active_count()
    for stream in (io.StringIO(), Terminal()):  # a live thread would make the solver's pool use forkserver
        with Progress("solve", total=10, stream=stream) as bar:
            bar.update(1)
            assert threading.active_count() == before


def test_piped_progress_prints_nothing_in_a_run_shorter_than_the_interval():
    stream = io.StringIO()
    with Progress("solve", total=None, stream=stream, interval_s=30) as bar:
        bar.update(note="reading 1 input(s)")
    assert stream.getvalue() == ""


def test_quiet_prints_nothing_piped_or_on_a_terminal():
    for stream in (io.StringIO(), Terminal()):
        with Progress("apply", total=10, unit="rounds", quiet=True, stream=stream, interval_s=0.05) as bar:
            bar.update(3)
            time.sleep(0.2)
        assert stream.getvalue() == ""


def test_terminal_shows_a_bar_with_an_eta_and_clears_it(monkeypatch):
    monkeypatch.setattr(progress, "REFRESH_S", 0.01)
    stream = Terminal()
    with Progress("profile", total=10, unit="prompts", stream=stream) as bar:
        time.sleep(0.05)
        bar.update(4, note="1,234 tokens")
        shown = stream.getvalue()
    assert "placer profile" in shown and "4/10" in shown and "<" in shown and "1,234 tokens" in shown
    assert not stream.getvalue().rstrip("\r").endswith("\n")  # leave=False: the bar is cleared, no line left


def test_a_time_limited_run_counts_against_its_limit():
    bar = Progress("solve", total=30, unit="s", clock=True, start=time.time() - 12, stream=io.StringIO())
    bar.update(note="solving with placer")
    line = bar.line()
    assert line.startswith("placer solve: solving with placer, 30 s limit, 12 s elapsed, about 18 s left"), line


def test_the_readme_doc_test_drops_progress_lines():
    bar = Progress("demo", total=11, unit="stages", start=time.time() - 7, stream=io.StringIO())
    bar.update(3, note="solving eplb")
    assert mask([bar.line(), "solved eplb: feasible in 0.01 s"]) == ["solved eplb: feasible in <t>"]


def test_every_command_that_shows_progress_has_quiet():
    paths = {"solve": ["solve"], "profile": ["profile"], "apply": ["apply"], "demo": ["demo"],
             "serve": ["serve"], "simulate run": ["simulate", "run"], "simulate sweep": ["simulate", "sweep"],
             "synth": ["synth"], "stats": ["stats"], "evaluate": ["evaluate"], "report": ["report"],
             "simulate a2a": ["simulate", "a2a"]}
    for name, path in paths.items():
        cmd = cli
        for part in path:
            cmd = cmd.commands[part]
        assert "--quiet" in {o for p in cmd.params for o in p.opts}, name
    for path in (*paths.values(), ["export"]):
        cmd = cli
        for part in path:
            cmd = cmd.commands[part]
        assert "--json" in {o for p in cmd.params for o in p.opts}, path


@pytest.fixture
def trace(tmp_path, capsys):
    path = tmp_path / "t.npz"
    assert run(capsys, "synth", "--model", "mixtral-8x7b", "--tokens", "3000", "-o", path)[0] == 0
    return path


def test_synth_shows_tokens_written_and_json_names_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    out = tmp_path / "t.npz"
    code, text, err = run(capsys, "synth", "--model", "mixtral-8x7b", "--tokens", "70000", "-o", out, "--json")
    assert code == 0, err
    doc = json.loads(text)
    assert doc == {"tokens": 70000, "model": "mixtral-8x7b", "output": str(out), "seed": 0, "perturb": 0.0,
                   "phase": None, "synthetic": True}
    assert re.search(r"placer synth: 65,536/70,000 tokens \(94%\)", err), err  # after the first chunk
    code, _, err = run(capsys, "synth", "--model", "mixtral-8x7b", "--tokens", "70000", "-o", out, "--quiet")
    assert code == 0 and err == "", err


def test_solve_shows_its_phases_piped_and_quiet_hides_them(tmp_path, capsys, monkeypatch, trace):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.01)
    monkeypatch.setattr(progress, "REFRESH_S", 0.01)
    args = ["solve", trace, "--gpus", "4", "--method", "moetuner", "-o", tmp_path / "p.json"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    lines = err.splitlines()
    assert lines and all(LINE.match(line) for line in lines), err
    code, quiet_out, quiet_err = run(capsys, *args, "--quiet")
    assert code == 0 and quiet_err == ""
    strip = re.compile(r"\d+(\.\d+)? (s|ms|us|ns)\b")  # solve times differ between runs

    def same(text: str) -> str:  # ... and so may the width of their column
        return re.sub(r" +", " ", strip.sub("", text))

    assert same(quiet_out) == same(out)


def test_solve_reports_how_far_the_layer_search_is(tmp_path, capsys, monkeypatch, trace):
    from placer._progress import report, reporting

    report("layer search", 1, 2)  # no sink: nothing happens
    got = []
    with reporting(lambda *a: got.append(a)):
        report("layer search", 1, 2)
    report("layer search", 2, 2)
    assert got == [("layer search", 1, 2)]
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    # in-process, the limit would count from pytest's start (the CLI's origin is process start)
    import placer.cli.placement as cli_placement
    now = time.time()
    monkeypatch.setattr(cli_placement, "process_start_time", lambda: now)
    code, _, err = run(capsys, "solve", trace, "--gpus", "4", "--method", "placer", "--workers", "2",
                       "--time-limit", "60", "-o", tmp_path / "p.json")
    assert code == 0, err
    assert re.search(r"layer search \d+/32 layers, 60 s limit, \d+ s elapsed, about \d+ s left", err), err


def test_simulate_run_and_sweep_report_steps_and_points(tmp_path, capsys, monkeypatch, trace):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.01)
    monkeypatch.setattr(progress, "REFRESH_S", 0.01)
    seen: list[tuple[float, float | None]] = []
    real_update = Progress.update

    def update(self, done=None, **kw):
        real_update(self, done, **kw)
        seen.append((self.done, self.total))

    monkeypatch.setattr(Progress, "update", update)
    code, _, err = run(capsys, "simulate", "run", trace, "--gpus", "4", "--method", "contiguous", "--method", "eplb",
                       "--workload", "replay", "--iterations", "4")
    assert code == 0, err
    assert seen[-1] == (8, 8)  # 4 steps of each of the two placements (the trace holds 6)
    seen.clear()
    code, _, err = run(capsys, "simulate", "sweep", "--model", "mixtral-8x7b", "--gpus", "4,8", "--method", "eplb",
                       "--workload", "replay", "--iterations", "5", "--workers", "1", "-o", tmp_path / "sw", "--quiet")
    assert code == 0 and err == ""
    seen.clear()
    code, _, err = run(capsys, "simulate", "sweep", "--model", "mixtral-8x7b", "--gpus", "4,8", "--method", "eplb",
                       "--workload", "replay", "--iterations", "5", "--workers", "1", "-o", tmp_path / "sw2")
    assert code == 0, err
    assert seen == [(1, 2), (2, 2)]
    assert all(LINE.match(line) for line in err.splitlines()), err


def test_report_json_names_the_file_and_what_it_shows(tmp_path, capsys, trace):
    sim = tmp_path / "sim"
    code, _, err = run(capsys, "simulate", "run", trace, "--gpus", "4", "--method", "eplb", "--workload", "replay",
                       "--iterations", "5", "-o", sim, "--quiet")
    assert code == 0, err
    code, out, err = run(capsys, "report", sim, "-o", tmp_path / "r.html", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["output"] == str(tmp_path / "r.html") and (tmp_path / "r.html").is_file()
    assert doc["simulated"] == ["eplb"] and doc["plots"] > 0
    assert [p["label"] for p in doc["placements"]] and doc["placements"][0]["simulated_as"] == "eplb"


def test_demo_json_holds_the_methods_table_and_the_files(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    code, out, err = run(capsys, "demo", "--synthetic", "-o", out_dir, "--json", "--quiet")
    assert code == 0, err
    doc = json.loads(out)  # nothing but the document on stdout
    assert [r["method"] for r in doc["methods"]][:3] == ["contiguous", "round-robin", "eplb"]
    assert doc["best"] in {r["method"] for r in doc["methods"]}
    assert all(r["holdout_load_max_mean"] >= 1.0 for r in doc["methods"])
    assert doc["report"] == str(out_dir / "report.html") and (out_dir / "report.html").is_file()
    assert doc["sglang"] == str(out_dir / "sglang.json") and "--init-expert-location" in " ".join(doc["sglang_flags"])
    assert any(line.startswith("simulated 7 placements") for line in doc["stages"])
    assert err == ""


def test_profile_json_holds_the_summary_figures_and_files(tmp_path, capsys):
    pytest.importorskip("transformers")
    stats = tmp_path / "s.npz"
    code, out, err = run(capsys, "profile", "--max-prompts", "4", "-o", stats, "--json", "--quiet")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"] == "placer-embedded-mixtral" and doc["tokens"] > 100 and doc["action"] == "profiled"
    assert doc["load_max_over_mean_median"] >= 1.0 and doc["tokens_per_second"] > 0
    assert doc["output"] == str(stats) and stats.is_file() and doc["trace"] is None
    assert err == ""


def test_stats_and_evaluate_show_tokens_read_and_scored_and_quiet_hides_them(tmp_path, capsys, monkeypatch, trace):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    code, out, err = run(capsys, "stats", trace)
    assert code == 0 and "placer stats: reading, 3,000 tokens, 0 s elapsed" in err.splitlines(), err
    assert run(capsys, "stats", trace, "--quiet")[1:] == (out, "")
    p = tmp_path / "p.json"
    assert run(capsys, "solve", trace, "--gpus", "4", "--method", "contiguous", "-o", p, "--quiet")[0] == 0
    code, out, err = run(capsys, "evaluate", p, trace)
    lines = err.splitlines()
    assert code == 0 and lines and all(re.fullmatch(
        r"placer evaluate: (reading|scoring), 3,000(/3,000)? tokens( \(100%\))?, \d+ s elapsed(, about 0 s left)?",
        line) for line in lines), err
    assert run(capsys, "evaluate", p, trace, "--quiet")[1:] == (out, "")
