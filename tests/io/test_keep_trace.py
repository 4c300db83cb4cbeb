"""gather_routing keeps a trace whole only within a byte budget, and says when it did not."""

from __future__ import annotations

import numpy as np

from placer.io import routing as routing_mod
from placer.io.routing import gather_routing
from placer.io.traces import write_trace_npz
from placer.types import RoutingTrace


def _trace(tmp_path, tokens=3000):
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.permutation(8)[:2] for _ in range(4)]) for _ in range(tokens)])
    path = tmp_path / "t.npz"
    write_trace_npz(path, RoutingTrace(ids, 8, gate_weights=rng.random(ids.shape).astype(np.float32)))
    return path, ids


def test_a_trace_within_the_budget_is_kept_whole_without_gate_weights(tmp_path):
    path, ids = _trace(tmp_path)
    r = gather_routing([str(path)], chunk_tokens=700)
    assert r.trace is not None and r.trace_note is None
    assert np.array_equal(r.trace.expert_ids, ids) and r.trace.gate_weights is None  # sorted: ids in order


def test_a_trace_over_the_budget_is_streamed_and_the_note_says_so(tmp_path, monkeypatch):
    path, ids = _trace(tmp_path)
    monkeypatch.setattr(routing_mod, "KEEP_TRACE_BYTES", ids.size * 2 - 1)  # one byte short of the int16 ids
    r = gather_routing([str(path)], chunk_tokens=700)
    assert r.trace is None and r.data is r.stats
    assert r.trace_note == ("the trace (3,000 tokens) is larger than the 48.00 kB kept in memory: its statistics' "
                            f"sample of {r.stats.sample_size:,} tokens stands for it")
    assert sum(c.num_tokens for c in r.stream.chunks()) == 3000  # every token still streams
    assert gather_routing([str(path)], keep_trace=False).trace_note is None  # not asked to keep it


def test_simulate_replays_a_trace_over_the_budget_by_streaming_it(tmp_path, monkeypatch, capsys):
    """`simulate run --workload replay` on a trace too large to keep streams every token: the
    same results as the kept trace's replay, and no note (the serving workload, which samples the
    statistics, still prints it)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cli_helpers import run

    from placer.presets import get_model
    from placer.synthetic import synthesize_trace

    trace = synthesize_trace(get_model("mixtral-8x7b"), 3000, seed=2)
    path = tmp_path / "mixtral.npz"
    write_trace_npz(path, trace)
    ids = trace.expert_ids
    args = ["simulate", "run", path, "--gpus", 4, "--nodes", 2, "--method", "eplb", "--redundant", 4, "--workload",
            "replay", "--tokens-per-rank", 64, "--quiet"]
    code, kept, err = run(capsys, *args, "--json")
    assert code == 0, err
    monkeypatch.setattr(routing_mod, "KEEP_TRACE_BYTES", ids.size * 2 - 1)
    code, streamed, err = run(capsys, *args, "--json")
    assert code == 0, err
    assert json.loads(streamed) == json.loads(kept)
    assert json.loads(streamed)["eplb"]["routing_pool"] == "trace-tokens"
    code, out, err = run(capsys, *args)
    assert code == 0 and "note:" not in out, out
    serving = ["simulate", "run", path, "--gpus", 4, "--nodes", 2, "--method", "eplb", "--redundant", 4, "--duration",
               0.2, "--quiet"]
    code, out, err = run(capsys, *serving)
    assert code == 0, err
    assert "note: the trace (3,000 tokens) is larger than" in out
