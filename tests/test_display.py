"""placer.display: the one number formatter, placeholder, table writer and JSON normaliser."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from placer.display import (
    MISSING,
    format_html,
    format_value,
    is_missing,
    json_text,
    json_value,
    key_value_table,
    significant,
    table,
    unit_of,
)


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("load_max_over_mean_median", 1.2, "1.200"),  # 4 significant digits, trailing zeros kept
    ("inter_node_nodes_per_token_layer", 0.404, "0.4040"),
    ("tokens", 12622, "12,622"),
    ("x", 12622.4, "12,622"),
    ("x", 2.5e-5, "2.500e-05"),
    ("x", 0.0, "0"),
    ("a2a_p99_s", 3.291e-05, "32.91 us"),
    ("solve_seconds", 2.3421, "2.342 s"),
    ("metrics.holdout.solve_seconds", 0.0, "0 s"),
    ("nvlink_bytes", 6.822e8, "682.2 MB"),
    ("rdma_bytes", 512, "512 B"),
    ("throughput_tok_s", 54415.2, "54,415 tok/s"),
    ("deepep_dispatch_gbps", 63.95, "63.95 GB/s"),
    ("frac_token_slots_off_gpu", 0.6119, "61.2%"),
    ("gap", 0.092, "9.20%"),
    ("gap", 0.0, "0%"),
    ("straggler_share", 0.344, "34.4%"),
    ("x", True, "true"),
    ("x", np.float32(1.5), "1.500"),
    ("x", np.int64(7), "7"),
    ("x", "text", "text"),
    ("x", None, MISSING),
    ("x", float("nan"), MISSING),
    ("x", math.inf, "inf"),
])
def test_format_value(key, value, shown):
    assert format_value(key, value) == shown


def test_more_digits_when_asked():
    assert format_value("load_cap", 1.01723, digits=5) == "1.0172"
    assert significant(0.421024, 5) == "0.42102"


def test_units_come_from_the_last_key_component():
    assert unit_of("metrics.holdout.a2a_p99_s") == "time"
    assert unit_of("dispatch_us") is None  # already in us: shown as a plain number
    assert unit_of("nvlink_bytes_per_token_layer") == "bytes"
    assert unit_of("max_link_utilisation") == "percent"


def test_one_placeholder_for_missing_everywhere():
    assert is_missing(None) and is_missing(float("nan")) and is_missing(np.float64("nan"))
    assert not is_missing(0) and not is_missing("")
    assert format_html("a2a_p99_s", None) == MISSING
    assert format_html("a2a_p99_s", 3.291e-05) == '<span title="3.291e-05">32.91 us</span>'
    assert format_html("label", "<b>") == "&lt;b&gt;"


def test_table_aligns_columns_and_keeps_headings_out_of_the_widths():
    text = table([["eplb", "1.200"], "[a long section heading]", ["placer", "12.50"]],
                 header=["method", "load"])
    assert text.splitlines() == ["method   load",
                                 "------  -----",
                                 "eplb    1.200",
                                 "[a long section heading]",
                                 "placer  12.50"]
    assert table([["a", "b"]], align="rl").splitlines() == ["a  b"]
    assert table([["k", "1"], ["key", "22"]], header=["x", "y"], rule=False).splitlines()[1] == "k     1"
    assert key_value_table({"ep": 16, "kernel": "deepep-ll"}).splitlines() == ["ep      16", "kernel  deepep-ll"]


def test_json_value_is_strict_plain_json():
    doc = {"inf": math.inf, "nan": float("nan"), "neg": -math.inf, "f32": np.float32(0.5), "i": np.int32(3),
           "b": np.bool_(True), "arr": np.arange(3), "t": (1, 2), 5: "key", "p": Path("x/y")}
    plain = json_value(doc)
    assert plain == {"inf": None, "nan": None, "neg": None, "f32": 0.5, "i": 3, "b": True, "arr": [0, 1, 2],
                     "t": [1, 2], "5": "key", "p": "x/y"}
    assert type(plain["i"]) is int and type(plain["f32"]) is float
    assert json.loads(json_text(doc)) == plain  # never NaN or Infinity in the text
    with pytest.raises(TypeError, match="set"):
        json_value({"s": {1, 2}})


def test_every_json_writer_uses_the_one_normaliser():
    """The placement file, the simulator's results and every --json agree on infinity (null)."""
    from placer.errors import InvalidInputError
    from placer.io.placements import _jsonable

    assert _jsonable({"x": math.inf, "y": np.float64(2.0)}, "p.json") == {"x": None, "y": 2.0}
    with pytest.raises(InvalidInputError, match="cannot store in JSON"):
        _jsonable({"s": object()}, "p.json")
