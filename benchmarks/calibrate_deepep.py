"""Calibrate the deepep-normal network model on DeepEP's EP8 and EP16 rows; predict EP32 and EP64.

Published rows: deepseek-ai/DeepEP docs/legacy.md, V1 normal kernels on H800 (~160 GB/s NVLink,
CX7 400 Gb/s), 4096 tokens per rank, hidden 7168, 256 experts, top-8, fp8 dispatch, bf16 combine
(../shared/reference/simulator-anchors.md section 2.5). Routing as DeepEP's tests draw it (read
from the deep-ep 1.0.0 sdist): tests/test_intranode.py takes the top-8 of all experts;
tests/test_internode.py makes one group per node and takes the top min(nodes, 4) groups, so EP16
and EP32 are uniform too and only EP64 is group-limited (4 of 8). ``--routing deepep``.

Fitted, one parameter per row, by bisection on the dispatch figure:
- ``nvlink_efficiency`` on EP8 (intranode, NVLink-bound);
- ``forward_efficiency`` (NVLink efficiency of the internode kernel) on EP16.
Not fitted: the NIC bandwidth, 48.5 GB/s per GPU (SimAI's CX7 constant, nccl-tests maintainers'
48-49 GB/s), ``rdma_efficiency`` = 1. EP32 and EP64, and every combine figure, are predictions.

Internode rows are compared in DeepEP's own byte count (tests/test_internode.py,
``num_rdma_token_sent``: tokens x distinct nodes hit, the sender's node included; the published
58 GB/s at EP32 exceeds the 50 GB/s line rate of one NIC, which only that count explains). The remote-only figure (once per token per remote node) is printed beside it.

    .venv/bin/python benchmarks/calibrate_deepep.py
"""

from __future__ import annotations

from placer.simulator.a2a import a2a_benchmark
from placer.simulator.config import DEEPEP_NORMAL_FIT, kernel_preset

PUBLISHED = {8: (153.0, 158.0), 16: (43.0, 43.0), 32: (58.0, 57.0), 64: (51.0, 50.0)}
SHAPE = dict(cluster="h800", tokens_per_rank=4096, hidden=7168, experts=256, top_k=8, kernel="deepep-normal",
             routing="deepep", seed=0)


def measure(ep: int, **params) -> dict:
    return a2a_benchmark(ep=ep, network=kernel_preset("deepep-normal", **params), **SHAPE)


def figure(out: dict, which: str) -> float:
    key = f"deepep_{which}_gbps" if out["bottleneck"] == "rdma" else f"{which}_gbps"
    return out[key]


def fit(ep: int, name: str, target: float, fixed: dict) -> float:
    lo, hi = 0.05, 2.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if figure(measure(ep, **fixed, **{name: mid}), "dispatch") < target:
            lo = mid
        else:
            hi = mid
    return round((lo + hi) / 2, 3)


def main() -> None:
    nv = fit(8, "nvlink_efficiency", PUBLISHED[8][0], {"rdma_efficiency": 1.0})
    fw = fit(16, "forward_efficiency", PUBLISHED[16][0], {"rdma_efficiency": 1.0, "nvlink_efficiency": nv})
    params = {"nvlink_efficiency": nv, "forward_efficiency": fw, "rdma_efficiency": 1.0}
    print(f"fitted: {params}")
    print(f"preset: {DEEPEP_NORMAL_FIT}" + ("" if DEEPEP_NORMAL_FIT == params else "  <- update config.py"))
    print()
    print("| EP | role | bottleneck | dispatch us | dispatch GB/s sim | published | error | combine GB/s sim "
          "| published | error | remote-only dispatch GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ep, (pub_d, pub_c) in PUBLISHED.items():
        out = measure(ep, **params)
        d, c = figure(out, "dispatch"), figure(out, "combine")
        role = "fit (dispatch)" if ep in (8, 16) else "prediction"
        remote = f"{out['dispatch_gbps']:.1f}" if out["bottleneck"] == "rdma" else "-"
        print(f"| {ep} | {role} | {out['bottleneck']} | {out['dispatch_us']:.0f} | {d:.1f} | {pub_d:.0f} | "
              f"{(d / pub_d - 1) * 100:+.1f}% | {c:.1f} | {pub_c:.0f} | {(c / pub_c - 1) * 100:+.1f}% | {remote} |")


if __name__ == "__main__":
    main()
