"""``placer evaluate`` streams its trace: the metrics of files read chunk by chunk equal those of the
trace held whole, under rank-table and position rules, phase filter and several inputs included."""

from __future__ import annotations

import json

import numpy as np
import pytest

from placer.app.workflow import evaluate_placement, write_synthetic
from placer.errors import InvalidInputError
from placer.io import read_trace
from placer.io.placements import PlacementFile
from placer.io.routing import chunk_tokens_for, concat_traces
from placer.metrics import evaluate
from placer.presets import get_model
from placer.types import PHASE_CODES, Placement, Topology


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two seeded synthetic Mixtral traces (prefill .npz, decode .parquet) and a placement with replicas."""
    d = tmp_path_factory.mktemp("stream")
    model = get_model("mixtral-8x7b")
    npz, parquet = d / "prefill.npz", d / "decode.parquet"
    write_synthetic(model, 3000, seed=1, phase="prefill", output=str(npz))
    write_synthetic(model, 2000, seed=2, phase="decode", output=str(parquet))
    rng = np.random.default_rng(3)
    e, spg, topology = model.num_experts, 3, Topology("test", 2, 2)
    p = spg * topology.num_gpus
    p2l = np.stack([rng.permutation(np.concatenate([np.arange(e), rng.integers(0, e, p - e)]))
                    for _ in range(model.num_moe_layers)])
    pf = PlacementFile(Placement(p2l, spg, e), model, topology, "nearest", "test", "feasible", 0.0)
    return pf, [str(npz), str(parquet)]


@pytest.mark.parametrize("rule", ["nearest", "sglang-static", "vllm", "sglang-dynamic"])
@pytest.mark.parametrize("phase", ["all", "decode"])
def test_streamed_evaluate_equals_whole_trace(files, rule, phase):
    pf, inputs = files
    chunk_mb = 0.05  # ~50 tokens per chunk: a hundred chunks
    assert chunk_tokens_for(pf.model, chunk_mb) < 100
    got = evaluate_placement(pf, inputs, dispatch=rule, execution="context-coherent", phase=phase,
                             chunk_mb=chunk_mb)
    whole = concat_traces([read_trace(path, model=pf.model) for path in inputs], pf.model)
    if phase != "all":
        whole = whole.select_tokens(whole.phase == PHASE_CODES[phase])
    want = evaluate(pf.placement, pf.topology, pf.model, whole, dispatch=rule, execution="context-coherent")
    want["data"]["inputs"] = got["data"]["inputs"]
    want["data"]["synthetic"] = got["data"]["synthetic"]
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    assert got["data"]["tokens"] == (5000 if phase == "all" else 2000) and got["data"]["synthetic"]


def test_chunk_budget_must_be_positive(files):
    pf, inputs = files
    with pytest.raises(InvalidInputError, match="chunk budget must be positive"):
        evaluate_placement(pf, inputs, dispatch="nearest", chunk_mb=0)
