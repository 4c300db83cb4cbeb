"""Saved R3 routed experts (JSONL base64 / nested lists, .npy): vLLM's logical ids taken as they
are (its base64-of-.npy form included), SGLang's physical ids mapped back through a placement;
``placer profile`` reads them chunk by chunk into the statistics of the whole file."""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import numpy as np
import pytest

from placer.cli import main
from placer.errors import InvalidInputError
from placer.io.native import read_stats_npz
from placer.io.placements import write_placement_json
from placer.presets import get_model, make_topology
from placer.profiling import vllm_r3
from placer.profiling.profile import profile_r3, spec_of
from placer.profiling.vllm_r3 import import_r3, stream_r3
from placer.stats import StatsBuilder
from placer.types import ModelSpec, Placement

pytestmark = pytest.mark.timeout(60)

# 3 hidden layers, layer 0 dense; 4 experts, top-2; 6 slots on 2 GPUs (experts 0 and 3 replicated).
MODEL = ModelSpec(name="r3-test", num_hidden_layers=3, moe_layer_ids=(1, 2), num_experts=4, top_k=2)
P2L = np.array([[0, 1, 3, 2, 0, 3], [3, 2, 1, 0, 3, 0]])


def logical_and_physical(rng, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Logical ids [T, 2, 2] and R3 physical ids [T, 3, 2] (dense row 0 is zeros, as R3 pads it)."""
    logical = np.stack([np.stack([rng.choice(4, 2, replace=False) for _ in range(2)]) for _ in range(tokens)])
    phys = np.zeros((tokens, 3, 2), np.int32)
    for t in range(tokens):
        for layer in range(2):
            for k in range(2):
                phys[t, layer + 1, k] = rng.choice(np.flatnonzero(P2L[layer] == logical[t, layer, k]))
    return logical, phys


@pytest.fixture
def placement(tmp_path):
    path = tmp_path / "p.json"
    write_placement_json(path, Placement(P2L, 3, 4), model=MODEL, topology=make_topology(gpus=2),
                         dispatch="nearest", method="contiguous", status="feasible", solve_seconds=0.0)
    return path


def test_jsonl_base64_and_lists_map_back_to_logical(tmp_path, placement):
    rng = np.random.default_rng(0)
    la, pa = logical_and_physical(rng, 7)
    lb, pb = logical_and_physical(rng, 5)
    path = tmp_path / "outputs.jsonl"
    path.write_text(json.dumps({"request_id": 10, "routed_experts": base64.b64encode(pa.astype("<i4").tobytes()).decode()})
                    + "\n" + json.dumps({"routed_experts": pb.tolist()}) + "\n")
    trace = import_r3(path, placement=placement, stack="sglang")
    assert trace.model.name == "r3-test"
    assert (trace.expert_ids == np.concatenate([la, lb])).all()
    assert trace.request_ids.tolist() == [10] * 7 + [1] * 5


def test_npy_without_placement_is_taken_as_logical(tmp_path):
    rng = np.random.default_rng(1)
    logical, _ = logical_and_physical(rng, 9)
    r3 = np.concatenate([np.zeros((9, 1, 2), np.int32), logical], axis=1)  # dense row 0 first
    path = tmp_path / "r3.npy"
    np.save(path, r3)
    trace = import_r3(path, model=MODEL)
    assert (trace.expert_ids == logical).all()
    r3[0, 2, 0] = 5  # a physical slot id: out of range for 4 logical experts
    np.save(path, r3)
    with pytest.raises(InvalidInputError, match="--placement") as exc:
        import_r3(path, model=MODEL, stack="sglang")
    assert exc.value.source == str(path)
    with pytest.raises(InvalidInputError, match="import it as sglang") as exc:
        import_r3(path, model=MODEL)  # vllm (the default): no placement hint, a stack hint
    assert exc.value.source == str(path)


def npy_b64(arr: np.ndarray) -> str:
    """vLLM's API form: base64 of the array's .npy bytes (vllm.utils.serial_utils.numpy2base64)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.mark.parametrize("dtype", ["uint8", "<u2", ">u2", "int32"])
def test_vllm_npy_base64_is_logical_and_self_shaped(tmp_path, dtype):
    rng = np.random.default_rng(3)
    la, _ = logical_and_physical(rng, 6)
    lb, _ = logical_and_physical(rng, 4)
    full = [np.concatenate([np.zeros((len(x), 1, 2), int), x], axis=1).astype(dtype) for x in (la, lb)]
    path = tmp_path / "outputs.jsonl"
    path.write_text(json.dumps({"request_id": 3, "routed_experts": npy_b64(full[0])}) + "\n"
                    + json.dumps({"routed_experts": npy_b64(full[1])}) + "\n")
    trace = import_r3(path, model=MODEL)  # vLLM ids: logical, no remap, no placement
    assert (trace.expert_ids == np.concatenate([la, lb])).all()
    assert trace.request_ids.tolist() == [3] * 6 + [1] * 4
    txt = tmp_path / "r3.b64"
    txt.write_text(npy_b64(full[0][:, 1:]) + "\n")
    no_model = import_r3(txt)  # the .npy carries its shape: no --model needed (every layer kept)
    assert (no_model.expert_ids == la).all()
    txt.write_text(npy_b64(full[0]) + "\n")  # vLLM's dense rows are zeros: only a model drops them
    with pytest.raises(InvalidInputError, match="same expert twice"):
        import_r3(txt)


def pickled_npy_b64() -> str:
    buf = io.BytesIO()
    np.save(buf, np.array([[[{"x": 1}]]], dtype=object), allow_pickle=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def test_vllm_refuses_a_placement_and_bad_npy_payloads(tmp_path, placement):
    path = tmp_path / "r3.npy"
    np.save(path, np.zeros((2, 3, 2), np.uint8))
    with pytest.raises(InvalidInputError, match="already logical") as exc:
        import_r3(path, placement=placement)
    assert exc.value.source == str(placement) and "\n" not in str(exc.value)
    with pytest.raises(InvalidInputError, match="unknown R3 stack"):
        import_r3(path, model=MODEL, stack="trtllm")
    bad = tmp_path / "bad.jsonl"
    cases = [
        (npy_b64(np.zeros((2, 3, 2), np.float32)), "float32"),
        (npy_b64(np.zeros((6, 2), np.uint8)), "expected integer [tokens, layers, top_k]"),
        (npy_b64(np.zeros((2, 3, 2), np.uint8))[:40], "unreadable"),
        (pickled_npy_b64(), "Object arrays cannot be loaded"),  # never unpickled
    ]
    for b64, needle in cases:
        bad.write_text(json.dumps({"routed_experts": b64}) + "\n")
        with pytest.raises(InvalidInputError) as exc:
            import_r3(bad, model=MODEL)
        assert needle in str(exc.value) and exc.value.source == str(bad), (needle, exc.value)


def test_cli_r3_with_placement_writes_stats_solve_takes(tmp_path, placement, capsys):
    rng = np.random.default_rng(2)
    logical, phys = logical_and_physical(rng, 40)
    path = tmp_path / "r3.npy"
    np.save(path, phys)
    trace = import_r3(path, placement=placement, stack="sglang")
    assert (trace.expert_ids == logical).all()
    out = tmp_path / "s.npz"
    assert main(["profile", "--sglang-r3", str(path), "--placement", str(placement), "-o", str(out)]) == 0
    assert (read_stats_npz(out).load == np.stack([np.bincount(logical[:, layer].ravel(), minlength=4)
                                                   for layer in range(2)])).all()
    np.save(path, logical.astype(np.uint8))  # what vLLM returns for the same tokens: logical ids
    out = tmp_path / "s.npz"
    assert main(["profile", "--vllm-r3", str(path), "-o", str(out)]) == 0
    stats = read_stats_npz(out)
    expect = np.stack([np.bincount(logical[:, layer].ravel(), minlength=4) for layer in range(2)])
    assert (stats.load == expect).all()
    assert main(["solve", str(out), "--gpus", "2", "--method", "contiguous", "-o", str(tmp_path / "p2.json")]) == 0
    capsys.readouterr()


def test_bad_inputs_exit_2_with_one_line(tmp_path, placement, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"routed_experts": "@@@"}\n')
    raw = tmp_path / "raw.jsonl"  # SGLang's raw int32 form: no shape of its own
    raw.write_text(json.dumps({"routed_experts": base64.b64encode(bytes(16)).decode()}) + "\n")
    cases = [
        (["profile", "--vllm-r3", str(bad), "--model", "deepseek-v2-lite"], "not valid base64"),
        (["profile", "--vllm-r3", str(bad), "--placement", str(placement)], "--placement applies to --sglang-r3"),
        (["profile", "--vllm-r3", str(tmp_path / "missing.npy")], "file not found"),
        (["profile", "--vllm-r3", str(raw)], "give --model"),
        (["profile", "--placement", str(placement)], "--placement applies to --sglang-r3"),
    ]
    for args, needle in cases:
        code = main([*args, "-o", str(tmp_path / "s.npz")])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)


# ---------------------------------------------------------------------------- streamed profile_r3

V2_LITE = get_model("deepseek-v2-lite")  # 27 hidden layers, layer 0 dense; E=64, top-6


def v2_lite_r3(rng, tokens: int) -> np.ndarray:
    """vLLM R3 ids uint8 [T, 27, 6]: distinct logical experts per MoE layer, zeros in dense row 0."""
    out = np.zeros((tokens, V2_LITE.num_hidden_layers, V2_LITE.top_k), np.uint8)
    out[:, 1:] = np.argsort(rng.random((tokens, V2_LITE.num_moe_layers, V2_LITE.num_experts)), axis=-1)[..., :6]
    return out


def b64_int32(arr: np.ndarray) -> str:
    """SGLang's R3 form: base64 of raw little-endian int32."""
    return base64.b64encode(arr.astype("<i4").tobytes()).decode("ascii")


def r3_case(tmp_path, case: str) -> tuple[dict, int]:
    """``(profile_r3 keyword arguments, tokens)`` of a small R3 file of one form and stack."""
    rng = np.random.default_rng(11)
    if case.startswith("vllm"):
        reqs = [v2_lite_r3(rng, n) for n in (9, 1, 14, 5)]
        if case == "vllm-npy":  # with --model: the dense row dropped, chunks sized from the model
            np.save(tmp_path / "r3.npy", np.concatenate(reqs))
            return dict(path=str(tmp_path / "r3.npy"), model="deepseek-v2-lite"), 29
        path = tmp_path / "r3.b64"  # base64 of .npy per request, no --model: E is the largest id + 1
        path.write_text("\n".join(npy_b64(r[:, 1:]) for r in reqs) + "\n\n")
        return dict(path=str(path)), 29
    p2l = tmp_path / "p.json"
    write_placement_json(p2l, Placement(P2L, 3, 4), model=MODEL, topology=make_topology(gpus=2),
                         dispatch="nearest", method="contiguous", status="feasible", solve_seconds=0.0)
    phys = [logical_and_physical(rng, n)[1] for n in (8, 3, 11, 1, 6)]
    kw = dict(placement=str(p2l), stack="sglang")
    if case == "sglang-npy":
        np.save(tmp_path / "r3.npy", np.concatenate(phys).astype(">u2"))  # read in its own dtype
        return dict(path=str(tmp_path / "r3.npy"), **kw), 29
    if case == "sglang-b64":
        path = tmp_path / "r3.txt"
        path.write_text("\n".join(b64_int32(p) for p in phys) + "\n")
        return dict(path=str(path), **kw), 29
    path = tmp_path / "r3.jsonl"  # base64 and nested lists mixed, an empty request among them
    lines = [json.dumps({"request_id": 5 + i, "routed_experts": b64_int32(p) if i % 2 else p.tolist()})
             for i, p in enumerate(phys)]
    lines.insert(2, json.dumps({"routed_experts": ""}))
    path.write_text("\n".join(lines) + "\n")
    return dict(path=str(path), **kw), 29


def assert_same_stats(a, b):
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert x == y, f.name


@pytest.mark.parametrize("case", ["vllm-npy", "vllm-b64", "sglang-npy", "sglang-b64", "sglang-jsonl"])
def test_profile_r3_streamed_stats_equal_the_whole_file(tmp_path, case):
    """Statistics read chunk by chunk, whatever the chunk size, are those of the whole trace."""
    kw, tokens = r3_case(tmp_path, case)
    path = kw.pop("path")
    whole = import_r3(path, model=spec_of(kw.get("model")), placement=kw.get("placement"),
                      stack=kw.get("stack", "vllm"))
    assert whole.num_tokens == tokens
    builder = StatsBuilder(whole.num_layers, whole.num_experts, whole.top_k, sample_size=5, seed=3,
                           model=whole.model)
    builder.update(whole)
    expect = builder.result("all")
    outs = []
    for chunk_tokens in (1, 2, 7, tokens, 1000, None):
        out = tmp_path / f"s{chunk_tokens}.npz"
        outcome = profile_r3(path, **kw, seed=3, sample_size=5, output=str(out), chunk_tokens=chunk_tokens)
        assert outcome.tokens == tokens
        stats = read_stats_npz(out)
        np.testing.assert_array_equal(stats.load, expect.load)
        np.testing.assert_array_equal(stats.sample_ids, expect.sample_ids)
        outs.append(stats)
        chunks = list(stream_r3(path, model=spec_of(kw.get("model")), placement=kw.get("placement"),
                                stack=kw.get("stack", "vllm"), chunk_tokens=chunk_tokens))
        if chunk_tokens is not None:
            assert [c.num_tokens for c in chunks[:-1]] == [chunk_tokens] * (len(chunks) - 1)
        np.testing.assert_array_equal(np.concatenate([c.expert_ids for c in chunks]), whole.expert_ids)
        np.testing.assert_array_equal(np.concatenate([c.request_ids for c in chunks]), whole.request_ids)
        assert {(c.num_experts, c.model) for c in chunks} == {(whole.num_experts, whole.model)}
    for stats in outs[1:]:
        assert_same_stats(stats, outs[0])


def test_r3_without_tokens_streams_one_empty_chunk(tmp_path, placement):
    path = tmp_path / "r3.npy"
    np.save(path, np.zeros((0, 3, 2), np.int32))
    (chunk,) = stream_r3(path, placement=placement, stack="sglang", chunk_tokens=4)
    assert chunk.num_tokens == 0 and chunk.num_layers == 2
    assert profile_r3(str(path), placement=str(placement), stack="sglang", output=str(tmp_path / "s.npz")).tokens == 0
    with pytest.raises(InvalidInputError, match="no model is given") as exc:
        list(stream_r3(path))
    assert exc.value.source == str(path)


@pytest.mark.parametrize("suffix", [".npy", ".txt"])
def test_bad_ids_in_a_later_chunk_exit_2_naming_the_file(tmp_path, placement, monkeypatch, capsys, suffix):
    """Bad ids found mid-stream are the whole file's errors: one line naming the file, nothing written."""
    rng = np.random.default_rng(5)
    _, phys = logical_and_physical(rng, 20)
    path = tmp_path / f"r3{suffix}"

    def save(arr):
        if suffix == ".npy":
            np.save(path, arr)
        else:
            path.write_text("\n".join(b64_int32(arr[i:i + 4]) for i in range(0, len(arr), 4)) + "\n")

    phys[17, 2, 1] = 6  # slots are [0, 6): out of range, in the 6th chunk of 3 tokens
    save(phys)
    out = tmp_path / "s.npz"
    with pytest.raises(InvalidInputError, match=r"physical expert id 6 outside the placement's \[0, 6\) slots") as exc:
        profile_r3(str(path), placement=str(placement), stack="sglang", output=str(out), chunk_tokens=3)
    assert exc.value.source == str(path) and not out.exists()
    # The CLI's default chunk size, shrunk to 3 tokens of this 2-layer top-2 model (64 bytes each).
    monkeypatch.setattr(vllm_r3, "CHUNK_MB", 3 * 64 / 2**20)
    assert vllm_r3.chunk_tokens_for(MODEL, vllm_r3.CHUNK_MB) == 3
    capsys.readouterr()
    code = main(["profile", "--sglang-r3", str(path), "--placement", str(placement), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(path) in err, err
    assert "physical expert id 6 outside" in err and not out.exists()
    phys[17, 2, 1] = -1
    save(phys)
    with pytest.raises(InvalidInputError, match=r"physical expert id -1 outside") as exc:
        profile_r3(str(path), placement=str(placement), stack="sglang", output=str(out), chunk_tokens=3)
    assert exc.value.source == str(path)
    logical = phys.copy()
    logical[17, 2, 1] = 5  # no placement: a physical slot id read as logical, out of range for E=4
    save(logical)
    with pytest.raises(InvalidInputError, match=r"5 out of range \[0, 4\).*--placement\)") as exc:
        list(stream_r3(path, model=MODEL, stack="sglang", chunk_tokens=3))
    assert exc.value.source == str(path)
