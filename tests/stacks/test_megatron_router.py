"""placer's Megatron JSONL reader against RELEASED megatron-core 0.16.1 routing (CPU only).

``megatron_probe.py`` (run in .venv-stacks) calls megatron-core's own
``moe_utils.topk_routing_with_score_function`` (what ``TopKRouter.routing`` calls) on random
logits for a few layers and writes the records as Megatron-LM's router tracer does:
``routing_map.nonzero()`` per token, so each token's experts are listed in ascending id order.
``router_trace.py`` itself is not in the 0.16.1 wheel (the newest megatron-core for Python
3.11), so the probe transcribes its record layout (see its docstring); the routing is the
released code.

placer must read such a trace with ``order="unknown"``: its loads are the ``routing_map``
column sums, and column 0 is NOT Megatron's top-1 expert (the argmax of ``routing_probs``) for a
large fraction of tokens, which is why the top-1 must be reported unknown. With the
probabilities recorded (``top_probs``) placer's top-1 is Megatron's for every token.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from stacks_support import run_probe

from placer.io import read_input, read_trace
from placer.io.external import MEGATRON_ASCENDING_NOTE
from placer.io.routing import gather_routing

pytestmark = [pytest.mark.stacks, pytest.mark.timeout(300)]

MEGATRON_CORE = "0.16.1"
CASES = {  # name: (experts, top-k, extra probe flags); a random row is ascending with chance ~1/K!
    "softmax-top2": (8, 2, ()),
    "pre-softmax-top4": (16, 4, ("--pre-softmax",)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def megatron(request, stacks_python, tmp_path_factory):
    experts, top_k, flags = CASES[request.param]
    d = tmp_path_factory.mktemp(f"megatron-{request.param}")
    out = run_probe("megatron_probe.py", "--out", d / "router_trace_rank0.jsonl",
                    "--probs-out", d / "with_probs.jsonl", "--layers", "4", "--tokens", "256",
                    "--experts", str(experts), "--topk", str(top_k), "--steps", "2", "--seed", "3", *flags)
    if not out.get("available", True):
        reason = (f"megatron-core does not import in .venv-stacks ({out['error']}): rebuild it with "
                  "`make .venv-stacks/.installed` (tests/stacks/stacks.mk)")
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    assert out["megatron_core"] == MEGATRON_CORE, out["megatron_core"]
    assert out["nonzero_ascending"]
    out["path"], out["probs_path"] = d / "router_trace_rank0.jsonl", d / "with_probs.jsonl"
    out["load"], out["top1"] = np.asarray(out["load"]), np.asarray(out["top1"])
    return out


def test_training_router_trace_reads_unknown_order(megatron):
    inp = read_input(megatron["path"])
    assert (inp.kind, inp.format) == ("trace", "megatron-jsonl")
    trace = read_trace(megatron["path"])
    assert trace.order == "unknown" and not trace.has_top1 and trace.gate_weights is None
    assert trace.expert_ids.shape == (megatron["tokens"], megatron["layers"], megatron["topk"])
    assert np.all(np.diff(trace.expert_ids.astype(np.int64), axis=-1) > 0)  # MTP records skipped

    routing = gather_routing([str(megatron["path"])])
    np.testing.assert_array_equal(routing.stats.load, megatron["load"])  # routing_map column sums
    assert routing.stats.top1_transitions is None
    assert routing.top1_note == f"{megatron['path']}: {MEGATRON_ASCENDING_NOTE}"

    # column 0 of the nonzero() listing is the lowest id, not Megatron's top-1 expert
    wrong = np.mean(trace.expert_ids[..., 0] != megatron["top1"])
    assert wrong > 0.3, wrong
    # ... though Megatron's top-1 is always among the token's experts
    assert np.all(np.any(trace.expert_ids == megatron["top1"][..., None], axis=-1))


def test_recorded_probabilities_give_megatron_top1(megatron):
    trace = read_trace(megatron["probs_path"])
    assert trace.has_top1 and trace.gate_weights is not None
    np.testing.assert_array_equal(trace.sorted_ids()[..., 0], megatron["top1"])
    routing = gather_routing([str(megatron["probs_path"])])
    np.testing.assert_array_equal(routing.stats.load, megatron["load"])
    assert routing.top1_note is None and routing.stats.has_top1
