"""Megatron JSONL expert order: training-router traces (boolean ``routing_map.nonzero()``, ids
ascending) are read as ``order="unknown"``, score-ordered ones as ``"sorted"``, gate
probabilities become ``gate_weights``; and every command that would use the top-1 expert says
so (a note naming the input, or exit 2 with one line) instead of taking column 0."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import one_line_exit2, run

from placer.errors import InvalidInputError
from placer.io.external import MEGATRON_ASCENDING_NOTE, MEGATRON_PROB_KEYS, read_megatron_jsonl
from placer.io.routing import check_top1, gather_routing
from placer.io.traces import read_input, read_trace
from placer.stats import compute_stats

pytestmark = pytest.mark.timeout(120)

NOTE = "the trace lists experts in ascending id order (Megatron training router); top-1 unknown"


def _route(rng, tokens, layers, experts, top_k):
    """Score-ordered ids [T, L, K] (column 0 the top-1) and their softmax-over-top-k probabilities."""
    logits = rng.normal(size=(tokens, layers, experts))
    ids = np.argsort(-logits, axis=-1)[..., :top_k]
    top = np.exp(np.take_along_axis(logits, ids, axis=-1))
    return ids, top / top.sum(axis=-1, keepdims=True)


def _write(path, ids, layers=None, probs=None, prob_key="top_probs", mtp=None):
    """One record per (step 0, layer), laid out as Megatron's router_trace.py writes them."""
    layers = list(range(ids.shape[1])) if layers is None else layers
    lines = []
    for i, layer in enumerate(layers):
        rec = {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": 0,
               "num_tokens": int(ids.shape[0]), "topk": int(ids.shape[2]), "top_indices": ids[:, i].tolist()}
        if probs is not None:
            rec[prob_key] = probs[:, i].tolist()
        lines.append(json.dumps(rec))
    if mtp is not None:
        lines.append(json.dumps({"step": 0, "stage": "pre_dispatch", "block": "mtp", "layer": 0, "mtp_idx": 0,
                                 "rank": 0, "num_tokens": len(mtp), "topk": len(mtp[0]), "top_indices": mtp}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _ascending(ids, probs=None):
    """What ``routing_map.nonzero()`` gives: each row's ids ascending (probabilities moved along)."""
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), None if probs is None else np.take_along_axis(probs, order, -1)


@pytest.fixture
def routed(rng):
    return _route(rng, 400, 4, 8, 2)


# ---------------------------------------------------------------------------- the reader rule


def test_ascending_rows_read_as_unknown_order(tmp_path, routed):
    ids, _ = routed
    asc, _ = _ascending(ids)
    t = read_trace(_write(tmp_path / "router_trace_rank0.jsonl", asc, mtp=[[3, 1]]))
    assert t.order == "unknown" and not t.has_top1 and t.gate_weights is None
    np.testing.assert_array_equal(t.expert_ids, asc)  # ids kept as written
    with pytest.raises(InvalidInputError, match="top-1 expert is unknown"):
        t.sorted_ids()
    # column 0 of an ascending trace is the top-1 for only about half the (token, layer) pairs
    assert 0.3 < np.mean(asc[..., 0] == ids[..., 0]) < 0.7
    s = compute_stats([t])
    assert s.top1_transitions is None and not s.has_top1
    # loads and co-activation do not depend on the order
    ref = compute_stats([read_trace(_write(tmp_path / "score.jsonl", ids))])
    np.testing.assert_array_equal(s.load, ref.load)
    np.testing.assert_array_equal(s.coactivation, ref.coactivation)
    np.testing.assert_array_equal(s.pair_transitions, ref.pair_transitions)


def test_score_order_reads_sorted(tmp_path, routed):
    ids, _ = routed
    t = read_trace(_write(tmp_path / "r.jsonl", ids))
    assert t.order == "sorted" and t.has_top1
    np.testing.assert_array_equal(t.sorted_ids(), ids)


def test_one_descending_row_proves_score_order(tmp_path, routed):
    ids, _ = routed
    asc, _ = _ascending(ids)
    asc[17, 2] = asc[17, 2][::-1]
    assert read_trace(_write(tmp_path / "r.jsonl", asc)).order == "sorted"


def test_mtp_records_do_not_decide_the_order(tmp_path, routed):
    asc, _ = _ascending(routed[0])
    assert read_trace(_write(tmp_path / "r.jsonl", asc, mtp=[[5, 2], [7, 0]])).order == "unknown"


def test_top_k_1_is_sorted(tmp_path, rng):
    ids, _ = _route(rng, 50, 3, 8, 1)
    t = read_trace(_write(tmp_path / "r.jsonl", ids))
    assert t.order == "sorted" and t.has_top1


def test_the_documented_ambiguity(tmp_path):
    """A score-ordered trace whose rows all happen to be ascending is read as unknown (top-1 lost,
    never wrong); with a handful of tokens that can happen, with many it has negligible chance."""
    ids = np.array([[[0, 3], [2, 5], [1, 4]]])  # one token, score order, every row ascending by chance
    t = read_trace(_write(tmp_path / "r.jsonl", ids))
    assert t.order == "unknown"
    assert "ambiguity" in read_megatron_jsonl.__doc__ and "1/K!" in read_megatron_jsonl.__doc__


@pytest.mark.parametrize("key", MEGATRON_PROB_KEYS)
def test_probabilities_become_gate_weights(tmp_path, routed, key):
    ids, probs = routed
    asc, asc_probs = _ascending(ids, probs)
    t = read_trace(_write(tmp_path / "r.jsonl", asc, probs=asc_probs, prob_key=key))
    assert t.order == "unknown" and t.has_top1
    np.testing.assert_allclose(t.gate_weights, asc_probs, rtol=1e-6)
    np.testing.assert_array_equal(t.sorted_ids(), ids)  # top-1 first, from the probabilities
    s = compute_stats([t])
    ref = compute_stats([read_trace(_write(tmp_path / "s.jsonl", ids))])
    np.testing.assert_array_equal(s.top1_transitions, ref.top1_transitions)


def test_probabilities_in_score_order_keep_sorted(tmp_path, routed):
    ids, probs = routed
    t = read_trace(_write(tmp_path / "r.jsonl", ids, probs=probs))
    assert t.order == "sorted" and t.gate_weights is not None
    np.testing.assert_array_equal(t.sorted_ids(), ids)


def test_probability_errors(tmp_path, routed):
    ids, probs = routed
    p = _write(tmp_path / "r.jsonl", ids, probs=probs[:, :, :1])
    with pytest.raises(InvalidInputError, match="top_probs has shape") as exc:
        read_input(p)
    assert str(p) in str(exc.value)
    lines = _write(tmp_path / "r.jsonl", ids, probs=probs).read_text().splitlines()
    rec = json.loads(lines[1])
    del rec["top_probs"]
    lines[1] = json.dumps(rec)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInputError, match="line 2: some records carry gate probabilities"):
        read_input(p)


