"""SGLang recorder dumps (.pt: stat, per_pass, per_token) and the legacy CSV."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from placer.errors import InvalidInputError
from placer.io import detect_format, read_input, read_trace

# slots -> logical ids of the tiny model (E=8) with 2 redundant slots, one row per hidden layer
P2L = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1],
                [3, 1, 2, 0, 4, 5, 6, 7, 3, 5],
                [0, 7, 2, 3, 4, 5, 6, 1, 2, 2],
                [7, 6, 5, 4, 3, 2, 1, 0, 0, 7]])


def _save(path, obj):
    torch = pytest.importorskip("torch")
    torch.save(obj, path)


def test_stat_dump(tmp_path, rng, tiny):
    torch = pytest.importorskip("torch")
    count = rng.integers(0, 50, size=(5, 4, 8)).astype(np.int32)
    p = tmp_path / "expert_distribution_recorder_1.pt"
    _save(p, {"rank": 0, "logical_count": torch.from_numpy(count), "average_utilization_rate_over_window": None})
    assert detect_format(p) == "sglang-stat"
    inp = read_input(p, model=tiny)
    assert inp.kind == "stats" and inp.format == "sglang-stat"
    np.testing.assert_array_equal(inp.stats.load, count.sum(axis=0)[1:])
    assert inp.stats.top_k == 2 and inp.stats.model == tiny
    with pytest.raises(InvalidInputError, match="holds only counts") as exc:
        read_trace(p)
    assert str(p) in str(exc.value)
    # [layers, E] with only the MoE rows is kept as is
    _save(p, {"logical_count": torch.from_numpy(count[0, 1:])})
    np.testing.assert_array_equal(read_input(p, model=tiny).stats.load, count[0, 1:])
    _save(p, {"logical_count": torch.zeros(5, 2, 8, dtype=torch.int32)})
    with pytest.raises(InvalidInputError, match="layer count 2 does not match tiny"):
        read_input(p, model=tiny)
    _save(p, {"logical_count": torch.full((4, 8), -1)})
    with pytest.raises(InvalidInputError, match="negative"):
        read_input(p)


def test_per_pass_dump(tmp_path, rng, tiny):
    torch = pytest.importorskip("torch")
    counts = [rng.integers(0, 9, size=P2L.shape) for _ in range(3)]
    records = [{"forward_pass_id": i, "rank": 0, "gatherer_key": "primary",
                "global_physical_count": torch.from_numpy(c)} for i, c in enumerate(counts)]
    p = tmp_path / "expert_distribution_recorder_1_0.pt"
    _save(p, {"records": records, "last_physical_to_logical_map": torch.from_numpy(P2L)})
    assert detect_format(p) == "sglang-per-pass"
    stats = read_input(p, model=tiny).stats
    expected = np.zeros((4, 8), np.int64)
    for layer in range(4):
        for slot in range(10):
            expected[layer, P2L[layer, slot]] += sum(c[layer, slot] for c in counts)
    np.testing.assert_array_equal(stats.load, expected[1:])
    records[0]["global_physical_count"] = torch.zeros(4, 9, dtype=torch.int64)
    _save(p, {"records": records, "last_physical_to_logical_map": torch.from_numpy(P2L)})
    with pytest.raises(InvalidInputError, match="record 0 global_physical_count has shape"):
        read_input(p, model=tiny)
    bad = P2L.copy()
    bad[2, 3] = 8
    _save(p, {"records": [], "last_physical_to_logical_map": torch.from_numpy(bad)})
    with pytest.raises(InvalidInputError, match="logical id 8 outside"):
        read_input(p, model=tiny)


def _per_token_dump(rng, tokens_per_record=(6, 4), modes=(1, 2)):
    """Records of physical ids [4 layers, T, 8] (-1 beyond top-2, whole dense layer 0 -1)."""
    torch = pytest.importorskip("torch")
    records, logical = [], []
    for i, (t, mode) in enumerate(zip(tokens_per_record, modes, strict=True)):
        phys = np.full((4, t, 8), -1, dtype=np.int32)
        want = np.zeros((t, 3, 2), dtype=np.int64)
        for layer in (1, 2, 3):
            # pick 2 slots holding distinct logical experts
            for tok in range(t):
                while True:
                    slots = rng.choice(10, size=2, replace=False)
                    if P2L[layer, slots[0]] != P2L[layer, slots[1]]:
                        break
                phys[layer, tok, :2] = slots
                want[tok, layer - 1] = P2L[layer, slots]
        records.append({"forward_pass_id": i, "rank": 0, "gatherer_key": "primary", "input_ids": [0] * t,
                        "positions": list(range(t)), "extend_seq_lens": None, "forward_mode": mode,
                        "topk_ids_of_layer": torch.from_numpy(phys), "misc_objects": []})
        logical.append(want)
    obj = {"records": records, "last_physical_to_logical_map": torch.from_numpy(P2L)}
    return obj, np.concatenate(logical)


def test_per_token_dump(tmp_path, rng, tiny):
    obj, want = _per_token_dump(rng)
    p = tmp_path / "expert_distribution_recorder_2_0.pt"
    _save(p, obj)
    assert detect_format(p) == "sglang-per-token"
    t = read_trace(p, model=tiny)
    np.testing.assert_array_equal(t.expert_ids, want)
    np.testing.assert_array_equal(t.phase, [0] * 6 + [1] * 4)  # EXTEND=1 -> prefill, DECODE=2 -> decode
    assert t.model == tiny and t.order == "sorted"
    # without a model the all -1 layer is taken as dense
    t = read_trace(p)
    np.testing.assert_array_equal(t.expert_ids, want)
    assert t.num_experts == 8


def test_per_token_dump_with_global_physical_count(tmp_path, rng, tiny):
    """SGLang 0.5.23's per_token records also hold global_physical_count [layers, P]."""
    torch = pytest.importorskip("torch")
    obj, want = _per_token_dump(rng)
    for r in obj["records"]:
        ids = r["topk_ids_of_layer"].numpy()
        count = np.zeros(P2L.shape, dtype=np.int32)
        for layer in range(ids.shape[0]):
            valid = ids[layer][ids[layer] >= 0]
            np.add.at(count[layer], valid, 1)
        r["global_physical_count"] = torch.from_numpy(count)
    p = tmp_path / "expert_distribution_recorder_3_0.pt"
    _save(p, obj)
    assert detect_format(p) == "sglang-per-token"
    for fmt in (None, "sglang-per-token"):
        inp = read_input(p, model=tiny, format=fmt)
        assert inp.kind == "trace" and inp.format == "sglang-per-token"
    np.testing.assert_array_equal(read_trace(p, model=tiny).expert_ids, want)
    np.testing.assert_array_equal(read_trace(p, model=tiny, format="sglang-per-token").expert_ids, want)
    with pytest.raises(InvalidInputError, match="not an SGLang per-pass dump"):
        read_input(p, model=tiny, format="sglang-per-pass")


