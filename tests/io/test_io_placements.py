"""Placement files: native JSON (+ its JSON Schema) and the five serving-stack formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from placer.errors import InvalidInputError, PlacementError
from placer.io import export_placement, import_placement, read_placement_json, write_placement_json
from placer.io.placements import (
    NATIVE_KEYS,
    SCHEMA_PATH,
    WRITABLE_FORMATS,
    VllmLoadsNoFile,
)
from placer.stacks import STACKS
from placer.types import ModelSpec, Placement, Topology

DATA = Path(__file__).resolve().parent.parent / "data"
README = json.loads((DATA / "eplb_readme_example.json").read_text())


@pytest.fixture
def readme():
    model = ModelSpec.from_shape(2, 12, 2, name="eplb-readme")
    topology = Topology(name="toy", num_nodes=2, gpus_per_node=4)
    return Placement(README["expected_phy2log"], slots_per_gpu=2, num_experts=12), model, topology


@pytest.fixture
def tiny_placement(tiny):
    # 3 MoE layers, E=8, 4 GPUs x 3 slots (R=4)
    p2l = [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3],
           [7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 0, 1],
           [0, 7, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]]
    return Placement(p2l, 3, 8), Topology(name="t", num_nodes=2, gpus_per_node=2)


def _write_native(path, placement, model, topology, **kw):
    args = dict(dispatch="nearest", method="greedy", status="feasible", solve_seconds=0.25,
                metrics={"imbalance": np.float64(1.25), "cross_node": np.int64(3), "nan": float("nan"),
                         "per_layer": np.array([1.0, 2.0])})
    args.update(kw)
    write_placement_json(path, placement, model=model, topology=topology, **args)


def _check_schema(doc, schema):
    """Structural check: required keys and the JSON type of each property (recursively)."""
    types = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
             "boolean": bool}
    for key in schema.get("required", []):
        assert key in doc, f"missing {key}"
    if schema.get("additionalProperties") is False:
        assert set(doc) <= set(schema["properties"]), set(doc) - set(schema["properties"])
    for key, sub in schema.get("properties", {}).items():
        if key not in doc:
            continue
        if "oneOf" in sub:  # the first alternative whose type matches
            sub = next((s for s in sub["oneOf"] if s["type"] == "null" and doc[key] is None
                        or s["type"] != "null" and isinstance(doc[key], types[s["type"]])), None)
            assert sub is not None, key
            if sub["type"] == "null":
                continue
        assert isinstance(doc[key], types[sub["type"]]), key
        if sub["type"] in ("integer", "number"):
            assert not isinstance(doc[key], bool), key
        if "enum" in sub:
            assert doc[key] in sub["enum"], key
        if "const" in sub:
            assert doc[key] == sub["const"], key
        if sub["type"] == "object":
            _check_schema(doc[key], sub)
        if sub["type"] == "array" and "items" in sub:
            item = sub["items"]
            for x in doc[key]:
                assert isinstance(x, types[item["type"]]), key
                if item["type"] == "array":
                    assert all(isinstance(y, types[item["items"]["type"]]) for y in x), key


def test_native_round_trip_and_schema(tmp_path, tiny, tiny_placement):
    placement, topology = tiny_placement
    p = tmp_path / "placement.json"
    _write_native(p, placement, tiny, topology)
    doc = json.loads(p.read_text())
    assert list(doc) == list(NATIVE_KEYS)
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == list(NATIVE_KEYS)
    _check_schema(doc, schema)
    assert doc["metrics"] == {"imbalance": 1.25, "cross_node": 3, "nan": None, "per_layer": [1.0, 2.0]}
    got = read_placement_json(p)
    np.testing.assert_array_equal(got.placement.physical_to_logical, placement.physical_to_logical)
    assert got.placement.slots_per_gpu == 3 and got.model == tiny and got.topology == topology
    assert (got.dispatch, got.method, got.status, got.solve_seconds) == ("nearest", "greedy", "feasible", 0.25)
    assert doc["stack"] is None and got.stack is None
    _write_native(p, placement, tiny, topology, dispatch="sglang-static", stack=STACKS["sglang"])
    doc = json.loads(p.read_text())
    _check_schema(doc, schema)
    assert doc["stack"] == {"name": "sglang", "release": "0.5.23"}
    assert read_placement_json(p).stack is STACKS["sglang"]
    # Version 1 files (before stacks were recorded) are still read.
    doc.pop("stack")
    p.write_text(json.dumps({**doc, "schema_version": 1}))
    assert read_placement_json(p).stack is None


def test_native_write_validates(tmp_path, tiny, tiny_placement):
    placement, topology = tiny_placement
    p = tmp_path / "placement.json"
    with pytest.raises(PlacementError, match="cluster has 8"):
        _write_native(p, placement, tiny, Topology(name="t", num_nodes=1, gpus_per_node=8))
    with pytest.raises(InvalidInputError, match="unknown dispatch rule"):
        _write_native(p, placement, tiny, topology, dispatch="random")
    with pytest.raises(InvalidInputError, match="status"):
        _write_native(p, placement, tiny, topology, status="infeasible")
    assert not p.exists()


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("metrics"), "lacks key"),
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d.update(schema_version=3), "schema_version"),
    (lambda d: d.update(stack={"name": "sglang", "release": "0.4.0"}), "solved for sglang 0.4.0"),
    (lambda d: d.update(stack={"name": "tgi", "release": "1"}), "unknown stack 'tgi'"),
    (lambda d: d.update(stack="sglang"), "stack must be null"),
    (lambda d: d.update(slots_per_gpu="3"), "slots_per_gpu has the wrong type"),
    (lambda d: d["physical_to_logical_map"][0].__setitem__(0, 9), "outside"),
    (lambda d: d["physical_to_logical_map"][0].pop(), "different lengths"),
    (lambda d: d["model"].pop("top_k"), "incomplete model"),
])
def test_native_read_rejects(tmp_path, tiny, tiny_placement, mutate, match):
    placement, topology = tiny_placement
    p = tmp_path / "placement.json"
    _write_native(p, placement, tiny, topology)
    doc = json.loads(p.read_text())
    mutate(doc)
    p.write_text(json.dumps(doc))
    with pytest.raises(InvalidInputError, match=match) as exc:
        read_placement_json(p)
    assert str(p) in str(exc.value)


def test_native_read_truncated_and_missing(tmp_path, tiny, tiny_placement):
    placement, topology = tiny_placement
    p = tmp_path / "placement.json"
    _write_native(p, placement, tiny, topology)
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(InvalidInputError, match="corrupt, truncated or malformed") as exc:
        read_placement_json(p)
    assert str(p) in str(exc.value)
    with pytest.raises(InvalidInputError, match="file not found"):
        read_placement_json(tmp_path / "missing.json")


EXT = {"sglang": ".json", "vllm": ".json", "vllm-ascend": ".json", "trtllm": ".yaml", "eplb": ".npz"}


@pytest.mark.parametrize("fmt", WRITABLE_FORMATS)
def test_export_round_trip(tmp_path, tiny, tiny_placement, fmt):
    placement, topology = tiny_placement
    p = tmp_path / f"placement{EXT[fmt]}"
    flags = export_placement(placement, fmt, p, model=tiny, topology=topology)
    assert flags and all(isinstance(x, str) for x in flags)
    assert [f.name for f in tmp_path.iterdir()] == [p.name]
    got = import_placement(p, fmt, model=tiny, topology=topology)
    np.testing.assert_array_equal(got.physical_to_logical, placement.physical_to_logical)
    assert got.slots_per_gpu == placement.slots_per_gpu


@pytest.mark.parametrize("fmt", WRITABLE_FORMATS)
def test_import_bad_files(tmp_path, tiny, tiny_placement, fmt):
    placement, topology = tiny_placement
    p = tmp_path / f"placement{EXT[fmt]}"
    with pytest.raises(InvalidInputError, match="file not found"):
        import_placement(p, fmt, model=tiny, topology=topology)
    export_placement(placement, fmt, p, model=tiny, topology=topology)
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(InvalidInputError) as exc:
        import_placement(p, fmt, model=tiny, topology=topology)
    assert str(p) in str(exc.value)
    export_placement(placement, fmt, p, model=tiny, topology=topology)
    with pytest.raises(InvalidInputError) as exc:  # 3 slots per layer do not fit 8 GPUs evenly... or count
        import_placement(p, fmt, model=tiny, topology=Topology(name="x", num_nodes=1, gpus_per_node=8))
    assert str(p) in str(exc.value)


def test_sglang_dense_rows(tmp_path, tiny, tiny_placement):
    placement, topology = tiny_placement
    p = tmp_path / "sglang.json"
    flags = export_placement(placement, "sglang", p, model=tiny, topology=topology)
    doc = json.loads(p.read_text())
    assert list(doc) == ["physical_to_logical_map"]
    rows = doc["physical_to_logical_map"]
    assert len(rows) == 4 and rows[0] == [p_ % 8 for p_ in range(12)]
    assert rows[1:] == placement.physical_to_logical.tolist()
    assert flags[:6] == ["--tp-size 4", "--ep-size 4", "--moe-a2a-backend deepep", "--ep-dispatch-algorithm static",
                         "--ep-num-redundant-experts 4", f"--init-expert-location {p}"]
    assert "--nnodes 2" in flags


def test_sglang_pt_and_suffixes(tmp_path, tiny, tiny_placement):
    torch = pytest.importorskip("torch")
    placement, topology = tiny_placement
    p = tmp_path / "sglang.pt"
    flags = export_placement(placement, "sglang", p, model=tiny, topology=topology)
    assert f"--init-expert-location {p}" in flags
    doc = torch.load(p, weights_only=True, map_location="cpu")  # as SGLang loads it
    assert list(doc) == ["physical_to_logical_map"] and doc["physical_to_logical_map"].dtype == torch.int64
    assert doc["physical_to_logical_map"][1:].tolist() == placement.physical_to_logical.tolist()
    for name in ("sglang", "sglang.yaml"):
        with pytest.raises(InvalidInputError, match="reads --init-expert-location as .json or .pt"):
            export_placement(placement, "sglang", tmp_path / name, model=tiny, topology=topology)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["sglang.pt"]


def test_sglang_refuses_a_model_it_cannot_place(tmp_path, tiny_placement):
    from dataclasses import replace
    placement, topology = tiny_placement
    mixtral = ModelSpec(name="mixtral-8x7b", num_hidden_layers=3, moe_layer_ids=(0, 1, 2), num_experts=8, top_k=2)
    with pytest.raises(InvalidInputError, match="sglang 0.5.23 cannot place mixtral-8x7b: its MixtralForCausalLM"):
        export_placement(placement, "sglang", tmp_path / "s.json", model=mixtral, topology=topology)
    qwen = replace(mixtral, name="qwen3-30b-a3b")
    export_placement(placement, "sglang", tmp_path / "s.json", model=qwen, topology=topology)


def test_golden_sglang_eplb_readme(tmp_path, readme):
    placement, model, topology = readme
    p = tmp_path / "placement.json"
    flags = export_placement(placement, "sglang", p, model=model, topology=topology)
    got = json.loads(p.read_text())
    golden = json.loads((DATA / "eplb_readme_sglang.json").read_text())
    assert got == golden
    assert list(got) == ["physical_to_logical_map"]
    assert got["physical_to_logical_map"] == README["expected_phy2log"]
    assert "--ep-size 8" in flags and "--ep-num-redundant-experts 4" in flags and "--nnodes 2" in flags


def test_vllm_ascend_matches_documented_example(tmp_path, readme):
    placement, model, topology = readme
    p = tmp_path / "eplb.json"
    flags = export_placement(placement, "vllm-ascend", p, model=model, topology=topology)
    doc = json.loads(p.read_text())
    assert doc["moe_layer_count"] == 2
    layer0 = doc["layer_list"][0]
    assert layer0["layer_id"] == 0 and layer0["device_count"] == 8
    assert [d["device_expert"] for d in layer0["device_list"]] == [
        [5, 6], [5, 7], [8, 4], [3, 4], [10, 9], [10, 2], [0, 1], [11, 1]]
    # vllm-ascend reads layers and devices by list position: position j is EP rank j.
    assert [d["device_id"] for d in layer0["device_list"]] == list(range(8))
    config = json.dumps({"eplb_config": {"expert_map_path": str(p), "num_redundant_experts": 4}})
    assert flags[:4] == ["--data-parallel-size 8", "--tensor-parallel-size 1", "--enable-expert-parallel",
                         f"--additional-config '{config}'"]
    assert "--data-parallel-size-local 4" in flags  # 2 nodes x 4
    assert any("rank r sends an expert with n copies to copy r % n" in f for f in flags)


def test_vllm_and_eplb_contents(tmp_path, readme):
    placement, model, topology = readme
    p = tmp_path / "vllm.json"
    with pytest.raises(VllmLoadsNoFile, match="vllm 0.34.0 loads no placement file; it re-balances itself "
                                             "every step_interval steps") as exc:
        export_placement(placement, "vllm", p, model=model, topology=topology)
    assert not p.exists()
    assert exc.value.flags[:4] == ["--tensor-parallel-size 8", "--enable-expert-parallel", "--enable-eplb",
                                   "--eplb-config '{\"num_redundant_experts\": 4}'"]
    p = tmp_path / "eplb.npz"
    export_placement(placement, "eplb", p, model=model, topology=topology)
    with np.load(p, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["phy2log"], README["expected_phy2log"])
        np.testing.assert_array_equal(z["logcnt"], [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                                                    [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]])
        # DeepSeek's width P - E + 1; a map without replica ranks lists copies by ascending slot
        assert z["log2phy"].shape == (2, 12, 5) and z["log2phy"][0, 5].tolist() == [0, 2, -1, -1, -1]
        assert z["log2phy"][0, 0].tolist() == [12, -1, -1, -1, -1]


def test_trtllm_yaml(tmp_path, readme):
    placement, model, topology = readme
    p = tmp_path / "lb.yaml"
    export_placement(placement, "trtllm", p, model=model, topology=topology)
    text = p.read_text()
    assert "num_slots: 16\nlayer_updates_per_iter: 0\ninitial_global_assignments:\n" in text
    key = model.moe_layer_ids[0]  # TensorRT-LLM looks layers up by decoder-layer index
    assert f"  {key}: [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]\n" in text
    try:
        import yaml
    except ImportError:
        return
    doc = yaml.safe_load(text)
    assert doc["num_slots"] == 16
    assert doc["initial_global_assignments"][model.moe_layer_ids[1]] == README["expected_phy2log"][1]


def test_unknown_format(tmp_path, readme):
    placement, model, topology = readme
    p = tmp_path / "x.json"
    with pytest.raises(InvalidInputError, match="unknown placement format 'tensorrt'.*sglang, vllm") as exc:
        export_placement(placement, "tensorrt", p, model=model, topology=topology)
    assert str(p) in str(exc.value)
    with pytest.raises(InvalidInputError, match="unknown placement format"):
        import_placement(p, "tensorrt", model=model, topology=topology)


def test_export_validates_first(tmp_path, readme):
    placement, model, topology = readme
    p = tmp_path / "x.json"
    with pytest.raises(PlacementError):
        export_placement(placement, "sglang", p, model=ModelSpec.from_shape(3, 12, 2), topology=topology)
    assert not p.exists()


def test_sglang_import_rejects_extra_keys(tmp_path, readme):
    placement, model, topology = readme
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"physical_to_logical_map": README["expected_phy2log"], "ep_size": 8}))
    with pytest.raises(InvalidInputError, match="SGLang rejects keys other than"):
        import_placement(p, "sglang", model=model, topology=topology)


def test_trtllm_accepts_absolute_layer_keys(tmp_path, tiny, tiny_placement):
    placement, topology = tiny_placement
    p = tmp_path / "lb.yaml"
    rows = placement.physical_to_logical.tolist()
    p.write_text("num_slots: 12\nlayer_updates_per_iter: 0\ninitial_global_assignments:\n"
                 + "".join(f"  {layer}: {row}  # layer\n" for layer, row in zip((1, 2, 3), rows, strict=True)))
    got = import_placement(p, "trtllm", model=tiny, topology=topology)
    np.testing.assert_array_equal(got.physical_to_logical, rows)
    p.write_text("num_slots: 12\ninitial_global_assignments:\n  5: " + str(rows[0]) + "\n")
    with pytest.raises(InvalidInputError, match="lists layers 5..5; TensorRT-LLM looks up tiny's MoE layers by "
                                                "decoder-layer index 1..3"):
        import_placement(p, "trtllm", model=tiny, topology=topology)
    # MoE ordinals 0..L-1 (what earlier placer versions wrote) would shift every layer by one
    p.write_text("num_slots: 12\ninitial_global_assignments:\n"
                 + "".join(f"  {i}: {row}\n" for i, row in enumerate(rows)))
    with pytest.raises(InvalidInputError, match="these keys are MoE ordinals"):
        import_placement(p, "trtllm", model=tiny, topology=topology)


def test_trtllm_reads_pyyaml_block_style(tmp_path, tiny, tiny_placement):
    yaml = pytest.importorskip("yaml")
    placement, topology = tiny_placement
    p = tmp_path / "lb.yaml"
    rows = placement.physical_to_logical.tolist()
    # TensorRT-LLM's generate_eplb_config.py writes with yaml.dump (block lists, sorted keys)
    p.write_text(yaml.dump({"num_slots": 12, "layer_updates_per_iter": 0,
                            "initial_global_assignments": dict(zip((1, 2, 3), rows, strict=True))}))
    got = import_placement(p, "trtllm", model=tiny, topology=topology)
    np.testing.assert_array_equal(got.physical_to_logical, rows)


def test_vllm_ascend_refuses_two_copies_on_one_device(tmp_path, tiny):
    placement = Placement([[0, 0, 1, 2, 3, 4, 5, 6, 7, 7, 1, 2]] * 3, 3, 8)
    topology = Topology(name="t", num_nodes=2, gpus_per_node=2)
    p = tmp_path / "a.json"
    with pytest.raises(InvalidInputError, match="layer 0: GPU 0 holds expert 0 twice .3 such duplicates.; "
                                                "vllm-ascend 0.23.0.post1 keeps one local slot per expert"):
        export_placement(placement, "vllm-ascend", p, model=tiny, topology=topology)
    assert not p.exists()
    with pytest.raises(InvalidInputError, match="does not end in .json"):
        export_placement(Placement([[0, 7, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]] * 3, 3, 8), "vllm-ascend",
                         tmp_path / "a.txt", model=tiny, topology=topology)
