"""Results directory of the simulator: round trip, layout, and one clear error per bad input."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pandas as pd
import pytest

from placer import __version__
from placer.errors import InvalidInputError
from placer.simulator.results import (
    SCHEMA,
    SUMMARY_KEYS,
    TABLES,
    RunOutput,
    read_results,
    sha256_of,
    write_results,
)

LABELS = ("eplb", 'odd <b>"x",&y</b>')
FILES = ("metrics.json", *(f"{name}.csv" for name in TABLES))


def make_inputs(labels=LABELS) -> dict:
    return {"model": {"name": "tiny", "num_experts": 8}, "topology": {"nodes": 2, "gpus_per_node": 2},
            "routing": {"source": "synthetic:tiny", "sha256": None, "tokens": 96},
            "placements": {lb: {"path": f"{i}.json", "sha256": "ab" * 32, "method": None}
                           for i, lb in enumerate(labels)},
            "workload": {"kind": "serving", "rate_per_s": 4.0},
            "config": {"execution": "standard", "kernel": "deepep-normal", "seed": 0}}


def make_run(label: str, k: int, *, replay: bool = False) -> RunOutput:
    """A small hand-built run: 3 iterations, 2 MoE layers, 4 GPUs, 2 requests (one unfinished)."""
    s = 1.0 + k  # makes the two placements differ
    iterations = pd.DataFrame({
        "iteration": [0, 1, 2], "start_s": [0.0, 0.011 * s, 0.023 * s],
        "duration_s": [0.011 * s, 0.012 * s, 0.0105 * s], "tokens": [48, 32, 16],
        "prefill_tokens": [40, 0, 0], "decode_tokens": [8, 32, 16],
        "attention_s": [0.002, 0.002, 0.001], "dispatch_s": [0.003 * s, 0.003, 0.0031],
        "compute_s": [0.004, 0.0041, 0.0042], "combine_s": [0.0015, 0.0016, 0.0017 * s],
        "other_s": [0.0005, 0.0005, 0.0005]})
    layers = pd.DataFrame({
        "layer": [0, 1], "dispatch_s": [0.0015, 0.0016 * s], "compute_s": [0.002, 0.0021],
        "combine_s": [0.0008, 0.0009], "attention_s": [0.001, 0.001],
        "dispatch_p99_s": [0.002, 0.0022 * s], "combine_p99_s": [0.001, 0.0012],
        "straggler_rank": [3, k], "straggler_share": [0.67, 1 / 3]})
    requests = pd.DataFrame({
        "request": [0, 1], "rank": [0, 2], "arrival_s": [0.0, 0.004], "prompt_tokens": [24, 16],
        "output_tokens": [5, 3], "first_token_s": [0.011 * s, 0.023 * s],
        "finish_s": [0.034 * s, np.nan], "ttft_s": [0.011 * s, 0.019 * s],
        "tpot_s": [0.0115, 0.012 * s], "e2e_s": [0.034 * s, np.nan]})
    if replay:
        requests = requests.iloc[:0]
    gpu_load = pd.DataFrame({"layer": np.repeat([0, 1], 4), "gpu": np.tile(np.arange(4), 2),
                             "pairs": [20.0, 12.5, 8.0, 7.5 + k, 11.0, 13.0, 12.0, 12.0]})
    links = pd.DataFrame({"src": [0, 1, 0, 2], "dst": [1, 0, 2, 0],
                          "kind": ["nvlink", "nvlink", "rdma", "rdma"],
                          "bytes": [7168.0 * s, 3584.0, 14336.0, 14336.0 * s],
                          "busy_s": [1e-6, 5e-7, 2e-5, 2e-5], "utilisation": [3e-5, 1.5e-5, 6e-4, 6e-4]})
    summary = {key: float(i) * s for i, key in enumerate(SUMMARY_KEYS)}
    summary.update(iterations=3, requests=0 if replay else 2, requests_finished=0 if replay else 1,
                   straggler_rank=3, output_tok_s=None if replay else 40.5)
    if replay:
        summary.update({f"{m}_p{q}_s": None for m in ("ttft", "tpot", "e2e") for q in (50, 90, 99)})
    return RunOutput(label, summary, {"iterations": iterations, "layers": layers,
                                      "requests": requests, "gpu_load": gpu_load, "links": links})


def make_runs(*, replay: bool = False, labels=LABELS) -> list[RunOutput]:
    return [make_run(lb, k, replay=replay) for k, lb in enumerate(labels)]


@pytest.fixture
def written(tmp_path):
    out = tmp_path / "res"
    runs = make_runs()
    write_results(out, make_inputs(), runs)
    return out, runs


# --------------------------------------------------------------------------------------------
# Round trip and layout
# --------------------------------------------------------------------------------------------

def test_round_trip_keeps_labels_summaries_inputs_and_tables(written):
    out, runs = written
    res = read_results(out)
    assert res.labels == list(LABELS)
    assert res.inputs == make_inputs()
    assert res.summaries == {run.label: run.summary for run in runs}
    for name, columns in TABLES.items():
        assert list(res.tables[name].columns) == ["placement", *columns]
        assert res.tables[name]["placement"].tolist() == [
            run.label for run in runs for _ in range(len(run.tables[name]))]
        for run in runs:
            pd.testing.assert_frame_equal(res.rows(name, run.label), run.tables[name],
                                          check_exact=True)


def test_layout_files_metrics_header_and_empty_finish_field(written):
    out, _ = written
    assert sorted(os.listdir(out)) == sorted(FILES)  # no temp files left behind
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["schema"] == SCHEMA and metrics["placer_version"] == __version__
    assert list(metrics) == ["schema", "placer_version", "inputs", "placements"]
    assert list(metrics["placements"]) == list(LABELS)
    assert list(metrics["placements"]["eplb"])[: len(SUMMARY_KEYS)] == list(SUMMARY_KEYS)
    lines = (out / "requests.csv").read_text().splitlines()
    assert lines[0] == "placement," + ",".join(TABLES["requests"])
    assert lines[2].split(",")[7] == ""  # unfinished request: finish_s is empty


def test_write_is_deterministic_and_overwrites(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_results(a, make_inputs(), make_runs())
    write_results(b, make_inputs(), make_runs(replay=True))
    write_results(b, make_inputs(), make_runs())  # an older result is replaced
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_replay_has_header_only_requests_and_null_latencies(tmp_path):
    write_results(tmp_path / "r", make_inputs(), make_runs(replay=True))
    assert (tmp_path / "r" / "requests.csv").read_text().count("\n") == 1
    res = read_results(tmp_path / "r")
    req = res.tables["requests"]
    assert req.empty and list(req.columns) == ["placement", *TABLES["requests"]]
    assert req["request"].dtype == np.int64 and req["ttft_s"].dtype == np.float64
    assert res.summaries["eplb"]["ttft_p99_s"] is None


def test_writer_normalises_column_order_and_numpy_values(tmp_path):
    runs = make_runs()
    runs[0].tables["links"] = runs[0].tables["links"][::-1].iloc[:, ::-1]
    runs[0].summary["tokens"] = np.int64(96)
    runs[0].summary["simulated_s"] = np.float32(0.5)
    runs[0].summary["max_link_utilisation"] = float("nan")
    runs[0].summary = {"zz_extra": 1, **dict(reversed(runs[0].summary.items()))}
    write_results(tmp_path / "o", make_inputs(), runs)
    res = read_results(tmp_path / "o")
    assert list(res.tables["links"].columns) == ["placement", *TABLES["links"]]
    assert res.rows("links", "eplb")["src"].tolist() == [2, 0, 1, 0]
    assert res.summaries["eplb"]["tokens"] == 96 and res.summaries["eplb"]["simulated_s"] == 0.5
    assert res.summaries["eplb"]["max_link_utilisation"] is None
    assert list(res.summaries["eplb"]) == [*SUMMARY_KEYS, "zz_extra"]


def _dup_label(runs, inputs):
    runs[1].label = runs[0].label


def _drop_summary_key(runs, inputs):
    del runs[0].summary["a2a_p99_s"]


def _extra_column(runs, inputs):
    runs[0].tables["layers"]["placement"] = "eplb"


def _missing_table(runs, inputs):
    del runs[1].tables["gpu_load"]


def _fractional_int(runs, inputs):
    runs[0].tables["iterations"]["tokens"] = [48.0, 32.5, 16.0]


def _bad_kind(runs, inputs):
    runs[0].tables["links"].loc[0, "kind"] = "pcie"


def _duplicate_row(runs, inputs):
    runs[0].tables["gpu_load"].loc[1, "gpu"] = 0


def _inputs_labels(runs, inputs):
    del inputs["placements"]["eplb"]


def _inputs_key(runs, inputs):
    del inputs["workload"]


def _not_json(runs, inputs):
    runs[0].summary["tokens"] = object()


@pytest.mark.parametrize("spoil, words", [
    (_dup_label, "appears more than once"), (_drop_summary_key, "lacks a2a_p99_s"),
    (_extra_column, "differ from"), (_missing_table, "table is missing"),
    (_fractional_int, "non-integer"), (_bad_kind, "'pcie'"), (_duplicate_row, "more than one row"),
    (_inputs_labels, "inputs.placements"), (_inputs_key, "inputs lack workload"),
    (_not_json, "not JSON-serialisable"),
])
def test_writer_rejects_bad_runs_and_writes_nothing(tmp_path, spoil, words):
    runs, inputs = make_runs(), make_inputs()
    spoil(runs, inputs)
    with pytest.raises(InvalidInputError, match=words) as info:
        write_results(tmp_path / "o", inputs, runs)
    assert str(tmp_path / "o") in info.value.source
    assert not (tmp_path / "o").exists()


def test_writer_rejects_no_runs(tmp_path):
    with pytest.raises(InvalidInputError, match="no placement runs"):
        write_results(tmp_path / "o", make_inputs(()), [])


# --------------------------------------------------------------------------------------------
# Reader errors: one line naming the file
# --------------------------------------------------------------------------------------------

def _cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep(path.stat().st_size)])


@pytest.mark.parametrize("name, spoil, words", [
    ("metrics.json", lambda p: p.unlink(), "file not found"),
    ("metrics.json", lambda p: p.write_text(p.read_text()[:200]), "truncated"),
    ("metrics.json", lambda p: p.write_text(""), "empty"),
    ("metrics.json", lambda p: p.write_text('{"schema": "placer-sim-results/9"}'), "schema"),
    ("metrics.json", lambda p: p.write_text("[1, 2]"), "no schema"),
    ("metrics.json", lambda p: p.write_text(p.read_text().replace('"a2a_p50_s"', '"x"')),
     "lacks a2a_p50_s"),
    ("layers.csv", lambda p: p.unlink(), "file not found"),
    ("iterations.csv", lambda p: _cut(p, lambda n: n - 2), "truncated"),  # mid-number
    ("iterations.csv", lambda p: _cut(p, lambda n: n // 2), "truncated"),
    ("gpu_load.csv", lambda p: p.write_text("placement,layer,gpu\n"), "differ from"),
    ("links.csv", lambda p: p.write_text(p.read_text().replace("eplb", "other")),
     "'other' is not listed"),
    ("links.csv", lambda p: p.write_text(p.read_text().replace("rdma", "ib")), "'ib'"),
    ("requests.csv", lambda p: p.write_text(p.read_text().replace(",24,", ",x,")), "truncated"),
])
def test_reader_bad_file_gives_one_line_naming_it(written, name, spoil, words):
    out, _ = written
    spoil(out / name)
    with pytest.raises(InvalidInputError, match=words) as info:
        read_results(out)
    assert info.value.source == str(out / name)
    assert "\n" not in str(info.value)


def test_reader_missing_or_non_directory(tmp_path):
    with pytest.raises(InvalidInputError, match="results directory not found") as info:
        read_results(tmp_path / "nope")
    assert info.value.source == str(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="not a results directory"):
        read_results(tmp_path / "file")


def test_sha256_of(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "p.json").write_bytes(data)
    assert sha256_of(tmp_path / "p.json") == hashlib.sha256(data).hexdigest()
    with pytest.raises(InvalidInputError, match="file not found") as info:
        sha256_of(tmp_path / "missing.json")
    assert info.value.source == str(tmp_path / "missing.json")
