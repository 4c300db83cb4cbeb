"""HTML report of simulator results: every plot present, plotly.js inlined once, labels escaped."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from test_results import LABELS, make_inputs, make_runs

from placer.display import MISSING
from placer.errors import InvalidInputError
from placer.simulator.report import plot_ids, render_report
from placer.simulator.results import SUMMARY_KEYS, read_results, write_results

BUNDLE = re.compile(r"<script>/\*\*\s*\* plotly\.js v.*?</script>", re.S)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "serving"
    write_results(out, make_inputs(), make_runs())
    return out


@pytest.fixture(scope="module")
def page(results_dir, tmp_path_factory):
    html_path = tmp_path_factory.mktemp("html") / "report.html"
    render_report(str(results_dir), html_path, title="A & B")
    return html_path.read_text(encoding="utf-8")


def _plot_div_ids(page: str) -> list[str]:
    return re.findall(r'<div class="sim-plot" id="([^"]+)"', page)


def test_every_plot_is_present_once_in_order(page):
    assert plot_ids(2) == ["plot-latency-cdf", "plot-layer-phases-0", "plot-layer-phases-1",
                           "plot-gpu-load-0", "plot-gpu-load-1", "plot-links-0", "plot-links-1"]
    assert _plot_div_ids(page) == plot_ids(2)
    for pid in plot_ids(2):  # each wrapper holds its plotly div and the call that draws it
        assert page.count(f'id="{pid}-figure"') == 1
        assert f'document.getElementById("{pid}-figure")' in page
    assert 'data-source="requests"' in page
    assert 'id="sim-summary"' in page and 'id="sim-inputs"' in page
    assert "<title>A &amp; B</title>" in page


def test_plotly_js_is_inlined_once_and_nothing_is_fetched(page):
    assert len(BUNDLE.findall(page)) == 1
    assert page.index("plotly.js v") < page.index('id="plot-latency-cdf-figure"')
    assert not re.search(r"<script[^>]*\ssrc\s*=", page, re.I)
    assert not re.search(r"<link\b", page, re.I)
    rest = BUNDLE.sub("", page)
    assert "http" not in rest and "cdn" not in rest.lower()


def test_summary_table_lists_every_metric_for_every_placement(page):
    table = page[page.index('<table class="sim-table" id="sim-summary">'):]
    table = table[: table.index("</table>")]
    for key in SUMMARY_KEYS:
        assert f'<th scope="row">{key}</th>' in table
    assert table.count('<th scope="col">') == 2
    assert table.count("<tr>") == 1 + len(SUMMARY_KEYS)


def test_labels_are_escaped_everywhere(page):
    odd = LABELS[1]
    assert odd not in page
    assert "<b>" not in BUNDLE.sub("", page)  # neither in HTML nor in the figures' JSON
    escaped = "odd &lt;b&gt;&quot;x&quot;,&amp;y&lt;/b&gt;"
    assert f'<th scope="col">{escaped}</th>' in page
    assert f'data-placement="{escaped}"' in page
    assert f"<h3>{escaped}</h3>" in page


def test_replay_draws_the_iteration_time_cdf(tmp_path):
    write_results(tmp_path / "replay", make_inputs(), make_runs(replay=True))
    render_report(read_results(tmp_path / "replay"), tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert 'data-source="iterations"' in page and "Iteration time" in page
    assert _plot_div_ids(page) == plot_ids(2)


def test_several_results_are_prefixed_and_extra_sections_appended(results_dir, tmp_path):
    other = tmp_path / "grid1"
    write_results(other, make_inputs(("a", "b")), make_runs(labels=("a", "b")))
    frame = pd.DataFrame({"solver": ["ilp<1>"], "objective": [1.5]})
    render_report([results_dir, ("point-2", other)], tmp_path / "r.html",
                  extra_sections=[("Solver <results>", '<p id="solver-note">raw html</p>'),
                                  ("Table", frame)])
    page = (tmp_path / "r.html").read_text()
    assert _plot_div_ids(page) == plot_ids(4)
    assert '<th scope="col">serving / eplb</th>' in page
    assert '<th scope="col">point-2 / b</th>' in page
    assert '<section class="extra-section" id="extra-0"><h2>Solver &lt;results&gt;</h2>' in page
    assert '<p id="solver-note">raw html</p>' in page
    assert 'id="extra-1"' in page and "ilp&lt;1&gt;" in page
    assert len(BUNDLE.findall(page)) == 1


def test_render_is_deterministic(results_dir, tmp_path):
    render_report(results_dir, tmp_path / "a.html")
    render_report(read_results(results_dir), tmp_path / "b.html")
    assert (tmp_path / "a.html").read_bytes() == (tmp_path / "b.html").read_bytes()


def test_bad_results_directory_is_one_clear_error(tmp_path):
    with pytest.raises(InvalidInputError, match="results directory not found"):
        render_report(tmp_path / "missing", tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def _rows(page: str, table_id: str) -> dict[str, list[str]]:
    table = page[page.index(f'id="{table_id}"'):]
    table = table[: table.index("</table>")]
    return {m.group(1): [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", m.group(2))]
            for m in re.finditer(r'<tr><th scope="row">(.*?)</th>(.*?)</tr>', table)}


def test_replay_summary_has_no_empty_rows_and_values_carry_units(tmp_path):
    write_results(tmp_path / "replay", make_inputs(), make_runs(replay=True))
    render_report(tmp_path / "replay", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    rows = _rows(page, "sim-summary")
    assert all(set(cells) != {MISSING} for cells in rows.values())
    left_out = [f"{m}_p{q}_s" for m in ("ttft", "tpot", "e2e") for q in (50, 90, 99)]
    left_out += ["output_tok_s", "requests", "requests_finished"]
    assert not set(left_out) & set(rows) and len(rows) == len(SUMMARY_KEYS) - len(left_out)
    note = page[page.index('id="sim-summary-empty"'):]
    assert all(f"<code>{k}</code>" in note[: note.index("</p>")] for k in left_out)
    # summary values 0, 1, 2 ... by key order, times the placement's scale (1 and 2)
    index = {k: i for i, k in enumerate(SUMMARY_KEYS)}
    assert rows["a2a_p99_s"] == [f"{index['a2a_p99_s']:.2f} s", f"{2 * index['a2a_p99_s']:.2f} s"]  # 4 digits
    assert rows["nvlink_bytes"][0] == f"{index['nvlink_bytes']:.4g} B"


def test_three_iterations_are_too_short_for_their_percentiles(page, tmp_path):
    assert 'id="note-short-run"' in page and "2 requests each" in page  # serving: 2 requests
    write_results(tmp_path / "replay", make_inputs(), make_runs(replay=True))
    render_report(tmp_path / "replay", tmp_path / "r.html")
    replay = (tmp_path / "r.html").read_text()
    note = replay[replay.index('id="note-short-run"'):]
    assert "3 iterations each" in note[: note.index("</p>")]


def test_links_without_rdma_traffic_say_so_instead_of_a_blank_heatmap(tmp_path):
    runs = make_runs()
    for run in runs:
        links = run.tables["links"]
        run.tables["links"] = links[links["kind"] == "nvlink"].reset_index(drop=True)
    inputs = make_inputs()
    inputs["topology"] = {"num_nodes": 1, "gpus_per_node": 4}
    write_results(tmp_path / "one-node", inputs, runs)
    render_report(tmp_path / "one-node", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert '<p class="note" id="note-links-0">single node: no RDMA traffic</p>' in page
    call = page[page.index('id="plot-links-0-figure"'):]
    call = call[: call.index("</script>")]
    assert "NVLink bytes" in call and "RDMA bytes" not in call


def test_lead_sections_come_before_the_summary(results_dir, tmp_path):
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    render_report(results_dir, tmp_path / "r.html",
                  lead_sections=[("First", ['<p id="lead-note">n</p>', (fig, "plot-first", "first")])])
    page = (tmp_path / "r.html").read_text()
    assert page.index('id="lead-0"') < page.index('id="lead-note"') < page.index('id="sim-summary"')
    assert _plot_div_ids(page) == ["plot-first", *plot_ids(2)]
    assert len(BUNDLE.findall(page)) == 1 and page.index("plotly.js v") < page.index('id="plot-first-figure"')
