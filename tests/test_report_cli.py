"""`placer report`: the simulator's results plus solver placement files in one offline HTML page."""

from __future__ import annotations

import base64
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from placer.app.report import flatten_metrics, is_placement_json, report_plot_ids
from placer.app.report_methods import is_internal
from placer.cli import main
from placer.display import MISSING
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


def _table(page: str, table_id: str) -> dict[str, list[str]]:
    """{row header: cell texts (tags stripped)} of ``<table id=table_id>``."""
    table = page[page.index(f'id="{table_id}"'):]
    table = table[: table.index("</table>")]
    return {m.group(1): [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", m.group(2))]
            for m in re.finditer(r'<tr><th scope="row">(.*?)</th>(.*?)</tr>', table)}


def _figure_call(page: str, plot_id: str) -> str:
    """The script that draws plot ``plot_id``."""
    start = page.index(f'id="{plot_id}-figure"')
    return page[start: page.index("</script>", start)]


def _traces(page: str, plot_id: str) -> list[dict]:
    """The traces plotly draws in plot ``plot_id`` (the data argument of its newPlot call)."""
    call = _figure_call(page, plot_id)
    start = call.index("[", call.index(f'"{plot_id}-figure",'))
    return json.JSONDecoder().raw_decode(call[start:])[0]


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
    summaries = read_results(sim["out"]).summaries
    empty = page[page.index("No value for any method"):]
    empty = empty[: empty.index("</p>")]
    for key in SUMMARY_KEYS:  # a row, or named among the metrics no method has (replay: TTFT...)
        if all(s[key] is None for s in summaries.values()):
            assert f"sim.{key}" not in rows and f"<code>sim.{key}</code>" in empty
        else:
            assert len(rows[f"sim.{key}"]) == 3
    assert rows["sim.iterations"] == [f"{summaries['eplb']['iterations']:,}",
                                      f"{summaries['contiguous']['iterations']:,}", MISSING]
    for name in ("balanced.json", "rr.json"):
        path = sim["base"] / name if name == "balanced.json" else sim["out"] / name
        flat, skipped = flatten_metrics(read_placement_json(path).metrics)
        assert flat and "per_layer.load_max_over_mean" in skipped
        for key, value in flat.items():
            if is_internal(key):  # repeats a file row (num_gpus, model ...) or a solver internal
                assert f"metrics.{key}" not in rows, key
            elif value is not None:
                assert f"metrics.{key}" in rows, key
    assert rows["method"] == ["eplb", "contiguous", "round-robin"]
    assert rows["metrics.load_max_over_mean_median"][1] == MISSING  # contiguous was solved in the run
    assert "metrics.per_layer.load_max_over_mean" in page  # named among the arrays left out
    for cells in rows.values():
        assert set(cells) != {MISSING}  # no row that no method has


def test_headline_table_comes_first_with_units_and_every_metric_behind_a_toggle(page):
    headline = _table(page, "report-headline")
    assert list(headline) == ["eplb", "contiguous", "rr"]
    assert page.index('id="report-headline"') < page.index('id="sim-summary"')
    details = page.index('<details id="report-methods-details">')
    assert details < page.index('id="report-methods"') < page.index("</details>", details)
    head = page[page.index('id="report-headline"'):]
    head = re.findall(r'<th scope="col" title="([^"]+)">', head[: head.index("</thead>")])
    assert "a2a_p99_s" in head and "load_max_over_mean_median" in head
    assert "rdma_bytes" not in head and "ttft_p99_s" not in head  # one node; replay
    a2a = [row[head.index("a2a_p99_s")] for row in headline.values()]
    assert all(re.fullmatch(r"\d+(\.\d+)? us", v) for v in a2a[:2]), a2a
    assert a2a[2] == MISSING  # rr.json was not simulated
    # units and significant digits instead of raw floats, in the summary as in the headline
    summary = _table(page, "sim-summary")
    cells = [c for row in (*headline.values(), *summary.values()) for c in row]
    assert not [c for c in cells if re.search(r"\de[+-]\d", c)]
    assert summary["nvlink_bytes"][0].endswith(" MB") and summary["straggler_share"][0].endswith("%")


def test_replay_summary_has_no_empty_rows_and_says_which_are_left_out(page):
    summary = _table(page, "sim-summary")
    assert "iteration_p99_s" in summary
    for key in ("ttft_p99_s", "tpot_p50_s", "e2e_p99_s", "output_tok_s", "requests"):
        assert key not in summary, key
    assert all(set(cells) != {MISSING} for cells in summary.values())
    note = page[page.index('id="sim-summary-empty"'):]
    assert "replay: no requests" in note[: note.index("</p>")] and "<code>ttft_p99_s</code>" in note


def test_solver_internals_are_left_out_of_the_methods_tables(sim, tmp_path):
    out = tmp_path / "sim"
    shutil.copytree(sim["out"], out)
    doc = json.loads((out / "rr.json").read_text())
    doc["metrics"]["objective"] = {"value": 1.5, "terms": {"balance": 1.25, "start_eplb": 1.75,
                                                           "returned_start": 0.0}}
    (out / "rr.json").write_text(json.dumps(doc))
    assert main(["report", str(out), "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    rows = _table(page, "report-methods")
    assert rows["metrics.objective.terms.balance"][-1] == "1.250"
    assert "metrics.objective.terms.start_eplb" not in rows
    assert "metrics.objective.terms.returned_start" not in rows
    assert "metrics.num_gpus" not in rows and rows["GPUs"] == ["4", "4", "4"]
    assert "start_eplb" not in page[: page.index('id="report-methods-details"')]


def test_a_short_run_says_its_percentiles_are_the_largest_sample(page):
    note = page[page.index('id="note-short-run"'):]
    note = note[: note.index("</p>")]
    assert "Too short for its percentiles" in note and "3 iterations each" in note
    assert all(t["line"]["shape"] == "hv" for t in _traces(page, "plot-latency-cdf"))  # staircase


def test_one_node_draws_no_rdma_heatmap_and_two_nodes_do(page, sim, tmp_path):
    assert [t["type"] for t in _traces(page, "plot-links-0")] == ["heatmap"]
    call = _figure_call(page, "plot-links-0")
    assert "RDMA" not in call and "NVLink bytes" in call
    assert '<p class="note" id="note-links-0">single node: no RDMA traffic</p>' in page

    out = tmp_path / "two-nodes"
    assert main(["simulate", "run", str(sim["trace"]), "--gpus", "4", "--nodes", "2", "--method",
                 "contiguous", "--workload", "replay", "--iterations", "2", "-o", str(out)]) == 0
    two = (out / "report.html").read_text(encoding="utf-8")
    assert [t["type"] for t in _traces(two, "plot-links-0")] == ["heatmap", "heatmap"]
    assert "RDMA bytes" in _figure_call(two, "plot-links-0")
    assert 'id="note-links-0"' not in two


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


def test_sweep_report_charts_headline_metrics_against_gpu_count(sim, tmp_path):
    out = tmp_path / "sweep"
    assert main(["simulate", "sweep", str(sim["trace"]), "--gpus", "4,8", "--method", "contiguous",
                 "--method", "eplb", "--workload", "replay", "--iterations", "2", "-o", str(out)]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    ids = _plot_ids(page)
    assert ids[0] == "plot-sweep-gpus" and "plot-sweep-rate" not in ids
    assert page.index('id="plot-sweep-gpus"') < page.index('id="report-headline"')
    assert 'id="note-sweep-rate">One request rate (replay has none)' in page
    traces = _traces(page, "plot-sweep-gpus")
    panels = {t.get("yaxis", "y") for t in traces}
    assert len(panels) >= 5  # throughput, step p99, all-to-all p99, straggler share, link use
    first = [t for t in traces if t.get("yaxis", "y") == "y"]  # throughput
    assert [t["name"] for t in first] == ["contiguous", "eplb"]
    table = pd.read_csv(out / "sweep.csv")
    for t in first:
        assert list(_array(t["x"])) == [4, 8]
        rows = table[table["placement"] == t["name"]].sort_values("gpus")
        assert np.allclose(_array(t["y"]), rows["throughput_tok_s"])
    assert BUNDLE.findall(page) and page.index("plotly.js v") < page.index('id="plot-sweep-gpus-figure"')


def test_sweep_report_charts_against_rate_one_line_per_gpu_count(sim, tmp_path):
    sweep = tmp_path / "sweep"
    for gpus in (4, 8):
        for rate in (2.0, 8.0):
            point = sweep / f"gpus{gpus}-rate{rate:g}"
            shutil.copytree(sim["out"], point)
            doc = json.loads((point / "metrics.json").read_text())
            doc["inputs"]["topology"]["gpus_per_node"] = gpus
            doc["inputs"]["workload"] = {"kind": "serving", "rate": rate}
            (point / "metrics.json").write_text(json.dumps(doc))
    assert main(["report", str(sweep), "-o", str(tmp_path / "r.html"), "--no-scan"]) == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert _plot_ids(page)[:2] == ["plot-sweep-gpus", "plot-sweep-rate"]
    names = [t["name"] for t in _traces(page, "plot-sweep-rate") if t.get("yaxis", "y") == "y"]
    assert names == ["eplb, gpus 4", "eplb, gpus 8", "contiguous, gpus 4", "contiguous, gpus 8"]
    for t in _traces(page, "plot-sweep-rate"):
        assert list(_array(t["x"])) == [2.0, 8.0]


def _array(v) -> np.ndarray:
    """A trace's x or y: a list, or plotly >= 6's typed array."""
    if isinstance(v, dict):
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
    return np.asarray(v, dtype=np.float64)