def test_routing_names_the_input_and_why(tmp_path, routed):
    asc, _ = _ascending(routed[0])
    p = _write(tmp_path / "router_trace_rank0.jsonl", asc)
    routing = gather_routing([str(p)])
    assert MEGATRON_ASCENDING_NOTE == NOTE
    assert routing.top1_note == f"{p}: {NOTE}"
    check_top1(routing)  # standard execution, no top-1 method: nothing to refuse
    with pytest.raises(InvalidInputError, match="method exflow needs the top-1 expert") as exc:
        check_top1(routing, methods=["eplb", "exflow"])
    assert exc.value.source == str(p)
    sorted_routing = gather_routing([str(_write(tmp_path / "s.jsonl", routed[0]))])
    assert sorted_routing.top1_note is None
    check_top1(sorted_routing, execution="context-coherent", methods=["exflow"])


# ---------------------------------------------------------------------------- the CLI says so


@pytest.fixture
def megatron_files(tmp_path):
    """Mixtral-shaped (32 MoE layers, top-2 of 8) training-router and score-ordered traces."""
    ids, _ = _route(np.random.default_rng(7), 300, 32, 8, 2)
    asc, _ = _ascending(ids)
    return (_write(tmp_path / "router_trace_rank0.jsonl", asc),
            _write(tmp_path / "router_trace_rank1.jsonl", ids))


