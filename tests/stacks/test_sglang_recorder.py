"""placer's SGLang dump readers against dumps written by RELEASED SGLang 0.5.23's own recorder.

``sglang_probe.py record`` (run in .venv-stacks) drives SGLang's ``ExpertDistributionRecorder``
(its single-pass gatherer + accumulator + ``dump_record``) with the physical top-k ids fed here,
under a placement with redundant slots; placer's public readers (``placer.io.read_input`` /
``read_trace`` and ``placer.io.routing.gather_routing``) must give back the logical ids/counts.

Stubs/shims inside the probe (see tests/stacks/sglang_probe.py): ``torchvision`` module stub
(imported at module level by sglang.srt.configs -> multimodal.internvl_utils; no CPU wheel of
torchvision 0.28 exists), ``sglang.srt.eplb.expert_distribution.get_device`` -> "cpu" (the
accelerator probe raises on a CPU-only host), ``torch.cpu.empty_cache`` no-op.
"""

from __future__ import annotations

import numpy as np
import pytest
from stacks_support import STACKS_DIR, run_probe

from placer.io import read_input, read_trace
from placer.io.routing import gather_routing
from placer.presets import get_model

pytestmark = pytest.mark.stacks

CONFIGS = STACKS_DIR / "configs"
PASSES, TOKENS = 3, 7
MODES = (1, 2)  # SGLang ForwardMode: EXTEND (prefill), DECODE


def _routing(rng, num_layers, dense, e, k, redundant):
    """A placement [layers, E+R] and physical top-k ids [passes, layers, tokens, k].

    Every token picks k distinct LOGICAL experts (as SGLang's top-k does), each sent to a
    random replica; dense layers hold -1 (the model never calls select_experts there).
    """
    p2l = np.concatenate([np.tile(np.arange(e), (num_layers, 1)),
                          rng.integers(0, e, size=(num_layers, redundant))], axis=1)
    for row in p2l:
        rng.shuffle(row)
    phys = np.full((PASSES, num_layers, TOKENS, k), -1, dtype=np.int64)
    for p in range(PASSES):
        for layer in range(num_layers):
            if layer in dense:
                continue
            for t in range(TOKENS):
                for j, lid in enumerate(rng.choice(e, size=k, replace=False)):
                    phys[p, layer, t, j] = rng.choice(np.flatnonzero(p2l[layer] == lid))
    return p2l, phys


CASES = {
    # name: (config, preset, hidden layers, dense layer ids, E, top-k, redundant slots)
    "deepseek-v2-lite": ("deepseek-v2-lite.json", "deepseek-v2-lite", 27, {0}, 64, 6, 8),
    "qwen3-30b-a3b": ("qwen3-30b-a3b.json", "qwen3-30b-a3b", 48, set(), 128, 8, 16),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def dumps(request, stacks_python, tmp_path_factory):
    cfg, preset, num_layers, dense, e, k, r = CASES[request.param]
    rng = np.random.default_rng(7)
    p2l, phys = _routing(rng, num_layers, dense, e, k, r)
    d = tmp_path_factory.mktemp(f"sglang-{request.param}")
    np.save(d / "p2l.npy", p2l)
    np.save(d / "ids.npy", phys)
    out = {}
    for mode in ("per_token", "per_pass", "stat"):
        res = run_probe("sglang_probe.py", "record", "--mode", mode, "--model-config", CONFIGS / cfg,
                        "--topk-ids", d / "ids.npy", "--physical-to-logical-map", d / "p2l.npy",
                        "--out-dir", d / mode, "--forward-modes", ",".join(map(str, MODES)))
        assert len(res["paths"]) == 1, res
        assert (res["num_layers"], res["num_physical_experts"], res["num_logical_experts"]) == \
            (num_layers, e + r, e), res
        out[mode] = res["paths"][0]
    moe = [layer for layer in range(num_layers) if layer not in dense]
    # logical ids [passes * tokens, MoE layers, k], in the order fed
    logical = np.stack([p2l[layer][phys[:, layer]] for layer in moe], axis=2).reshape(-1, len(moe), k)
    load = np.zeros((len(moe), e), dtype=np.int64)
    for i in range(len(moe)):
        np.add.at(load[i], logical[:, i].ravel(), 1)
    return {"model": get_model(preset), "logical": logical, "load": load, **out}


def test_per_token_dump_from_sglang(dumps):
    model, path = dumps["model"], dumps["per_token"]
    inp = read_input(path, model=model)
    assert (inp.kind, inp.format) == ("trace", "sglang-per-token")
    assert read_input(path, model=model, format="sglang-per-token").format == "sglang-per-token"
    trace = read_trace(path, model=model)
    np.testing.assert_array_equal(trace.expert_ids, dumps["logical"])
    want_phase = np.repeat([0 if MODES[i % len(MODES)] == 1 else 1 for i in range(PASSES)], TOKENS)
    np.testing.assert_array_equal(trace.phase, want_phase)
    # without a model: dense layers (all -1) dropped, same ids
    np.testing.assert_array_equal(read_trace(path).expert_ids, dumps["logical"])
    routing = gather_routing([str(path)], model=model)
    np.testing.assert_array_equal(routing.stats.load, dumps["load"])


@pytest.mark.parametrize("mode,fmt", [("per_pass", "sglang-per-pass"), ("stat", "sglang-stat")])
def test_count_dumps_from_sglang(dumps, mode, fmt):
    model, path = dumps["model"], dumps[mode]
    inp = read_input(path, model=model)
    assert (inp.kind, inp.format) == ("stats", fmt)
    np.testing.assert_array_equal(inp.stats.load, dumps["load"])
    routing = gather_routing([str(path)], model=model)
    np.testing.assert_array_equal(routing.stats.load, dumps["load"])
