"""Metrics collection: ``on_*`` hooks append to arrays; :meth:`Collector.output` summarises.

Definitions (docs/simulator.md): a step's duration is the sum of its phases; the all-to-all time
of a MoE layer in a step is its dispatch plus combine time; the straggler of a layer in a step is
the GPU with the largest dispatch + compute + combine time; TTFT is the end of the step that
finishes the prompt minus the arrival, TPOT (end - first token) / (output tokens - 1), end to end
finish minus arrival. Percentiles are numpy's linear interpolation over all values. With
two-batch overlap (``overlap=True``) a step's phases partition its makespan (dispatch and combine
are then the exposed all-to-all), the per-layer times are both micro-batches' sums, and the
layers table and the summary add the all-to-all time hidden under compute (``a2a_hidden_s``,
``a2a_hidden_fraction``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from placer.simulator.cost import PhaseKind, StepCost
from placer.simulator.results import RunOutput


def _pct(values: np.ndarray, q: float) -> float | None:
    values = values[np.isfinite(values)]
    return float(np.percentile(values, q)) if len(values) else None


class Collector:
    """Accumulates one placement's run."""

    def __init__(self, label: str, num_layers: int, num_gpus: int, *, overlap: bool = False):
        self.label = label
        self.overlap = overlap
        self.hidden: list[np.ndarray] = []
        self.num_layers, self.num_gpus = num_layers, num_gpus
        self.rows: list[tuple] = []
        self.dispatch: list[np.ndarray] = []
        self.compute: list[np.ndarray] = []
        self.combine: list[np.ndarray] = []
        self.attention: list[np.ndarray] = []
        self.straggler = np.zeros((num_layers, num_gpus), dtype=np.int64)
        self.gpu_pairs = np.zeros((num_layers, num_gpus))
        self.nvlink = np.zeros((num_gpus, num_gpus))
        self.rdma = np.zeros((num_gpus, num_gpus))
        self.nvlink_busy = np.zeros((num_gpus, num_gpus))
        self.rdma_busy = np.zeros((num_gpus, num_gpus))
        self.tokens = 0.0
        self.end_s = 0.0
        self.scheduler: Any = None

    def on_arrival(self, request: int, time_s: float) -> None:
        pass  # arrivals are read from the scheduler's arrays at the end

    def on_step_start(self, step: Any, cost: StepCost, time_s: float) -> None:
        shape = step.shape
        kinds, d = cost.kinds, cost.durations_s
        phase = {k: float(d[kinds == k].sum()) for k in PhaseKind}
        tokens = float(shape.tokens.sum())
        self.rows.append((step.index, time_s, cost.total_s, tokens, float(shape.prefill_tokens.sum()),
                          float(shape.decode_tokens.sum()), phase[PhaseKind.ATTENTION], phase[PhaseKind.DISPATCH],
                          phase[PhaseKind.COMPUTE], phase[PhaseKind.COMBINE],
                          phase[PhaseKind.DENSE] + phase[PhaseKind.OTHER]))
        self.dispatch.append(cost.dispatch_s)
        self.compute.append(cost.compute_s)
        self.combine.append(cost.combine_s)
        self.attention.append(cost.attention_s)
        if self.overlap:
            self.hidden.append(np.zeros(self.num_layers) if cost.a2a_hidden_s is None else cost.a2a_hidden_s)
        self.straggler[np.arange(self.num_layers), cost.straggler] += 1
        self.gpu_pairs += cost.gpu_pairs
        self.nvlink += cost.nvlink_bytes
        self.rdma += cost.rdma_bytes
        self.nvlink_busy += cost.nvlink_busy_s
        self.rdma_busy += cost.rdma_busy_s
        self.tokens += tokens

    def on_step_end(self, step: Any, done: np.ndarray, time_s: float) -> None:
        self.end_s = time_s

    # -- summary ----------------------------------------------------------------------------

    def _requests(self) -> pd.DataFrame:
        s = self.scheduler
        cols = ["request", "rank", "arrival_s", "prompt_tokens", "output_tokens", "first_token_s", "finish_s",
                "ttft_s", "tpot_s", "e2e_s"]
        if s is None or not hasattr(s, "arrival_s"):
            return pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
        arrived = s.rank >= 0
        idx = np.flatnonzero(arrived)
        ttft = s.first_token_s[idx] - s.arrival_s[idx]
        e2e = s.finish_s[idx] - s.arrival_s[idx]
        steps = s.output[idx] - 1
        tpot = np.where(steps > 0, (s.finish_s[idx] - s.first_token_s[idx]) / np.maximum(steps, 1), np.nan)
        return pd.DataFrame({"request": idx, "rank": s.rank[idx], "arrival_s": s.arrival_s[idx],
                             "prompt_tokens": s.prompt[idx], "output_tokens": s.output[idx],
                             "first_token_s": s.first_token_s[idx], "finish_s": s.finish_s[idx],
                             "ttft_s": ttft, "tpot_s": tpot, "e2e_s": e2e})

    def output(self) -> RunOutput:
        """The run's :class:`RunOutput` (summary and tables, docs/simulator-results.md)."""
        iters = pd.DataFrame(self.rows, columns=["iteration", "start_s", "duration_s", "tokens", "prefill_tokens",
                                                 "decode_tokens", "attention_s", "dispatch_s", "compute_s",
                                                 "combine_s", "other_s"])
        n = len(self.rows)
        empty = np.zeros((0, self.num_layers))
        disp = np.vstack(self.dispatch) if n else empty
        comp = np.vstack(self.compute) if n else empty
        comb = np.vstack(self.combine) if n else empty
        attn = np.vstack(self.attention) if n else empty
        mean = (lambda a: a.mean(axis=0)) if n else (lambda a: np.zeros(self.num_layers))
        p99 = (lambda a: np.percentile(a, 99, axis=0)) if n else (lambda a: np.zeros(self.num_layers))
        strag_rank = self.straggler.argmax(axis=1)
        layers = pd.DataFrame({"layer": np.arange(self.num_layers), "dispatch_s": mean(disp), "compute_s": mean(comp),
                               "combine_s": mean(comb), "attention_s": mean(attn), "dispatch_p99_s": p99(disp),
                               "combine_p99_s": p99(comb), "straggler_rank": strag_rank,
                               "straggler_share": self.straggler.max(axis=1) / max(n, 1)})
        gl, gg = np.meshgrid(np.arange(self.num_layers), np.arange(self.num_gpus), indexing="ij")
        gpu_load = pd.DataFrame({"layer": gl.ravel(), "gpu": gg.ravel(),
                                 "pairs": (self.gpu_pairs / max(n, 1)).ravel()})
        sim = max(self.end_s, 1e-12)
        link_rows = []
        for kind, b, busy in (("nvlink", self.nvlink, self.nvlink_busy), ("rdma", self.rdma, self.rdma_busy)):
            src, dst = np.nonzero(b)
            link_rows.append(pd.DataFrame({"src": src, "dst": dst, "kind": kind, "bytes": b[src, dst],
                                           "busy_s": busy[src, dst], "utilisation": busy[src, dst] / sim}))
        links = pd.concat(link_rows, ignore_index=True)
        if self.overlap:
            hidden = np.vstack(self.hidden) if n else empty
            layers["a2a_hidden_s"] = mean(hidden)
        requests = self._requests()
        a2a = (disp + comb).ravel()
        it = iters["duration_s"].to_numpy()
        overall = self.straggler.sum(axis=0)
        summary: dict[str, Any] = {
            "iterations": n, "simulated_s": self.end_s, "tokens": int(self.tokens),
            "throughput_tok_s": self.tokens / sim if n else None,
            "output_tok_s": float(self.scheduler.generated.sum()) / sim if len(requests) else None,
            "requests": int(len(requests)), "requests_finished": int(np.isfinite(requests["finish_s"]).sum())
            if len(requests) else 0,
        }
        for name in ("ttft", "tpot", "e2e"):
            v = requests[f"{name}_s"].to_numpy(dtype=float) if len(requests) else np.zeros(0)
            for q in (50, 90, 99):
                summary[f"{name}_p{q}_s"] = _pct(v, q)
        for name, v in (("iteration", it), ("a2a", a2a)):
            for q in (50, 90, 99):
                summary[f"{name}_p{q}_s"] = _pct(v, q)
        for col in ("dispatch_s", "compute_s", "combine_s", "attention_s", "other_s"):
            summary[col] = float(iters[col].sum())
        summary["straggler_rank"] = int(overall.argmax()) if n else None
        summary["straggler_share"] = float(overall.max() / overall.sum()) if n else None
        # A port (a GPU's NVLink or NIC, each direction) carries the pairs that share it.
        ports = [b.sum(axis=axis) for b in (self.nvlink_busy, self.rdma_busy) for axis in (0, 1)]
        summary["max_link_utilisation"] = float(np.concatenate(ports).max() / sim) if n else None
        summary["nvlink_bytes"] = float(self.nvlink.sum())
        summary["rdma_bytes"] = float(self.rdma.sum())
        if self.overlap:
            summary["a2a_hidden_fraction"] = float(hidden.sum() / a2a.sum()) if n and a2a.sum() > 0 else None
        tables = {"iterations": iters, "layers": layers, "requests": requests, "gpu_load": gpu_load, "links": links}
        return RunOutput(label=self.label, summary=summary, tables=tables)
