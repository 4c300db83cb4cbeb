"""TensorRT-LLM expert statistics (``trtllm-stats``): the offline EP load balancer's input.

The file layout is transcribed from TensorRT-LLM 1.2's ``examples/wide_ep/ep_load_balancer``
(``EXPERT_STATISTIC_PATH`` / ``EXPERT_STATISTIC_ITER_RANGE``: ``meta_info.json`` plus one
``rank{r}.safetensors`` per rank, tensors keyed ``"{iteration}_{layer}"`` -> int counts [E],
``layer`` the decoder-layer index). TensorRT-LLM cannot be installed here, so the layout is
transcribed, not run. The safetensors encoding is produced by the real ``safetensors`` package
(``safetensors.numpy.save_file``, the library TensorRT-LLM writes these files with).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from cli_helpers import one_line_exit2, run
from safetensors.numpy import save_file

from placer.errors import InvalidInputError
from placer.io import detect_format, read_input
from placer.io.trtllm_stats import read_safetensors, read_trtllm_stats
from placer.presets import get_model
from placer.types import ModelSpec

pytestmark = pytest.mark.timeout(120)

# 5 decoder layers: 0 and 2 dense, MoE at 1, 3, 4; 6 experts, top-2.
SMALL = ModelSpec(name="small", num_hidden_layers=5, moe_layer_ids=(1, 3, 4), num_experts=6, top_k=2,
                  hidden_size=64, expert_ffn_size=32)


def _write(directory, counts, *, num_experts, top_k, meta_extra=None, raw=True, dtype=np.int64):
    """TRT-LLM's files: ``counts[rank][(iteration, layer)]`` -> [E] counts."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"num_experts": num_experts, "num_experts_per_token": top_k, **(meta_extra or {})}
    (directory / "meta_info.json").write_text(json.dumps(meta))
    for rank, records in enumerate(counts):
        save_file({f"{it}_{layer}": np.asarray(c, dtype=dtype) for (it, layer), c in records.items()},
                  str(directory / f"rank{rank}.safetensors"))
        if raw:  # rank{r}_raw.safetensors (raw token_selected_experts): must be ignored
            save_file({"100_1": np.full((3, top_k), 999, dtype=np.int32)},
                      str(directory / f"rank{rank}_raw.safetensors"))
    return directory


def _random_counts(rng, ranks, iterations, layers, num_experts, tokens, top_k):
    """Per rank, per (iteration, layer): bincount of ``tokens`` tokens' top-k experts."""
    out = []
    for _ in range(ranks):
        records = {}
        for it in iterations:
            for layer in layers:
                ids = np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :top_k]
                records[(it, layer)] = np.bincount(ids.ravel(), minlength=num_experts)
        out.append(records)
    return out


def _expected(counts, layers, num_experts):
    load = np.zeros((len(layers), num_experts), dtype=np.int64)
    for records in counts:
        for (_, layer), c in records.items():
            load[layers.index(layer)] += c
    return load


# ------------------------------------------------------------------------------ reading


def test_small_model_sums_ranks_and_iterations(tmp_path, rng):
    counts = _random_counts(rng, 3, range(100, 104), SMALL.moe_layer_ids, 6, 10, 2)
    d = _write(tmp_path / "stats", counts, num_experts=6, top_k=2,
               meta_extra={"layer_wise": False, "future_key": [1, 2]})
    expected = _expected(counts, list(SMALL.moe_layer_ids), 6)
    assert detect_format(d) == "trtllm-stats"
    assert detect_format(d / "meta_info.json") == "trtllm-stats"
    for path in (d, d / "meta_info.json", str(d)):
        inp = read_input(path, model=SMALL)
        assert inp.kind == "stats" and inp.format == "trtllm-stats" and inp.chunks is None
        assert inp.model == SMALL and inp.source == str(path)
        np.testing.assert_array_equal(inp.stats.load, expected)
        assert inp.stats.load.dtype == np.int64
        assert inp.stats.top_k == 2
        # 3 ranks x 4 iterations x 10 tokens, each counted top_k times per layer
        assert inp.stats.num_tokens == 120
    np.testing.assert_array_equal(read_trtllm_stats(d, SMALL).load, expected)
    assert read_input(d, format="trtllm-stats").format == "trtllm-stats"