def test_per_token_dump_bad(tmp_path, rng, tiny):
    torch = pytest.importorskip("torch")
    obj, _ = _per_token_dump(rng)
    ids = obj["records"][0]["topk_ids_of_layer"].clone()
    ids[2, 0, 2] = 3  # one token with three experts
    obj["records"][0]["topk_ids_of_layer"] = ids
    p = tmp_path / "d.pt"
    _save(p, obj)
    with pytest.raises(InvalidInputError, match="cannot tell top-k") as exc:
        read_input(p, model=tiny)
    assert str(p) in str(exc.value)
    ids[2, 0, 2] = -1
    ids[1, 0, 0] = 10  # physical id out of range
    _save(p, obj)
    with pytest.raises(InvalidInputError, match="physical expert id 10 outside"):
        read_input(p, model=tiny)
    _save(p, {"records": [], "something": torch.zeros(2)})
    with pytest.raises(InvalidInputError, match="not an SGLang recorder dump"):
        read_input(p)


def test_pt_rejects_pickled_objects(tmp_path):
    pytest.importorskip("torch")
    p = tmp_path / "evil.pt"
    _save(p, {"logical_count": Fraction(1, 3)})  # not loadable with weights_only=True
    with pytest.raises(InvalidInputError, match="corrupt, truncated or malformed") as exc:
        read_input(p)
    assert str(p) in str(exc.value)


def test_legacy_csv(tmp_path, tiny):
    p = tmp_path / "expert_distribution_rank0_timestamp1.csv"
    rows = ["layer_id,expert_id,count", "1,0,5", "1,7,3", "2,2,4", "3,5,1", "3,5,2"]
    p.write_text("\n".join(rows) + "\n")
    assert detect_format(p) == "sglang-csv"
    s = read_input(p, model=tiny).stats
    expected = np.zeros((3, 8), np.int64)
    expected[0, 0], expected[0, 7], expected[1, 2], expected[2, 5] = 5, 3, 4, 3
    np.testing.assert_array_equal(s.load, expected)
    s = read_input(p).stats  # without a model rows run 0..max layer id
    assert s.load.shape == (4, 8) and s.load[0].sum() == 0
    p.write_text("layer_id,expert_id,count\n0,1,5\n1,1,1\n")
    with pytest.raises(InvalidInputError, match="dense layer 0 of tiny has counts"):
        read_input(p, model=tiny)
    p.write_text("layer_id,expert_id,count\n1,9,5\n")
    with pytest.raises(InvalidInputError, match=r"expert id 9 out of range \[0, 8\) for tiny"):
        read_input(p, model=tiny)
    p.write_text("layer_id,expert_id,count\n1,1,-5\n")
    with pytest.raises(InvalidInputError, match="non-negative"):
        read_input(p, model=tiny)
    p.write_text("layer_id,expert_id,count\n1,1,nan\n")
    with pytest.raises(InvalidInputError, match="non-negative"):
        read_input(p, model=tiny)

