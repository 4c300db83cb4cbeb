"""Bad inputs of the reliability issue: each exits 2 with one line naming the input and the problem,
and leaves nothing behind (no partial output file).

Every case is one row of ``CASES``: (id, maker, expected exit code, expected phrase). A maker
writes its inputs under ``tmp_path`` and returns the argv of ``placer``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run

from placer.cli import main

MIXTRAL = ("--model", "mixtral-8x7b")


def _quiet(*args) -> None:
    """Run the CLI for a setup step (its output is not the test's), asserting success."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    assert code == 0, (code, out.getvalue(), err.getvalue())


def _hdmoe(tmp_path: Path, layers=None, name="trace.json") -> Path:
    """A valid HD-MoE trace of Mixtral's shape (32 layers, top-2 of 8), or ``layers`` as given."""
    if layers is None:
        rng = np.random.default_rng(0)
        layers = {str(n): [list(map(int, rng.choice(8, 2, replace=False))) for _ in range(40)] for n in range(32)}
    p = tmp_path / name
    p.write_text(json.dumps(layers))
    return p


def _hdmoe_bad(value):
    def make(tmp_path):
        return ["stats", _hdmoe(tmp_path, {"0": [[0, value], [2, 3]], "1": [[1, 2], [3, 0]]})]
    return make


def _megatron_bad(value):
    def make(tmp_path):
        p = tmp_path / "router_trace_rank0.jsonl"
        p.write_text("\n".join(json.dumps({"step": 0, "layer": layer, "top_indices": [[0, value], [2, 3]]})
                               for layer in range(2)) + "\n")
        return ["stats", p]
    return make


def _r3_bad(value):
    def make(tmp_path):
        p = tmp_path / "outputs.jsonl"
        p.write_text(json.dumps({"request_id": 0, "routed_experts": [[[0, value]] * 32]}) + "\n")
        return ["profile", "--vllm-r3", p, *MIXTRAL, "-o", tmp_path / "s.npz"]
    return make


def _csv(text: str, name: str = "load.csv"):
    def make(tmp_path):
        p = tmp_path / name
        p.write_text(text)
        return ["stats", p]
    return make


def _argv(*args):
    """A maker of fixed argv ({tmp} is replaced by tmp_path, {trace} by a valid HD-MoE trace)."""
    def make(tmp_path):
        out = []
        for a in args:
            if "{trace}" in a:
                a = a.replace("{trace}", str(_hdmoe(tmp_path)))
            out.append(a.replace("{tmp}", str(tmp_path)))
        return out
    return make


def _placement(tmp_path: Path) -> Path:
    p = tmp_path / "p.json"
    _quiet("solve", _hdmoe(tmp_path), *MIXTRAL, "--gpus", "4", "--method", "contiguous", "-o", p)
    return p


def _export_onnx(tmp_path):
    return ["export", _placement(tmp_path), "--format", "onnx", "-o", tmp_path / "x.onnx"]


def _serve_other_models_state(tmp_path):
    from placer.app.serve.state import STATE_KIND, STATE_VERSION
    from placer.presets import get_model
    m = get_model("mixtral-8x7b")
    state = tmp_path / "state.json"
    state.write_text(json.dumps({
        "kind": STATE_KIND, "version": STATE_VERSION,
        "identity": {"model": m.name, "moe_layers": m.num_moe_layers, "experts": m.num_experts, "top_k": m.top_k,
                     "gpus": 8, "gpus_per_node": 8, "slots": 8},
        "slots_per_gpu": 1, "arrays": {"physical_to_logical": [list(range(8))] * m.num_moe_layers}}))
    return ["serve", "--model", "deepseek-v2-lite", "--gpus", "8", "--state", state]


def _npy_bytes(shape, data: bytes = b"\0" * 64, descr: str = "<f8") -> bytes:
    """A .npy whose header declares ``shape`` but whose data is ``data`` (numpy's header writer)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue() + data


def _npz_declaring(shape, data: bytes = b"\0" * 64):
    def make(tmp_path):
        p = tmp_path / "load.npz"
        with zipfile.ZipFile(p, "w") as zf:
            zf.writestr("load.npy", _npy_bytes(shape, data))
        return ["stats", p]
    return make


def _npy_declaring(tmp_path):
    p = tmp_path / "r3.npy"
    p.write_bytes(_npy_bytes((10**6, 10**3, 10**3), descr="<i8"))
    return ["stats", p]


def _r3_b64_declaring(tmp_path):
    p = tmp_path / "outputs.jsonl"
    payload = base64.b64encode(_npy_bytes((10**6, 10**3, 10**3), descr="<i8")).decode()
    p.write_text(json.dumps({"request_id": 0, "routed_experts": payload}) + "\n")
    return ["profile", "--vllm-r3", p, *MIXTRAL, "-o", tmp_path / "s.npz"]


DEEP = 200_000


def _deep_file(text: str, name: str, *argv: str):
    """A file holding ``text`` (``{deep}`` becomes a DEEP-deep nested list), run as ``argv`` ({file}, {tmp})."""
    def make(tmp_path):
        p = tmp_path / name
        p.write_text(text.replace("{deep}", "[" * DEEP + "]" * DEEP))
        return [a.replace("{file}", str(p)).replace("{tmp}", str(tmp_path)) for a in argv]
    return make


def _solve_huge_cluster(tmp_path):
    trace = tmp_path / "ds.npz"
    _quiet("synth", "--model", "deepseek-v3", "--tokens", "20", "-o", trace)
    return ["solve", trace, "--model", "deepseek-v3", "--gpus", "65536", "--redundant", "65280",
            "--method", "contiguous", "-o", tmp_path / "p.json"]


LABELLED = ("Layer,Language,Expert_1,Expert_0\n"
            "0,English,1,2\n0,Hebrew,3,4\n1,English,5,6\n1,Hebrew,7,8\n")

CASES = [
    # 1. ids that are not integers, or out of range, are refused (never truncated or wrapped)
    ("hdmoe-fractional-id", _hdmoe_bad(1.5), 2, "layer 0: expert id 1.5 is not an integer"),
    ("hdmoe-string-id", _hdmoe_bad("1"), 2, 'layer 0: expert id "1" is not an integer'),
    ("hdmoe-bool-id", _hdmoe_bad(True), 2, "layer 0: expert id true is not an integer"),
    ("megatron-fractional-id", _megatron_bad(1.5), 2, "top_indices: expert id 1.5 is not an integer"),
    ("megatron-string-id", _megatron_bad("1"), 2, 'top_indices: expert id "1" is not an integer'),
    ("megatron-bool-id", _megatron_bad(False), 2, "top_indices: expert id false is not an integer"),
    ("r3-fractional-id", _r3_bad(1.5), 2, "routed_experts: expert id 1.5 is not an integer"),
    ("r3-string-id", _r3_bad("1"), 2, 'routed_experts: expert id "1" is not an integer'),
    ("r3-bool-id", _r3_bad(True), 2, "routed_experts: expert id true is not an integer"),
    ("csv-load-2**63", _csv("1,2,3\n9223372036854775808,1,1\n"), 2, "out of range"),
    ("hdmoe-id-40000", _hdmoe_bad(40000), 2, "expert id 40000 out of range [0, 32768)"),
    # 2. NaN and inf in float options
    ("solve-time-limit-nan", _argv("solve", "{trace}", *MIXTRAL, "--gpus", "4", "--time-limit", "nan",
                                   "-o", "{tmp}/p.json"), 2, "'--time-limit': 'nan' is not a finite number"),
    ("synth-perturb-nan", _argv("synth", *MIXTRAL, "--tokens", "10", "--perturb", "nan", "-o", "{tmp}/t.npz"),
     2, "'--perturb': 'nan' is not a finite number"),
    ("apply-timeout-nan", _argv("apply", "--timeout", "nan"), 2, "'--timeout': 'nan' is not a finite number"),
    ("profile-duration-inf", _argv("profile", "--duration", "inf", "-o", "{tmp}/s.npz"), 2,
     "'--duration': 'inf' is not a finite number"),
    ("serve-half-life-nan", _argv("serve", "--half-life", "nan"), 2, "'--half-life': 'nan' is not a finite"),
    ("serve-threshold-inf", _argv("serve", "--threshold", "inf"), 2, "'--threshold': 'inf' is not a finite"),
    ("serve-horizon-nan", _argv("serve", "--horizon", "nan"), 2, "'--horizon': 'nan' is not a finite"),
    ("serve-interval-inf", _argv("serve", "--interval", "inf"), 2, "'--interval': 'inf' is not a finite"),
    ("serve-time-limit-nan", _argv("serve", "--time-limit", "nan"), 2, "'--time-limit': 'nan' is not a finite"),
    ("simulate-rate-nan", _argv("simulate", "run", *MIXTRAL, "--gpus", "4", "--rate", "nan"), 2,
     "'--rate': 'nan' is not a finite number"),
    ("sweep-rates-nan", _argv("simulate", "sweep", *MIXTRAL, "--rates", "5,nan", "-o", "{tmp}/sweep"), 2,
     "--rates: must be positive finite numbers"),
    ("solve-weights-inf", _argv("solve", "{trace}", *MIXTRAL, "--gpus", "4", "--weights", "balance=inf",
                                "-o", "{tmp}/p.json"), 2, "--weights: weights must be non-negative finite"),
    ("solve-load-cap-nan", _argv("solve", "{trace}", *MIXTRAL, "--gpus", "4", "--method", "exact", "--load-cap",
                                 "nan", "-o", "{tmp}/p.json"), 2, "'--load-cap': 'nan' is not a finite number"),
    ("solve-load-cap-below-1", _argv("solve", "{trace}", *MIXTRAL, "--gpus", "4", "--method", "exact",
                                     "--load-cap", "0.5", "-o", "{tmp}/p.json"), 2, "0.5 is not in the range x>=1.0"),
    ("solve-load-cap-unreachable", _argv("solve", "{trace}", *MIXTRAL, "--gpus", "4", "--nodes", "2", "--redundant",
                                         "4", "--method", "exact", "--load-cap", "1", "-o", "{tmp}/p.json"), 2,
     "no placement keeps max/mean GPU load <= 1 in every layer"),
    ("solve-frontier-not-exact", _argv("solve", "{trace}", *MIXTRAL, "--gpus", "4", "--frontier", "-o",
                                       "{tmp}/p.json"), 2, "--frontier needs --method exact (got --method placer)"),
    # 3. nothing to fit
    ("solve-model-only", _argv("solve", "--model", "deepseek-v3", "--gpus", "16", "-o", "{tmp}/p.json"), 2,
     "no routing input: pass a trace or statistics, or make one with `placer synth`"),
    ("solve-all-zero-load", lambda tmp_path: ["solve", _csv("0,0,0,0\n0,0,0,0\n", "zero.csv")(tmp_path)[1],
                                              "--gpus", "2", "-o", tmp_path / "p.json"],
     2, "zero.csv: load matrix is all zeros"),
    # 4. messages that name the right flag and a sensible fix
    ("export-unknown-format", _export_onnx, 2, "--format: unknown format 'onnx'"),
    ("synth-perturb-inf", _argv("synth", *MIXTRAL, "--tokens", "10", "--perturb", "inf", "-o", "{tmp}/t.npz"),
     2, "'--perturb': 'inf' is not a finite number"),
    ("redundant-beyond-memory", _argv("solve", "{trace}", *MIXTRAL, "--gpus", "4", "--redundant", "1000000000",
                                      "-o", "{tmp}/p.json"), 2,
     "--redundant 1000000000 exceeds what fits in GPU memory; the largest that fits on 4 GPUs is --redundant 20"),
    ("redundant-beyond-memory-uneven", _argv("solve", "{trace}", *MIXTRAL, "--gpus", "4", "--redundant",
                                             "1000000001", "-o", "{tmp}/p.json"), 2,
     "the largest that fits on 4 GPUs is --redundant 20"),
    ("serve-state-of-another-model", _serve_other_models_state, 2,
     "the state file was written for mixtral-8x7b (32 MoE layers, E=8, top_k=2) on 8 GPUs with 8 slots per layer, "
     "not deepseek-v2-lite"),
    # 5. unwritable outputs and infinite workloads: refused before any work
    ("simulate-rate-inf", _argv("simulate", "run", *MIXTRAL, "--gpus", "4", "--method", "contiguous",
                                "--rate", "inf"), 2, "'--rate': 'inf' is not a finite number"),
    ("simulate-duration-inf", _argv("simulate", "run", *MIXTRAL, "--gpus", "4", "--method", "contiguous",
                                    "--duration", "inf"), 2, "'--duration': 'inf' is not a finite number"),
    ("simulate-output-under-file", _argv("simulate", "run", *MIXTRAL, "--gpus", "4", "--method", "contiguous",
                                         "-o", "/dev/null/x"), 2, "/dev/null/x: cannot write: '/dev/null' is not"),
    ("solve-output-under-file", _argv("solve", "{trace}", *MIXTRAL, "--gpus", "4", "-o", "/dev/null/x.json"), 2,
     "/dev/null/x.json: cannot write: '/dev/null' is not a directory"),
    ("solve-from-missing", _argv("solve", "{trace}", *MIXTRAL, "--gpus", "4", "--from", "{tmp}/none.json",
                                 "-o", "{tmp}/p.json"), 2, "none.json"),
    ("solve-from-other-shape", lambda tmp_path: ["solve", _hdmoe(tmp_path), *MIXTRAL, "--gpus", "4", "--redundant",
                                                 "4", "--from", _placement(tmp_path), "-o", tmp_path / "q.json"], 2,
     "--from: the running placement is [32 layers, 8 experts] on 4 GPUs x 2 slots; this solve is [32, 8] on 4 x 3"),
    ("solve-horizon-zero", _argv("solve", "{trace}", *MIXTRAL, "--gpus", "4", "--horizon-s", "0",
                                 "-o", "{tmp}/p.json"), 2, "'--horizon-s'"),
    ("synth-output-under-file", _argv("synth", *MIXTRAL, "--tokens", "10", "-o", "/dev/null/x.npz"), 2,
     "/dev/null/x.npz: cannot write: '/dev/null' is not a directory"),
    ("solve-export-missing-dir", _argv("solve", "{trace}", *MIXTRAL, "--gpus", "4", "-o", "{tmp}/p.json",
                                       "--export", "eplb={tmp}/nodir/e.npz"), 2,
     "nodir/e.npz: cannot write: directory"),
    ("solve-export-refused", _argv("solve", "{trace}", *MIXTRAL, "--gpus", "4", "-o", "{tmp}/p.json",
                                   "--export", "eplb={tmp}/e.npz", "--export", "sglang={tmp}/s.json"), 2,
     "s.json: sglang 0.5.23 cannot place mixtral-8x7b"),
    # 6. load CSVs with a header and label columns
    ("csv-labelled-columns", _csv(LABELLED), 0,
     "load from columns Expert_0..Expert_1 (2 experts), 4 rows summed per Layer into 2 layers; "
     "ignored columns: Language"),
    ("csv-labelled-numeric-columns", _csv("name,a,b\nx,1,2\ny,3,4\n"), 0,
     "load from the numeric columns a, b (2 experts); ignored columns: name"),
    ("csv-labelled-non-numeric", _csv("Layer,Expert_0,Expert_1\n0,1,x\n"), 2,
     "row 2, column Expert_1: non-numeric value 'x'"),
    ("csv-labelled-missing-expert", _csv("Layer,Expert_0,Expert_2\n0,1,2\n"), 2, "Expert_1 is missing"),
    # 7. tiny files that declare huge arrays: sized from the header before anything is allocated
    ("npz-declares-8TB", _npz_declaring((10**6, 10**6)), 2, "load.npz: member load.npy declares an array of 8.000 TB; "),
    ("npz-member-truncated", _npz_declaring((4, 4), b"\0" * 16), 2,
     "member load.npy is truncated or corrupt: its header declares [4, 4] float64 (128 B), it holds 16 B"),
    ("npy-declares-8TB", _npy_declaring, 2, "r3.npy: declares an array of 8.000 TB; "),
    ("r3-base64-npy-declares-8TB", _r3_b64_declaring, 2, "line 1: .npy payload declares an array of 8.000 TB; "),
    ("sglang-csv-huge-expert-id", _csv("layer_id,expert_id,count\n0,1000000000000,5\n0,1,3\n", "counts.csv"), 2,
     "expert id 1000000000000 means a [1, 1000000000001] load matrix: reading it needs about 32.00 TB; "),
    # 8. work sized by a flag: estimated, and refused with both figures, before it starts
    ("synth-1e12-tokens", _argv("synth", *MIXTRAL, "--tokens", "1000000000000", "-o", "{tmp}/t.npz"), 2,
     "--tokens: 1,000,000,000,000 tokens of mixtral-8x7b need at least about 384.0 TB on disk; "),
    ("evaluate-chunk-mb-0", _argv("evaluate", "{tmp}/p.json", "{tmp}/t.npz", "--chunk-mb", "0"), 2,
     "--chunk-mb"),
    ("synth-1e12-tokens-parquet", _argv("synth", *MIXTRAL, "--tokens", "1000000000000", "-o", "{tmp}/t.parquet"), 2,
     "--tokens: 1,000,000,000,000 tokens of mixtral-8x7b need at least about 128.0 TB on disk; "),
    ("simulate-65536-gpus", _argv("simulate", "run", "--model", "deepseek-v3", "--gpus", "65536", "--redundant",
                                  "65280", "--method", "contiguous"), 2,
     "--gpus: 65536 GPUs (simulated [layers, GPUs, GPUs] traffic of deepseek-v3) need about 7.979 TB; "),
    ("solve-65536-gpus", _solve_huge_cluster, 2, "--gpus: 65536 GPUs"),
    ("serve-65536-gpus", _argv("serve", "--model", "deepseek-v3", "--gpus", "65536", "--redundant", "65280"), 2,
     "--gpus: 65536 GPUs (simulated [layers, GPUs, GPUs] traffic of deepseek-v3) need about 7.979 TB; "),
    # 9. deeply nested JSON
    ("hdmoe-nested-too-deeply", _deep_file('{"0": [{deep}]}', "trace.json", "stats", "{file}"), 2,
     "trace.json: corrupt or malformed HD-MoE JSON: nested too deeply"),
    ("placement-nested-too-deeply", _deep_file("{deep}", "p.json", "export", "{file}", "--format", "eplb", "-o",
                                               "{tmp}/e.npz"), 2, "p.json: corrupt or malformed placement JSON: nested too deeply"),
    ("serve-state-nested-too-deeply", _deep_file('{"kind": {deep}}', "state.json", "serve", *MIXTRAL, "--gpus", "8",
                                                 "--state", "{file}"), 2,
     "state.json: cannot read the state file (JSON nested too deeply)"),
    # 10. serve's outputs are checked at start-up, before it binds
    ("serve-output-missing-dir", _argv("serve", *MIXTRAL, "--gpus", "8", "-o", "{tmp}/nodir/p.json"), 2,
     "nodir/p.json: cannot write: directory"),
    ("serve-state-missing-dir", _argv("serve", *MIXTRAL, "--gpus", "8", "--state", "{tmp}/nodir/s.json"), 2,
     "nodir/s.json: cannot write: directory"),
]


@pytest.mark.parametrize("maker, code, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(capsys, tmp_path, maker, code, phrase):
    args = maker(tmp_path)
    capsys.readouterr()
    before = set(tmp_path.rglob("*"))
    got, out, err = run(capsys, *args)
    assert got == code, (got, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert phrase in lines[0], lines[0]
    assert "Traceback" not in err
    if code == 2:
        assert lines[0].startswith("placer: error: "), lines[0]
        assert set(tmp_path.rglob("*")) == before  # nothing left behind


def test_labelled_csv_sums_rows_per_layer(tmp_path):
    from placer.io.traces import read_input
    p = tmp_path / "load.csv"
    p.write_text(LABELLED)
    np.testing.assert_array_equal(read_input(p).stats.load, [[6, 4], [14, 12]])
    p.write_text("Layer,Expert_0,Expert_1\n1,5,6\n0,1,2\n")  # one row per layer: ordered by Layer
    np.testing.assert_array_equal(read_input(p).stats.load, [[1, 2], [5, 6]])


def test_whole_float_ids_are_still_read(tmp_path):
    from placer.io.traces import read_input
    p = _hdmoe(tmp_path, {"0": [[0, 1.0], [2, 3]], "1": [[1, 2], [3, 0]]})
    trace = next(iter(read_input(p).chunks()))
    assert trace.expert_ids[0, 0].tolist() == [0, 1]


def test_npz_that_inflates_beyond_memory_is_refused(capsys, tmp_path, monkeypatch):
    """A small zip whose member inflates past the memory available (here: 1 MB) is refused unread."""
    import placer.resources
    monkeypatch.setattr(placer.resources, "memory_available", lambda: 10**6)
    p = tmp_path / "bomb.npz"
    np.savez_compressed(p, load=np.zeros((1000, 1000)))  # 8 MB of zeros in a few kB
    assert p.stat().st_size < 100_000
    code, out, err = run(capsys, "stats", p)
    assert code == 2, (code, out, err)
    assert err.strip() == f"placer: error: {p}: member load.npy declares an array of 8.000 MB; 1.000 MB available"


def _ones(layers=4, experts=8) -> list[list[float]]:
    return [[1.0] * experts for _ in range(layers)]


# Bodies POSTed to serve's /stats: (id, body bytes, expected HTTP status, expected phrase of the error).
POSTS = [
    ("post-nested-too-deeply", b'{"load": ' + b"[" * DEEP + b"]" * DEEP + b"}", 400,
     "body is not valid JSON (nested too deeply)"),
    ("post-load-1e308", json.dumps({"load": [[1e308] * 8] * 4}).encode(), 400,
     "load holds 1e+308, above the largest count accepted (1e+15)"),
    ("post-load-one-huge-entry", json.dumps({"load": [[1e16] + [1.0] * 7] + _ones(3)}).encode(), 400,
     "load holds 1e+16, above the largest count accepted"),
    ("post-num-tokens-1e308", json.dumps({"load": _ones(), "num_tokens": 1e308}).encode(), 400,
     "num_tokens must be a non-negative number up to 1e+15"),
    ("post-top1-1e308", json.dumps({"load": _ones(), "top1_transitions": [[[1e308] * 8] * 8] * 3}).encode(), 400,
     "top1_transitions holds 1e+308"),
]


@pytest.mark.timeout(60)
def test_bad_posts_to_serve():
    import urllib.error
    import urllib.request

    from placer.app.serve import PolicyConfig, ServeConfig, Service
    from placer.presets import make_topology
    from placer.types import ModelSpec

    model = ModelSpec("tiny-moe", 4, tuple(range(4)), 8, 2, hidden_size=1024, expert_ffn_size=2048)
    service = Service(ServeConfig(model=model, topology=make_topology("h100", gpus=4),
                                  policy=PolicyConfig(threshold=0.05, seed=0), half_life=4.0, interval_s=0.05,
                                  host="127.0.0.1", port=0, token=None))
    host, port = service.start()
    try:
        for name, body, status, phrase in POSTS:
            req = urllib.request.Request(f"http://{host}:{port}/stats", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    got, reply = resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                got, reply = exc.code, exc.read()
            assert got == status, (name, got, reply)
            assert reply.count(b"\n") <= 1, (name, reply)
            error = json.loads(reply)["error"]
            assert phrase in error and "Traceback" not in error, (name, error)
        req = urllib.request.Request(f"http://{host}:{port}/stats", data=json.dumps({"load": _ones()}).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:  # the service survived and takes good posts
            assert resp.status == 202
    finally:
        service.stop()