def test_cli_stats_notes_unknown_top1(capsys, megatron_files):
    asc, score = megatron_files
    code, out, _ = run(capsys, "stats", asc, "--model", "mixtral-8x7b")
    assert code == 0 and f"top-1 affinity not computed: {asc}: {NOTE}" in out
    code, out, _ = run(capsys, "stats", asc, "--model", "mixtral-8x7b", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["top1_known"] is False and summary["top1_note"] == f"{asc}: {NOTE}"
    assert "per_transition" not in summary
    code, out, _ = run(capsys, "stats", score, "--model", "mixtral-8x7b")
    assert code == 0 and "not computed" not in out and "next-layer top-1" in out


def test_cli_solve_and_evaluate_note_unknown_top1(capsys, tmp_path, megatron_files):
    asc, _ = megatron_files
    p = tmp_path / "p.json"
    code, out, _ = run(capsys, "solve", asc, "--model", "mixtral-8x7b", "--gpus", "4", "--method", "eplb",
                       "-o", p)
    assert code == 0 and f"cc x-GPU not computed: {asc}: {NOTE}" in out
    doc = json.loads(p.read_text())
    assert doc["metrics"]["top1_known"] is False and doc["metrics"]["top1_note"] == f"{asc}: {NOTE}"
    assert doc["metrics"]["frac_top1_transitions_cross_gpu"] is None
    code, out, _ = run(capsys, "evaluate", p, asc)
    assert code == 0 and f"top-1 metrics not computed: {asc}: {NOTE}" in out
    code, out, _ = run(capsys, "evaluate", p, asc, "--json")
    m = json.loads(out)
    assert m["top1_known"] is False and m["top1_note"] == f"{asc}: {NOTE}"
    assert m["load_max_over_mean_median"] is not None and m["other_ranks_per_token_layer"] is not None


def test_cli_exact_says_it_drops_the_affinity_term(capsys, tmp_path, megatron_files):
    asc, _ = megatron_files
    code, out, _ = run(capsys, "solve", asc, "--model", "mixtral-8x7b", "--gpus", "4", "--method", "exact",
                       "-o", tmp_path / "p.json")
    assert code == 0
    assert f"note: exact solved without its inter-layer affinity term (balance only): {asc}: {NOTE}" in out


@pytest.mark.parametrize("args, what", [
    (("solve", "{asc}", "--gpus", "4", "--method", "exflow", "-o", "{out}"), "method exflow"),
    (("solve", "{asc}", "--gpus", "4", "--execution", "context-coherent", "-o", "{out}"),
     "context-coherent execution"),
    (("solve", "{score}", "--gpus", "4", "--execution", "context-coherent", "--holdout", "{asc}", "-o", "{out}"),
     "context-coherent execution"),
    (("simulate", "run", "{asc}", "--gpus", "4", "--method", "exflow", "--workload", "replay",
      "--iterations", "2"), "method exflow"),
    (("simulate", "run", "{asc}", "--gpus", "4", "--method", "contiguous", "--workload", "replay",
      "--iterations", "2", "--execution", "context-coherent"), "context-coherent execution"),
    (("simulate", "sweep", "{asc}", "--gpus", "4", "--method", "exflow", "--workload", "replay",
      "--iterations", "2", "-o", "{sweep}"), "method exflow"),
])
def test_cli_top1_methods_exit_2_naming_the_input(capsys, tmp_path, megatron_files, args, what):
    asc, score = megatron_files
    fill = {"asc": asc, "score": score, "out": tmp_path / "p.json", "sweep": tmp_path / "sweep"}
    line = one_line_exit2(capsys, *[a.format(**fill) for a in args], "--model", "mixtral-8x7b",
                          needle=f"{asc}: {what} needs the top-1 expert of each token, but {NOTE}")
    assert "column" not in line


def test_cli_evaluate_context_coherent_exits_2(capsys, tmp_path, megatron_files):
    asc, score = megatron_files
    p = tmp_path / "p.json"
    assert run(capsys, "solve", score, "--model", "mixtral-8x7b", "--gpus", "4", "--method", "contiguous",
               "-o", p)[0] == 0
    code, out, _ = run(capsys, "evaluate", p, score, "--execution", "context-coherent")
    assert code == 0 and "not computed:" not in out
    one_line_exit2(capsys, "evaluate", p, asc, "--execution", "context-coherent",
                   needle=f"{asc}: context-coherent execution needs the top-1 expert of each token, but {NOTE}")
