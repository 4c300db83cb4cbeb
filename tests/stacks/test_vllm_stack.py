"""placer against RELEASED vLLM 0.34.0 code (CPU only), run through tests/stacks/vllm_probe.py.

Runs in the main venv and shells out to the stacks python: ``<repo>/.venv-stacks/bin/python``
(torch==2.13.0 CPU, ``vllm==0.34.0 --no-deps``, tests/stacks/requirements-vllm.txt) through
conftest's ``run_probe`` (missing: skipped, unless ``CI`` is set, then it fails), or the
interpreter ``$PLACER_STACKS_PYTHON`` names.

Checked: (i) vLLM's own R3 encoder (``numpy2base64`` after the capturer's uint8/uint16 cast) read
by placer's R3 reader gives back the same LOGICAL ids, with and without redundant experts, and
a placement is refused for vLLM R3; (ii) vLLM's ``EPLBConfig`` and its ``vllm serve`` engine
parser accept the flags placer prints (``--eplb-config '{"num_redundant_experts": R}'``) and
reject an unknown key; (iii) vLLM's own initial map is ``arange(E + R) % E``, replicas in
ascending slot order.

Stubs: none in sys.modules; the probe's two shims (``VLLM_TARGET_DEVICE=cpu``; a CUDA-alike
platform while ``ParallelConfig`` validates) are listed in its docstring. The replica hash runs
in a Triton kernel (no CPU path), so ``vllm_physical_slot`` below is encoded from
``vllm/model_executor/layers/fused_moe/eplb_triton.py:27-37``, not run.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from placer.errors import InvalidInputError
from placer.profiling.vllm_r3 import import_r3
from placer.types import ModelSpec

pytestmark = [pytest.mark.stacks, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("vllm_probe.py")


@pytest.fixture(scope="module")
def probe():
    """Runs vllm_probe.py: through conftest's ``run_probe`` (``.venv-stacks``; skip, or fail under
    CI, when missing) unless ``PLACER_STACKS_PYTHON`` names another interpreter."""
    override = os.environ.get("PLACER_STACKS_PYTHON")
    if not override:
        import importlib.util
        spec = importlib.util.spec_from_file_location("_stacks_conftest", PROBE.with_name("conftest.py"))
        helpers = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(helpers)
        helpers.stacks_python_path()
        return lambda *args: helpers.run_probe(PROBE, *args)
    if not Path(override).exists():
        pytest.fail(f"PLACER_STACKS_PYTHON={override} does not exist", pytrace=False)

    def run(*args: str) -> dict:
        proc = subprocess.run([override, str(PROBE), *args], capture_output=True, text=True, timeout=240,
                              cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return run


def vllm_physical_slot(t: np.ndarray, e: np.ndarray, log2phy: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    """vLLM 0.34.0's physical slot for token row ``t`` routed to logical expert ``e`` in one layer.

    ``log2phy [E, X]`` (-1 padded, replicas in ascending slot order, as vLLM's
    ``compute_logical_maps`` and ``add_model`` build them) and ``logcnt [E]`` of that layer.
    ``t`` is the row in the batch the router sees (see VLLM_FINDINGS.md).
    """
    h = (t.astype(np.int64) * 2654435769) & 0xFFFFFFFF
    return log2phy[e, h % logcnt[e]]


def npy_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.mark.parametrize("experts,redundant,dtype", [(8, 0, "uint8"), (8, 4, "uint8"), (300, 0, "uint16"),
                                                     (300, 4, "uint16")])
def test_vllm_encoded_r3_reads_back_logical(tmp_path, probe, experts, redundant, dtype):
    model = ModelSpec(name="v", num_hidden_layers=3, moe_layer_ids=(1, 2), num_experts=experts, top_k=2)
    rng = np.random.default_rng(experts + redundant)
    requests = []
    for tokens in (5, 3):
        moe = np.stack([np.stack([rng.choice(experts, 2, replace=False) for _ in range(2)])
                        for _ in range(tokens)])
        requests.append((moe, np.concatenate([np.zeros((tokens, 1, 2), np.int32), moe], axis=1)))  # dense row 0
    lines = []
    for i, (_, r3) in enumerate(requests):
        np.save(tmp_path / f"r{i}.npy", r3.astype(np.int32))
        out = probe("r3-encode", str(tmp_path / f"r{i}.npy"), "--num-experts", str(experts))
        assert out["dtype"] == dtype and out["shape"] == list(r3.shape)
        assert base64.b64decode(out["routed_experts"]).startswith(b"\x93NUMPY")
        lines.append(json.dumps({"request_id": 7 + i, "routed_experts": out["routed_experts"]}))
    path = tmp_path / "outputs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    trace = import_r3(path, model=model)  # vLLM R3 ids are logical whatever R is: no remap
    assert (trace.expert_ids == np.concatenate([m for m, _ in requests])).all()
    if redundant:
        # The slots vLLM actually ran differ from the R3 ids; mapping R3 through them would be wrong.
        p2l = np.arange(experts + redundant) % experts
        l2p = np.full((experts, 2), -1)
        cnt = np.bincount(p2l, minlength=experts)
        for e in range(experts):
            l2p[e, :cnt[e]] = np.flatnonzero(p2l == e)
        moe = requests[0][0]
        t = np.arange(moe.shape[0])[:, None]
        slots = vllm_physical_slot(np.broadcast_to(t, moe[:, 0].shape), moe[:, 0], l2p, cnt)
        assert (p2l[slots] == moe[:, 0]).all()
        placement = tmp_path / "p.json"
        placement.write_text(json.dumps({"physical_to_logical_map": [p2l.tolist()] * 3}))
        with pytest.raises(InvalidInputError, match="already logical"):
            import_r3(path, model=model, placement=placement)


@pytest.mark.parametrize("gpus,redundant", [(8, 8), (4, 0), (16, 32)])
def test_vllm_accepts_the_eplb_flags_placer_prints(probe, gpus, redundant):
    from placer.io.stack_files import vllm_flags
    from placer.presets import make_topology

    flags = [f for f in vllm_flags(make_topology(gpus=gpus), redundant) if not f.startswith("#")]
    argv = shlex.split(" ".join(flags))
    eplb_json = json.loads(argv[argv.index("--eplb-config") + 1])
    assert eplb_json == {"num_redundant_experts": redundant}
    cfg = probe("eplb-config", json.dumps(eplb_json))
    assert cfg["accepted"] and cfg["config"]["num_redundant_experts"] == redundant
    out = probe("flags", "--experts", "64", "--", *argv)
    assert out["accepted"], out["error"]
    assert out["enable_eplb"] and out["enable_expert_parallel"] and out["ep_size"] == gpus
    assert out["eplb_config"]["num_redundant_experts"] == redundant
    assert out["parallel_config"]["eplb_config"]["num_redundant_experts"] == redundant


def test_vllm_rejects_what_it_should(probe):
    bad = probe("eplb-config", json.dumps({"num_redundant_experts": 8, "initial_placement": "p.json"}))
    assert not bad["accepted"] and "initial_placement" in bad["error"]
    out = probe("flags", "--", "--tensor-parallel-size", "8", "--eplb-config", '{"bogus": 1}')
    assert not out["accepted"] and out["stage"] == "parse" and "bogus" in out["error"]
    out = probe("flags", "--", "--tensor-parallel-size", "8", "--enable-eplb")
    assert not out["accepted"] and "enable_expert_parallel must be True" in out["error"]
    out = probe("flags", "--", "--tensor-parallel-size", "8", "--enable-expert-parallel",
                "--eplb-config", '{"num_redundant_experts": 8}')
    assert not out["accepted"] and "EPLB is not enabled" in out["error"]


@pytest.mark.parametrize("experts,redundant,gpus", [(8, 0, 2), (6, 2, 4), (64, 32, 16)])
def test_vllm_initial_map_is_arange_mod_e(probe, experts, redundant, gpus):
    out = probe("initial-map", "--experts", str(experts), "--redundant", str(redundant), "--ep-size", str(gpus),
                "--layers", "2")
    p2l = np.arange(experts + redundant) % experts
    assert (np.asarray(out["physical_to_logical"]) == p2l).all()
    l2p = np.asarray(out["logical_to_physical"])
    cnt = np.asarray(out["logical_replica_count"])
    assert (cnt == np.bincount(p2l, minlength=experts)).all()
    for e in range(experts):  # replicas in ascending slot order, -1 padded
        assert l2p[0, e, :cnt[0, e]].tolist() == np.flatnonzero(p2l == e).tolist()
        assert (l2p[0, e, cnt[0, e]:] == -1).all()
    again = np.asarray(out["compute_logical_maps"]["logical_to_physical"])
    assert (again == l2p[..., :again.shape[-1]]).all()
    # placer's vllm rule on this map = the encoded kernel over vLLM's own replica lists
    from placer.metrics.dispatch import select_slots
    from placer.types import Placement, Topology
    rows = np.arange(500)
    ids = np.tile(np.arange(experts), 500 // experts + 1)[:500, None, None]
    ours = select_slots(Placement(p2l[None, :], (experts + redundant) // gpus, experts), Topology("t", 1, gpus),
                        ids, token_index=rows, rule="vllm")[:, 0, 0]
    assert (ours == vllm_physical_slot(rows, ids[:, 0, 0], l2p[0], cnt[0])).all()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