def test_without_model_layers_seen_are_the_moe_layers(tmp_path, rng):
    counts = _random_counts(rng, 2, [7, 8], (1, 3, 4), 6, 5, 2)
    d = _write(tmp_path / "s", counts, num_experts=6, top_k=2)
    stats = read_input(d).stats
    assert stats.model is None and stats.top_k == 2
    np.testing.assert_array_equal(stats.load, _expected(counts, [1, 3, 4], 6))


def test_decoder_layer_keys_map_to_moe_ordinals(tmp_path):
    """Key layer 3 is MoE ordinal 1 of SMALL; read as an ordinal it would be row 3 (out of range)
    and layer 1 would land in row 1, so every row here is distinct and checked."""
    e = 6
    records = {(0, 1): [1, 0, 0, 0, 0, 0], (0, 3): [0, 2, 0, 0, 0, 0], (0, 4): [0, 0, 3, 0, 0, 0]}
    d = _write(tmp_path / "s", [records], num_experts=e, top_k=1, raw=False)
    m = ModelSpec(name="small1", num_hidden_layers=5, moe_layer_ids=(1, 3, 4), num_experts=e, top_k=1)
    np.testing.assert_array_equal(read_input(d, model=m).stats.load,
                                  [[1, 0, 0, 0, 0, 0], [0, 2, 0, 0, 0, 0], [0, 0, 3, 0, 0, 0]])
    # MoE ordinals (0, 1, 2) as keys are not decoder-layer ids of this model: refused.
    ordinals = {(0, 0): [1] * e, (0, 1): [1] * e, (0, 2): [1] * e}
    d2 = _write(tmp_path / "ord", [ordinals], num_experts=e, top_k=1, raw=False)
    with pytest.raises(InvalidInputError, match="layer 0 is not an MoE layer of small1") as exc:
        read_input(d2, model=m)
    assert "rank0.safetensors" in str(exc.value)


def test_deepseek_v2_lite_first_layer_dense(tmp_path, rng):
    model = get_model("deepseek-v2-lite")
    assert model.moe_layer_ids[0] == 1
    layers = list(model.moe_layer_ids)  # decoder layers 1..26
    counts = _random_counts(rng, 2, [100, 101], layers, 64, 8, 6)
    d = _write(tmp_path / "v2lite", counts, num_experts=64, top_k=6)
    stats = read_input(d, model=model).stats
    assert stats.load.shape == (26, 64)
    np.testing.assert_array_equal(stats.load, _expected(counts, layers, 64))
    assert stats.num_tokens == 2 * 2 * 8
    # layer key 27 does not exist in the model
    bad = [dict(counts[0]), counts[1]]
    bad[0][(100, 27)] = np.ones(64, dtype=np.int64)
    d2 = _write(tmp_path / "extra", bad, num_experts=64, top_k=6)
    with pytest.raises(InvalidInputError, match=r"layer 27 is not an MoE layer of deepseek-v2-lite "
                                                r"\(MoE decoder layers 1\.\.26; it has 27 decoder layers") as exc:
        read_input(d2, model=model)
    assert "rank0.safetensors" in str(exc.value)
    # layer key 0 is the dense first layer
    bad[0] = dict(counts[0])
    bad[0][(100, 0)] = np.ones(64, dtype=np.int64)
    d3 = _write(tmp_path / "dense", bad, num_experts=64, top_k=6)
    with pytest.raises(InvalidInputError, match=r"layer 0 is not an MoE layer of deepseek-v2-lite "
                                                r"\(MoE decoder layers 1\.\.26\)"):
        read_input(d3, model=model)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.uint8, np.float32, np.float64])
def test_count_dtypes(tmp_path, dtype):
    records = {(0, 0): [1, 2, 3, 4], (1, 0): [4, 3, 2, 1], (0, 1): [0, 0, 5, 5]}
    d = _write(tmp_path / "s", [records], num_experts=4, top_k=2, dtype=dtype)
    stats = read_input(d).stats
    np.testing.assert_array_equal(stats.load, [[5, 5, 5, 5], [0, 0, 5, 5]])
    assert stats.load.dtype == np.int64


def test_read_safetensors_matches_the_package(tmp_path):
    from safetensors.numpy import load_file
    tensors = {"a": np.arange(12, dtype=np.int64).reshape(3, 4), "b": np.array([1.5, -2], dtype=np.float32),
               "c": np.zeros((0, 3), dtype=np.int32), "d": np.array(7, dtype=np.uint8)}
    p = tmp_path / "x.safetensors"
    save_file(tensors, str(p), metadata={"format": "pt"})
    ours, theirs = read_safetensors(p), load_file(str(p))
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape
        np.testing.assert_array_equal(ours[k], theirs[k])


