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
