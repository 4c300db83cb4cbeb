"""Calibrate the deepep-v2 network model on DeepEP V2's EP 8 x 2 row; predict EP 8 x 4.

Published (given in the simulator-fidelity issue; deepseek-ai/DeepEP README of the current
release, V2 ElasticBuffer): SM90, CX7, 8,192 tokens per rank, hidden 7168, top-8, fp8 dispatch,
bf16 combine, "logical bandwidth" with local-rank traffic included:
EP 8 x 2: dispatch 90 GB/s, combine 81 GB/s (RDMA, 12 SMs); EP 8 x 4: 61 and 61 GB/s (6 SMs).

Counted as DeepEP V1's internode test counts (tests/test_internode.py in the deep-ep 1.0.0
sdist: ``num_rdma_token_sent`` = tokens x distinct destination nodes, the sender's own node
included, x bytes per token; fp8 with its scales for dispatch, bf16 for combine), which is what
"local-rank traffic included" suggests. Routing: 256 experts, scores ``|N(0,1)| + 1``, top-8
over all experts; V1's internode test takes the top min(nodes, 4) of ``nodes`` groups, which at
2 and 4 nodes is every group, so uniform.

Cluster: the ``h100`` preset (SM90, 370 GB/s NVLink, 48.5 GB/s CX7). The README does not name
the SKU; on H800's 160 GB/s NVLink the forwarding alone caps EP 8 x 2 at about 55 GB/s in this
model, below the published 90, so the row cannot come from H800-class NVLink under this route.

Fitted, one constant: ``rdma_efficiency`` (the NIC efficiency), by bisection on the EP 8 x 2
dispatch figure. Everything else is a prediction: EP 8 x 2 combine and both EP 8 x 4 figures.

    .venv/bin/python benchmarks/calibrate_deepep_v2.py
"""

from __future__ import annotations

from placer.simulator.a2a import a2a_benchmark
from placer.simulator.config import DEEPEP_V2_RDMA_EFFICIENCY, kernel_preset

PUBLISHED = {16: (90.0, 81.0), 32: (61.0, 61.0)}  # GB/s, DeepEP's count: dispatch, combine
SHAPE = dict(cluster="h100", tokens_per_rank=8192, hidden=7168, experts=256, top_k=8, kernel="deepep-v2",
             routing="uniform", seed=0)


def measure(ep: int, rdma_efficiency: float) -> dict:
    return a2a_benchmark(ep=ep, network=kernel_preset("deepep-v2", rdma_efficiency=rdma_efficiency), **SHAPE)


def fit() -> float:
    lo, hi = 0.3, 1.5
    for _ in range(40):
        mid = (lo + hi) / 2
        if measure(16, mid)["deepep_dispatch_gbps"] < PUBLISHED[16][0]:
            lo = mid
        else:
            hi = mid
    return round((lo + hi) / 2, 3)


def main() -> None:
    eff = fit()
    print(f"fitted: rdma_efficiency = {eff}")
    print(f"preset: {DEEPEP_V2_RDMA_EFFICIENCY}" + ("" if DEEPEP_V2_RDMA_EFFICIENCY == eff else "  <- update config.py"))
    print()
    print("| topology | role | dispatch us | dispatch GB/s sim | published | error | combine us | combine GB/s sim "
          "| published | error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ep, (pub_d, pub_c) in PUBLISHED.items():
        out = measure(ep, eff)
        d, c = out["deepep_dispatch_gbps"], out["deepep_combine_gbps"]
        role = "fit (dispatch); combine predicted" if ep == 16 else "prediction"
        print(f"| EP 8 x {ep // 8} | {role} | {out['dispatch_us']:.0f} | {d:.1f} | {pub_d:.0f} | "
              f"{(d / pub_d - 1) * 100:+.1f}% | {out['combine_us']:.0f} | {c:.1f} | {pub_c:.0f} | "
              f"{(c / pub_c - 1) * 100:+.1f}% |")


if __name__ == "__main__":
    main()