# ------------------------------------------------------------------------------ CLI


def test_cli_solve_end_to_end(capsys, tmp_path, rng):
    model = get_model("deepseek-v2-lite")
    counts = _random_counts(rng, 2, [100, 101], list(model.moe_layer_ids), 64, 16, 6)
    d = _write(tmp_path / "expert_statistic", counts, num_experts=64, top_k=6)
    out = tmp_path / "p.json"
    code, stdout, err = run(capsys, "solve", d, "--model", "deepseek-v2-lite", "--gpus", "8",
                            "--method", "eplb", "-o", out)
    assert code == 0, (stdout, err)
    placement = json.loads(out.read_text())
    assert len(placement["physical_to_logical_map"]) == 26
    code, stdout, err = run(capsys, "stats", d / "meta_info.json", "--model", "deepseek-v2-lite")
    assert code == 0, (stdout, err)


# ------------------------------------------------------------------------------ bad input


def _good(tmp_path, name="s", **kw):
    records = {(0, 0): [1, 2, 3, 4], (0, 1): [4, 3, 2, 1]}
    return _write(tmp_path / name, [records, records], num_experts=4, top_k=2, raw=False, **kw)


def _header_file(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _bad_cases():
    """(id, builder(dir) -> path to pass, needle in the error line, model or None)."""
    m4 = ModelSpec.from_shape(2, 4, 2, name="m4")

    def missing_dir(d):
        return d.parent / "nope"

    def missing_meta(d):
        (d / "meta_info.json").unlink()
        return d

    def meta_not_json(d):
        (d / "meta_info.json").write_text("{num_experts: 4")
        return d

    def meta_lacks_key(d):
        (d / "meta_info.json").write_text(json.dumps({"num_experts": 4}))
        return d

    def no_rank_files(d):
        for f in d.glob("rank*.safetensors"):
            f.unlink()
        return d

    def rank_gap(d):
        (d / "rank1.safetensors").rename(d / "rank2.safetensors")
        return d

    def truncated(d):
        p = d / "rank1.safetensors"
        p.write_bytes(p.read_bytes()[:-5])
        return d

    def shorter_than_length(d):
        (d / "rank1.safetensors").write_bytes(b"\x10\x00")
        return d

    def header_too_long(d):
        (d / "rank1.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
        return d

    def header_past_end(d):
        (d / "rank1.safetensors").write_bytes(struct.pack("<Q", 500) + b"{}")
        return d

    def header_not_json(d):
        _header_file(d / "rank1.safetensors", b"not json at all!")
        return d

    def offsets_out_of_bounds(d):
        h = json.dumps({"0_0": {"dtype": "I64", "shape": [4], "data_offsets": [0, 64]}}).encode()
        _header_file(d / "rank1.safetensors", h, b"\0" * 32)
        return d

    def offsets_size_mismatch(d):
        h = json.dumps({"0_0": {"dtype": "I64", "shape": [4], "data_offsets": [0, 24]}}).encode()
        _header_file(d / "rank1.safetensors", h, b"\0" * 32)
        return d

    def unknown_dtype(d):
        h = json.dumps({"0_0": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
        _header_file(d / "rank1.safetensors", h, b"\0" * 8)
        return d

    def shape_mismatch(d):
        save_file({"0_0": np.ones(5, dtype=np.int64)}, str(d / "rank1.safetensors"))
        return d

    def shape_2d(d):
        save_file({"0_0": np.ones((2, 4), dtype=np.int64)}, str(d / "rank1.safetensors"))
        return d

    def bad_key(d):
        save_file({"iter0_layer0": np.ones(4, dtype=np.int64)}, str(d / "rank1.safetensors"))
        return d

    def negative(d):
        save_file({"0_0": np.array([1, -2, 3, 4], dtype=np.int64)}, str(d / "rank1.safetensors"))
        return d

    def nan(d):
        save_file({"0_0": np.array([1, np.nan, 3, 4], dtype=np.float32)}, str(d / "rank1.safetensors"))
        return d

    def no_tensors(d):
        save_file({}, str(d / "rank0.safetensors"))
        save_file({}, str(d / "rank1.safetensors"))
        return d

    def experts_mismatch(d):
        return d

    def missing_moe_layer(d):
        save_file({"0_0": np.ones(4, dtype=np.int64)}, str(d / "rank0.safetensors"))
        save_file({"1_0": np.ones(4, dtype=np.int64)}, str(d / "rank1.safetensors"))
        return d

    def empty_dir(d):
        for f in d.iterdir():
            f.unlink()
        return d

    def other_file(d):
        p = d / "notes.json"
        p.write_text("{}")
        return p

    return [
        ("missing-dir", missing_dir, "nope: file not found", None),
        ("missing-meta", missing_meta, "meta_info.json: file not found", None),
        ("meta-not-json", meta_not_json, "meta_info.json: not valid JSON", None),
        ("meta-lacks-key", meta_lacks_key, "meta_info.json: lacks 'num_experts_per_token'", None),
        ("no-rank-files", no_rank_files, "holds no rank{r}.safetensors files", None),
        ("rank-gap", rank_gap, "rank1.safetensors is missing (found ranks 0, 2)", None),
        ("truncated", truncated, "rank1.safetensors: tensor", None),
        ("shorter-than-length", shorter_than_length, "rank1.safetensors: truncated safetensors file", None),
        ("header-too-long", header_too_long, "rank1.safetensors: safetensors header length", None),
        ("header-past-end", header_past_end, "rank1.safetensors: truncated safetensors file: header of 500", None),
        ("header-not-json", header_not_json, "rank1.safetensors: safetensors header is not JSON", None),
        ("offsets-out-of-bounds", offsets_out_of_bounds, "data_offsets [0, 64] out of bounds", None),
        ("offsets-size-mismatch", offsets_size_mismatch, "needs 32 bytes, data_offsets give 24", None),
        ("unknown-dtype", unknown_dtype, "tensor '0_0' has dtype 'BF16'; supported: I64", None),
        ("shape-mismatch", shape_mismatch, "tensor '0_0' has shape [5], expected [4]", None),
        ("shape-2d", shape_2d, "tensor '0_0' has shape [2, 4], expected [4]", None),
        ("bad-key", bad_key, "tensor key 'iter0_layer0' is not '{iteration}_{layer}'", None),
        ("negative", negative, "tensor '0_0' has negative counts", None),
        ("nan", nan, "tensor '0_0' has NaN or infinite counts", None),
        ("no-tensors", no_tensors, "holds no counts: every rank{r}.safetensors holds no tensors", None),
        ("experts-mismatch", experts_mismatch, "num_experts 4 does not match olmoe-1b-7b (64 experts)",
         "olmoe-1b-7b"),
        ("missing-moe-layer", missing_moe_layer, "no counts for MoE decoder layer 1 of m4", m4),
        ("empty-dir", empty_dir, "is a directory, not a file", None),
        ("other-file", other_file, "notes.json: unknown routing input format", None),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_naming_the_file(tmp_path, case):
    _, build, needle, model = case
    path = build(_good(tmp_path))
    if isinstance(model, str):
        model = get_model(model)
    with pytest.raises(InvalidInputError) as exc:
        read_input(path, model=model)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("case", [c for c in BAD if not isinstance(c[3], ModelSpec)],
                         ids=[c[0] for c in BAD if not isinstance(c[3], ModelSpec)])
def test_bad_input_cli_exits_2_with_one_line(capsys, tmp_path, case):
    _, build, needle, model = case
    path = build(_good(tmp_path))
    args = ["stats", path] + (["--model", model] if model else [])
    line = one_line_exit2(capsys, *args, needle=needle)
    assert str(tmp_path) in line


def test_a_rank_without_records_adds_nothing(tmp_path):
    d = _good(tmp_path)
    save_file({}, str(d / "rank1.safetensors"))  # a rank that recorded nothing
    np.testing.assert_array_equal(read_input(d).stats.load, [[1, 2, 3, 4], [4, 3, 2, 1]])


def test_explicit_format_on_another_file_is_refused(tmp_path):
    d = _good(tmp_path)
    with pytest.raises(InvalidInputError, match="expected a TensorRT-LLM expert-statistic directory or "
                                                "its meta_info.json") as exc:
        read_input(d / "rank0.safetensors", format="trtllm-stats")
    assert "rank0.safetensors" in str(exc.value)
    with pytest.raises(InvalidInputError, match="is a directory, not a file"):
        read_input(d, format="load-csv")
