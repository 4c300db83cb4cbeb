"""`placer report`: the simulator's results plus solver placement files in one offline HTML page."""

from __future__ import annotations

import base64
import json
import re
import shutil

import numpy as np
import pytest

from placer.app.report import flatten_metrics, is_placement_json, report_plot_ids
from placer.cli import main
from placer.io.placements import read_placement_json
from placer.simulator.results import SUMMARY_KEYS, read_results

BUNDLE = re.compile(r"<script>/\*\*\s*\* plotly\.js v.*?</script>", re.S)


def _plot_ids(page: str) -> list[str]:
    return re.findall(r'<div class="sim-plot" id="([^"]+)"', page)


def _methods(page: str) -> tuple[list[str], dict[str, list[str]]]:
    """Column labels and {row name: cells} of the methods table."""
    table = page[page.index('<table class="sim-table" id="report-methods">'):]
    table = table[: table.index("</table>")]
    head = re.findall(r'<th scope="col">(.*?)</th>', table)
    rows = {m.group(1): re.findall(r"<td>(.*?)</td>", m.group(2))
            for m in re.finditer(r'<tr><th scope="row">(.*?)</th>(.*?)</tr>', table)}
    return head, rows


def _z(text: str) -> np.ndarray:
    """The first heatmap ``z`` in ``text``: plotly >= 6 writes a typed array, older a list."""
    typed = re.search(r'"z":(\{[^}]*\})', text)
    listed = re.search(r'"z":(\[\[.*?\]\])', text)
    if typed and (not listed or typed.start() < listed.start()):
        z = json.loads(typed.group(1))
        shape = tuple(int(n) for n in z["shape"].split(","))
        return np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]).reshape(shape)
    assert listed is not None
    return np.asarray(json.loads(listed.group(1)))


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A trace, a solved placement simulated by file, a method, and an unsimulated file."""
    base = tmp_path_factory.mktemp("report")
    trace, out = base / "trace.npz", base / "sim"
    assert main(["synth", "--model", "mixtral-8x7b", "--tokens", "1500", "-o", str(trace)]) == 0
    assert main(["solve", str(trace), "--gpus", "4", "--method", "eplb", "--redundant", "4",
                 "-o", str(base / "balanced.json"), "--quiet"]) == 0
    assert main(["simulate", "run", str(trace), "--gpus", "4", "--placement",
                 str(base / "balanced.json"), "--method", "contiguous", "--workload", "replay",
                 "--iterations", "4", "-o", str(out)]) == 0
    assert main(["solve", str(trace), "--gpus", "4", "--method", "round-robin",
                 "-o", str(out / "rr.json"), "--quiet"]) == 0
    # An SGLang-shaped file beside them (SGLang 0.5.23 cannot place Mixtral, so placer does not
    # export one): the report must not take it for a native placement.
    rows = json.loads((out / "rr.json").read_text())["physical_to_logical_map"]
    (out / "rr-sglang.json").write_text(json.dumps({"physical_to_logical_map": rows}))
    return {"base": base, "trace": trace, "out": out}


@pytest.fixture(scope="module")
def page(sim):
    html_path = sim["base"] / "report.html"
    assert main(["report", str(sim["out"]), "-o", str(html_path), "--routing",
                 str(sim["trace"])]) == 0
    return html_path.read_text(encoding="utf-8")


def test_every_plot_is_present_once_and_plotly_is_inlined_once(page):
    # simulated: eplb (from balanced.json, found by its recorded path) and contiguous (solved,
    # written by the simulator as placement-contiguous.json); files: those two and rr.json (in the
    # directory); rr-sglang.json is not a native placement.
    assert _plot_ids(page) == report_plot_ids(2, 3)
    for pid in report_plot_ids(2, 3):
        assert page.count(f'id="{pid}-figure"') == 1
        assert f'document.getElementById("{pid}-figure")' in page
    assert len(BUNDLE.findall(page)) == 1
    assert page.index("plotly.js v") < page.index('id="plot-gpu-bars-figure"')
    assert not re.search(r"<script[^>]*\ssrc\s*=", page, re.I)
    assert not re.search(r"<link\b", page, re.I)


def test_methods_table_has_every_metric_of_files_and_simulations(page, sim):
    head, rows = _methods(page)
    # balanced.json shares the simulated "eplb" column (same SHA-256); rr.json has its own.
    assert head == ["eplb", "contiguous", "rr"]
    for key in SUMMARY_KEYS:
        assert len(rows[f"sim.{key}"]) == 3
    summaries = read_results(sim["out"]).summaries
    assert rows["sim.iterations"] == [f"{summaries['eplb']['iterations']:,}",
                                      f"{summaries['contiguous']['iterations']:,}", "–"]
    for name in ("balanced.json", "rr.json"):
        path = sim["base"] / name if name == "balanced.json" else sim["out"] / name
        flat, skipped = flatten_metrics(read_placement_json(path).metrics)
        assert flat and "per_layer.load_max_over_mean" in skipped
        for key in flat:
            assert f"metrics.{key}" in rows, key
    assert rows["method"] == ["eplb", "contiguous", "round-robin"]
    assert rows["metrics.load_max_over_mean_median"][1] == "–"  # contiguous was solved in the run
    assert "metrics.per_layer.load_max_over_mean" in page  # named among the arrays left out


def test_placement_heatmaps_hold_the_maps(page, sim):
    shown = dict((label, pid) for pid, label in re.findall(
        r'<div class="sim-plot" id="(plot-placement-\d+)" data-plot="[^"]*" data-placement="([^"]*)"', page))
    files = {"rr": sim["out"] / "rr.json", "eplb": sim["base"] / "balanced.json",
             "contiguous": sim["out"] / "placement-contiguous.json"}  # written by the simulator
    assert set(shown) == set(files)
    for label, path in files.items():
        p2l = read_placement_json(path).placement.physical_to_logical
        start = page.index(f'id="{shown[label]}-figure"')
        assert np.array_equal(_z(page[start:]), p2l)
    assert 'data-placement="eplb"' in page  # the simulated file is shown under its run label


def test_gpu_bars_cover_simulated_and_routed_placements(page):
    start = page.index('id="plot-gpu-bars-figure"')
    call = page[start: page.index("</script>", start)]
    names = re.findall(r'"name":"([^"]+)"', call)
    assert names.count("eplb") == 2 and names.count("contiguous") == 2 and names.count("rr") == 2


def test_default_output_and_no_routing(sim, tmp_path):
    out = tmp_path / "sim"
    shutil.copytree(sim["out"], out)
    assert main(["report", str(out), "--no-scan", "--title", "T & U"]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert _plot_ids(page) == report_plot_ids(2, 0)
    assert "<title>T &amp; U</title>" in page
    assert "No placement files" in page


def test_explicit_placement_and_sweep_directory(sim, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for point in ("gpus4", "gpus4b"):
        shutil.copytree(sim["out"], sweep / point)
    html_path = tmp_path / "sweep.html"
    capsys.readouterr()
    assert main(["report", str(sweep), "-o", str(html_path), "--placement",
                 str(sim["base"] / "balanced.json")]) == 0
    # balanced.json (given) and each point's placement-contiguous.json (recorded by the run)
    assert "4 simulated placement(s), 2 placement file(s)" in capsys.readouterr().out
    page = html_path.read_text(encoding="utf-8")
    assert _plot_ids(page) == report_plot_ids(4, 2)
    head, _ = _methods(page)
    assert head == ["gpus4 / eplb", "gpus4 / contiguous", "gpus4b / eplb", "gpus4b / contiguous"]


def test_placement_detection_by_keys(sim):
    assert is_placement_json(sim["out"] / "rr.json")
    assert not is_placement_json(sim["out"] / "rr-sglang.json")
    assert not is_placement_json(sim["out"] / "metrics.json")
    assert not is_placement_json(sim["trace"])


def test_help_has_an_example(capsys):
    assert main(["report", "--help"]) == 0
    text = capsys.readouterr().out
    assert "Example:" in text and "placer report sim/" in text and "--placement" in text


def _bad(args, capsys) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("placer: error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_exits_2_with_one_line(sim, tmp_path, capsys):
    assert "not found" in _bad(["report", str(tmp_path / "missing")], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a results directory" in _bad(["report", str(empty)], capsys)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x\n")
    assert "is not a directory" in _bad(["report", str(a_file)], capsys)

    broken = tmp_path / "broken"
    shutil.copytree(sim["out"], broken)
    (broken / "metrics.json").write_text('{"schema": "other/1"}\n')
    assert "metrics.json" in _bad(["report", str(broken)], capsys)

    assert "rr-sglang.json" in _bad(["report", str(sim["out"]), "-o", str(tmp_path / "a.html"),
                                     "--placement", str(sim["out"] / "rr-sglang.json")], capsys)

    fake = tmp_path / "fake"
    shutil.copytree(sim["out"], fake)
    doc = json.loads((fake / "rr.json").read_text())
    doc["physical_to_logical_map"][0][0] = 99
    (fake / "rr.json").write_text(json.dumps(doc))
    assert "rr.json" in _bad(["report", str(fake), "-o", str(tmp_path / "b.html")], capsys)

    other = tmp_path / "other.npz"
    assert main(["synth", "--model", "olmoe-1b-7b", "--tokens", "50", "-o", str(other)]) == 0
    err = _bad(["report", str(sim["out"]), "-o", str(tmp_path / "c.html"), "--routing", str(other)],
               capsys)
    assert "other.npz" in err and "contradicts" in err
    assert "no placement file" in _bad(["report", str(sim["out"]), "-o", str(tmp_path / "d.html"),
                                        "--no-scan", "--routing", str(sim["trace"])], capsys)
    assert not any((tmp_path / f"{n}.html").exists() for n in "abcd")


def test_library_rejects_routing_of_another_shape(sim, tmp_path):
    from placer.app.report import render_full_report
    from placer.errors import InvalidInputError
    from placer.presets import get_model
    from placer.synthetic import synthesize_trace

    other = synthesize_trace(get_model("olmoe-1b-7b"), 20, seed=0)
    with pytest.raises(InvalidInputError, match="16 MoE layers x 64 experts"):
        render_full_report(sim["out"], tmp_path / "x.html", routing=other)
    assert not (tmp_path / "x.html").exists()
