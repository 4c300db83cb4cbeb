"""Every reader turns missing, truncated and malformed files into InvalidInputError naming the path."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from io_helpers import random_ids

from placer.errors import InvalidInputError
from placer.io import (
    detect_format,
    read_input,
    write_stats_npz,
    write_trace_npz,
    write_trace_parquet,
)
from placer.io.common import HEADER_KEY, header_bytes
from placer.stats import compute_stats
from placer.types import ModelSpec, RoutingTrace

MODEL = ModelSpec.from_shape(3, 8, 2, name="m3")


def _ids(n=40):
    return random_ids(np.random.default_rng(0), n, 3, 8, 2)


def _npz(p):
    write_trace_npz(p, RoutingTrace(_ids(), 8))


def _stats(p):
    write_stats_npz(p, compute_stats(RoutingTrace(_ids(), 8), sample_size=4))


def _parquet(p):
    write_trace_parquet(p, RoutingTrace(_ids(), 8))


def _hdmoe(p):
    ids = _ids()
    p.write_text(json.dumps({str(i): ids[:, i].tolist() for i in range(3)}))


def _r3_npy(p):
    np.save(p, _ids().astype(np.int32))


def _r3_b64(p):
    p.write_text(base64.b64encode(_ids().astype("<i4").tobytes()).decode() + "\n")


def _megatron(p):
    ids = _ids(5)
    p.write_text("\n".join(json.dumps({"step": 0, "layer": i, "num_tokens": 5, "topk": 2,
                                       "top_indices": ids[:, i].tolist()}) for i in range(3)) + "\n")


def _load_csv(p):
    p.write_text("\n".join(",".join(str(x) for x in row) for row in np.arange(24).reshape(3, 8) + 100) + "\n")


def _load_npz(p):
    np.savez(p, weight=np.arange(24).reshape(3, 8))


def _legacy_csv(p):
    p.write_text("layer_id,expert_id,count\n" + "\n".join(f"{layer},{e},{layer + e + 100}"
                                                        for layer in range(3) for e in range(8)) + "\n")


def _pt(kind):
    def build(p):
        torch = pytest.importorskip("torch")
        p2l = torch.arange(10).remainder(8).repeat(3, 1)
        if kind == "stat":
            obj = {"logical_count": torch.ones(2, 3, 8, dtype=torch.int32)}
        elif kind == "per_pass":
            obj = {"records": [{"forward_pass_id": 0, "rank": 0, "gatherer_key": "primary",
                                "global_physical_count": torch.ones(3, 10, dtype=torch.int64)}],
                   "last_physical_to_logical_map": p2l}
        else:
            ids = torch.full((3, 4, 8), -1, dtype=torch.int32)
            ids[:, :, 0], ids[:, :, 1] = 0, 1
            obj = {"records": [{"forward_pass_id": 0, "rank": 0, "forward_mode": 1,
                                "topk_ids_of_layer": ids}], "last_physical_to_logical_map": p2l}
        torch.save(obj, p)
    return build


CASES = [  # (format, file name, builder, bytes to cut so the file is surely broken)
    ("placer-npz", "t.npz", _npz, 30),
    ("placer-stats", "s.npz", _stats, 30),
    ("parquet", "t.parquet", _parquet, 30),
    ("hdmoe-json", "h.json", _hdmoe, 5),
    ("r3-npy", "r.npy", _r3_npy, 6),
    ("r3-base64", "r.b64", _r3_b64, 4),
    ("megatron-jsonl", "router_trace_rank0.jsonl", _megatron, 10),
    ("load-csv", "l.csv", _load_csv, 5),
    ("load-npz", "l.npz", _load_npz, 30),
    ("sglang-csv", "x.csv", _legacy_csv, 5),
    ("sglang-stat", "s.pt", _pt("stat"), 30),
    ("sglang-per-pass", "pp.pt", _pt("per_pass"), 30),
    ("sglang-per-token", "pt.pt", _pt("per_token"), 30),
]


@pytest.mark.parametrize("fmt, name, build, cut", CASES, ids=[c[0] for c in CASES])
def test_valid_then_truncated(tmp_path, fmt, name, build, cut):
    p = tmp_path / name
    build(p)
    assert detect_format(p) == fmt
    inp = read_input(p, model=MODEL)
    assert inp.format == fmt
    if inp.chunks is not None:
        assert sum(c.num_tokens for c in inp.chunks()) > 0
    data = p.read_bytes()
    p.write_bytes(data[:-cut])
    with pytest.raises(InvalidInputError) as exc:
        inp = read_input(p, model=MODEL, format=fmt)
        if inp.chunks is not None:
            list(inp.chunks())
    assert str(p) in str(exc.value)
    p.write_bytes(b"")
    with pytest.raises(InvalidInputError) as exc:
        inp = read_input(p, model=MODEL)
        if inp.chunks is not None:
            list(inp.chunks())
    assert str(p) in str(exc.value)


@pytest.mark.parametrize("fmt, name, build, cut", CASES, ids=[c[0] for c in CASES])
def test_missing_file(tmp_path, fmt, name, build, cut):
    p = tmp_path / name
    with pytest.raises(InvalidInputError, match="file not found") as exc:
        read_input(p, format=fmt)
    assert str(p) in str(exc.value)
    with pytest.raises(InvalidInputError, match="file not found"):
        detect_format(p)


@pytest.mark.parametrize("name", ["trace.xyz", "trace", "trace.yaml"])
def test_unknown_extension(tmp_path, name):
    p = tmp_path / name
    p.write_text("{}")
    with pytest.raises(InvalidInputError, match="unknown routing input format.*supported") as exc:
        read_input(p)
    assert str(p) in str(exc.value)


def test_unknown_format_name(tmp_path):
    p = tmp_path / "t.npz"
    _npz(p)
    with pytest.raises(InvalidInputError, match="unknown format 'nope'; formats: placer-npz") as exc:
        read_input(p, format="nope")
    assert str(p) in str(exc.value)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(InvalidInputError, match="directory"):
        read_input(tmp_path)


def test_placement_json_is_not_routing(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"physical_to_logical_map": [[0, 1]]}))
    with pytest.raises(InvalidInputError, match="placement file, not a routing input"):
        read_input(p)


def test_npz_ids_out_of_range_and_wrong_shape(tmp_path):
    header = {"kind": "trace", "schema_version": 1, "num_experts": 8, "order": "sorted", "model": None}
    p = tmp_path / "t.npz"
    ids = _ids().astype(np.int16)
    ids[3, 1, 0] = 8
    np.savez(p, **{HEADER_KEY: header_bytes(header), "expert_ids": ids})
    with pytest.raises(InvalidInputError, match="must be in \\[0, 8\\), found 8") as exc:
        list(read_input(p).chunks())
    assert str(p) in str(exc.value)
    np.savez(p, **{HEADER_KEY: header_bytes(header), "expert_ids": ids[:, :, 0]})
    with pytest.raises(InvalidInputError, match="expected \\[tokens, layers, top_k\\]"):
        read_input(p)
    np.savez(p, **{HEADER_KEY: header_bytes(header), "expert_ids": _ids(), "phase": np.zeros(3, np.int8)})
    with pytest.raises(InvalidInputError, match="phase has shape \\[3\\], expected \\[40\\]"):
        read_input(p)
    np.savez(p, **{HEADER_KEY: header_bytes({**header, "schema_version": 9}), "expert_ids": _ids()})
    with pytest.raises(InvalidInputError, match="schema_version"):
        read_input(p)
    np.savez(p, **{HEADER_KEY: np.frombuffer(b"{not json", np.uint8), "expert_ids": _ids()})
    with pytest.raises(InvalidInputError, match="corrupt placer header"):
        read_input(p)


def test_r3_npy_out_of_range(tmp_path):
    p = tmp_path / "r.npy"
    ids = _ids().astype(np.int32)
    ids[0, 0, 0] = 8
    np.save(p, ids)
    with pytest.raises(InvalidInputError, match=r"expert id 8 out of range \[0, 8\) for m3"):
        read_input(p, model=MODEL)
    ids[0, 0, 0] = -1
    np.save(p, ids)
    with pytest.raises(InvalidInputError, match="expert id -1 out of range"):
        read_input(p)
    np.save(p, ids.astype(np.float32))
    with pytest.raises(InvalidInputError, match="integer ids"):
        read_input(p)


def test_object_npy_is_not_unpickled(tmp_path):
    p = tmp_path / "r.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInputError) as exc:
        read_input(p)
    assert str(p) in str(exc.value)


def test_megatron_ids_out_of_range(tmp_path):
    p = tmp_path / "router_trace_rank0.jsonl"
    rec = [{"step": 0, "layer": i, "num_tokens": 1, "topk": 2, "top_indices": [[0, 9]]} for i in range(3)]
    p.write_text("\n".join(json.dumps(r) for r in rec))
    with pytest.raises(InvalidInputError, match="expert id 9 out of range \\[0, 8\\) for m3") as exc:
        read_input(p, model=MODEL)
    assert str(p) in str(exc.value)


def test_corrupt_member_of_trace_npz(tmp_path):
    p = tmp_path / "t.npz"
    write_trace_npz(p, RoutingTrace(random_ids(np.random.default_rng(1), 4000, 3, 8, 2), 8))
    data = bytearray(p.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # wipe part of the compressed expert_ids stream
    p.write_bytes(bytes(data))
    with pytest.raises(InvalidInputError) as exc:
        list(read_input(p, chunk_tokens=500).chunks())
    assert str(p) in str(exc.value)
