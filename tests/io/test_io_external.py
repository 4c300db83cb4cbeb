"""HD-MoE JSON, R3 (npy and base64), Megatron JSONL and load matrices (CSV, npz)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from io_helpers import random_ids

from placer.errors import InvalidInputError
from placer.io import detect_format, read_input, read_trace
from placer.types import ModelSpec


def _hdmoe(path, ids):
    path.write_text(json.dumps({str(layer): ids[:, layer].tolist() for layer in range(ids.shape[1])}))


# ---------------------------------------------------------------------------- HD-MoE


def test_hdmoe_round_trip(tmp_path, rng):
    ids = random_ids(rng, 20, 3, 8, 2)
    p = tmp_path / "experts_x.json"
    _hdmoe(p, ids)
    assert detect_format(p) == "hdmoe-json"
    t = read_trace(p)
    np.testing.assert_array_equal(t.expert_ids, ids)
    assert t.order == "sorted" and t.num_experts == int(ids.max()) + 1 and t.model is None
    m = ModelSpec.from_shape(3, 16, 2, name="m")
    t = read_trace(p, model=m)
    assert t.num_experts == 16 and t.model == m
    inp = read_input(p, model=m, chunk_tokens=8)
    assert [c.num_tokens for c in inp.chunks()] == [8, 8, 4]


def test_hdmoe_errors(tmp_path, rng):
    ids = random_ids(rng, 6, 3, 8, 2)
    p = tmp_path / "h.json"
    _hdmoe(p, ids)
    with pytest.raises(InvalidInputError, match=r"layer count 3 does not match m \(4 MoE layers\)") as exc:
        read_input(p, model=ModelSpec.from_shape(4, 8, 2, name="m"))
    assert str(p) in str(exc.value)
    with pytest.raises(InvalidInputError, match="top_k 2 does not match"):
        read_input(p, model=ModelSpec.from_shape(3, 8, 3, name="m"))
    with pytest.raises(InvalidInputError, match=r"expert id 7 out of range \[0, 4\) for m"):
        read_input(p, model=ModelSpec.from_shape(3, 4, 2, name="m"))
    doc = {"0": [[0, 1], [1, 2]], "1": [[0, 1]]}
    p.write_text(json.dumps(doc))
    with pytest.raises(InvalidInputError, match="layer 1 has 1 tokens, layer 0 has 2"):
        read_input(p)
    p.write_text(json.dumps({"0": [[0, 1]], "2": [[0, 1]]}))
    with pytest.raises(InvalidInputError, match="layer 1 is missing"):
        read_input(p)
    p.write_text(json.dumps({"0": [[0, 1], [2]]}))
    with pytest.raises(InvalidInputError, match="ragged"):
        read_input(p)
    p.write_text(json.dumps({"0": [[0, 0], [1, 2]]}))
    with pytest.raises(InvalidInputError, match="same expert twice"):
        read_input(p)


# ---------------------------------------------------------------------------- R3


def test_r3_npy_drops_dense_layers(tmp_path, rng, tiny):
    full = random_ids(rng, 12, tiny.num_hidden_layers, 8, 2).astype(np.int32)
    p = tmp_path / "routed.npy"
    np.save(p, full)
    assert detect_format(p) == "r3-npy"
    t = read_trace(p, model=tiny)
    np.testing.assert_array_equal(t.expert_ids, full[:, 1:])
    assert t.model == tiny and t.order == "sorted"
    # the MoE-only shape is kept as is
    np.save(p, full[:, 1:])
    np.testing.assert_array_equal(read_trace(p, model=tiny).expert_ids, full[:, 1:])
    # without a model every layer is taken as MoE
    np.save(p, full)
    assert read_trace(p).num_layers == 4
    np.save(p, full[:, :2])
    with pytest.raises(InvalidInputError, match=r"layer count 2 does not match tiny \(3 MoE layers of 4 hidden"):
        read_input(p, model=tiny)
    np.save(p, full[:, :, 0])
    with pytest.raises(InvalidInputError, match="expected \\[tokens, layers, top_k\\]"):
        read_input(p)


def test_r3_base64(tmp_path, rng, tiny):
    a = random_ids(rng, 5, 4, 8, 2).astype("<i4")
    b = random_ids(rng, 3, 4, 8, 2).astype("<i4")
    p = tmp_path / "routed.b64"
    p.write_text(base64.b64encode(a.tobytes()).decode() + "\n\n" + base64.b64encode(b.tobytes()).decode() + "\n")
    assert detect_format(p) == "r3-base64"
    t = read_trace(p, model=tiny)
    np.testing.assert_array_equal(t.expert_ids, np.concatenate([a, b])[:, 1:])
    np.testing.assert_array_equal(t.request_ids, [0] * 5 + [1] * 3)
    with pytest.raises(InvalidInputError, match="--model") as exc:
        read_input(p)
    assert str(p) in str(exc.value)
    p.write_text(base64.b64encode(a.tobytes()[:-4]).decode())
    with pytest.raises(InvalidInputError, match="not a whole number of tokens"):
        read_input(p, model=tiny)
    p.write_text("@@@not base64@@@")
    with pytest.raises(InvalidInputError):
        read_input(p, model=tiny, format="r3-base64")


# ---------------------------------------------------------------------------- Megatron


def _megatron(path, steps, layers, mtp=True):
    lines = []
    for step, ids in enumerate(steps):
        for i, layer in enumerate(layers):
            lines.append({"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": 0,
                          "num_tokens": ids.shape[0], "topk": ids.shape[2], "top_indices": ids[:, i].tolist()})
        if mtp:
            lines.append({"step": step, "stage": "pre_dispatch", "block": "mtp", "layer": 0, "mtp_idx": 0,
                          "rank": 0, "num_tokens": 1, "topk": 2, "top_indices": [[0, 1]]})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_megatron_round_trip(tmp_path, rng, tiny):
    steps = [random_ids(rng, 4, 3, 8, 2), random_ids(rng, 6, 3, 8, 2)]
    p = tmp_path / "router_trace_rank0.jsonl"
    _megatron(p, steps, [1, 2, 3])
    assert detect_format(p) == "megatron-jsonl"
    t = read_trace(p, model=tiny)
    np.testing.assert_array_equal(t.expert_ids, np.concatenate(steps))
    assert t.model == tiny and t.order == "sorted"
    assert read_trace(p).num_layers == 3


def test_megatron_errors(tmp_path, rng, tiny):
    p = tmp_path / "router_trace_rank0.jsonl"
    _megatron(p, [random_ids(rng, 4, 3, 8, 2)], [0, 1, 2])
    with pytest.raises(InvalidInputError, match="layer 0 is not a MoE layer of tiny") as exc:
        read_input(p, model=tiny)
    assert str(p) in str(exc.value)
    _megatron(p, [random_ids(rng, 4, 3, 8, 2), random_ids(rng, 4, 3, 8, 2)], [1, 2, 3])
    lines = p.read_text().splitlines()
    p.write_text("\n".join(x for x in lines if not ('"step": 1' in x and '"layer": 3' in x)))
    with pytest.raises(InvalidInputError, match="step 1 .* lacks layer 3"):
        read_input(p, model=tiny)
    rec = {"step": 0, "layer": 1, "num_tokens": 3, "topk": 2, "top_indices": [[0, 1], [1, 2]]}
    p.write_text(json.dumps(rec) + "\n")
    with pytest.raises(InvalidInputError, match="num_tokens 3 but 2 rows"):
        read_input(p)


# ---------------------------------------------------------------------------- load matrices


def test_load_csv_with_and_without_header(tmp_path, tiny):
    load = np.arange(32).reshape(4, 8)
    p = tmp_path / "load.csv"
    p.write_text("\n".join(",".join(str(x) for x in row) for row in load) + "\n")
    assert detect_format(p) == "load-csv"
    inp = read_input(p, model=tiny)
    assert inp.kind == "stats" and inp.chunks is None
    np.testing.assert_array_equal(inp.stats.load, load[1:])  # dense row dropped
    assert inp.stats.top_k == 2 and inp.stats.model == tiny
    assert inp.stats.num_tokens == round(load[1:].sum(axis=1).max() / 2)
    p.write_text("e0,e1,e2\n1.5,2,3\n4,5,6\n")
    s = read_input(p).stats
    np.testing.assert_allclose(s.load, [[1.5, 2, 3], [4, 5, 6]])
    assert s.top_k == 1 and s.model is None


@pytest.mark.parametrize("text, match", [
    ("1,2\n3,nan\n", "NaN"),
    ("1,2\n3,-4\n", "negative"),
    ("1,2\n3\n", "ragged"),
    ("1,2\n3,x\n", "non-numeric"),
    ("a,b\n", "no numeric rows"),
])
def test_load_csv_bad(tmp_path, text, match):
    p = tmp_path / "load.csv"
    p.write_text(text)
    with pytest.raises(InvalidInputError, match=match) as exc:
        read_input(p)
    assert str(p) in str(exc.value)


def test_load_npz(tmp_path, tiny):
    load = np.arange(24).reshape(3, 8)
    p = tmp_path / "w.npz"
    np.savez(p, weight=load, other=np.zeros(3))
    assert detect_format(p) == "load-npz"
    np.testing.assert_array_equal(read_input(p, model=tiny).stats.load, load)
    np.savez(p, anything=np.vstack([load[:1], load]))
    np.testing.assert_array_equal(read_input(p, model=tiny).stats.load, load)
    np.savez(p, load=load[:2])
    with pytest.raises(InvalidInputError, match="layer count 2 does not match tiny"):
        read_input(p, model=tiny)
    np.savez(p, load=np.where(load == 5, np.nan, load))
    with pytest.raises(InvalidInputError, match="NaN"):
        read_input(p)
    np.savez(p, a=load, b=load)
    with pytest.raises(InvalidInputError, match="unknown routing input format"):
        read_input(p)
    np.savez(p, load=load[0])
    with pytest.raises(InvalidInputError, match="expected \\[layers, experts\\]"):
        read_input(p)
