"""Calibrate the deepep-ll network model on DeepEP's EP8 and EP16 rows; predict EP32 to EP256.

Published rows (given in the simulator-fidelity issue; deepseek-ai/DeepEP docs/legacy.md, V1
low-latency kernels): H800, CX7 400 Gb/s per GPU, 128 tokens per rank, hidden 7168, top-8,
fp8 dispatch, bf16 combine; EP8 dispatch 77 us, combine 114 us; EP16 118 us and 195 us.
DeepEP's tests/test_low_latency.py (read from the deep-ep 1.0.0 sdist): 288 experts with
``num_experts % num_ranks`` asserted, so the largest multiple of EP not above 288; scores
``|N(0,1)| + 1`` over all experts, top-8 (``--routing uniform`` here).

The model (placer/simulator/config.py, ``KERNEL_PRESETS["deepep-ll"]``; docs/simulator.md):
one message per (token, expert), directly, NVLink to ranks of the same node and RDMA across;
a GPU's phase takes ``launch_s + receive-side pack + max(NVLink port, NIC port)``, the NIC
port ``rdma_hop_s + max(bytes / 48.5 GB/s, messages / message rate)``.

Fitted, two constants, by least squares on the relative error of all four published times:
``launch_s`` (the fixed per-kernel cost: launch, the per-expert count exchange and its polling)
and ``nvlink_efficiency`` (the low-latency kernel's NVLink path on the 160 GB/s H800 preset).
Every other constant is sourced (config.py names each source). The EP32, 64, 128 and 256
predictions are printed for benchmarks/fidelity.md; they are written there once, before any
comparison with DeepEP's own figures for those rows.

    .venv/bin/python benchmarks/calibrate_deepep_ll.py
"""

from __future__ import annotations

import numpy as np

from placer.simulator.a2a import a2a_benchmark
from placer.simulator.config import DEEPEP_LL_FIT, kernel_preset

PUBLISHED = {8: (77.0, 114.0), 16: (118.0, 195.0)}  # us: dispatch, combine
PREDICT = (32, 64, 128, 256)
SHAPE = dict(cluster="h800", tokens_per_rank=128, hidden=7168, top_k=8, kernel="deepep-ll", routing="uniform",
             seed=0)


def experts_for(ep: int) -> int:
    """DeepEP's LL test: 288 experts, divisible by the rank count (the largest multiple <= 288)."""
    return 288 // ep * ep


def measure(ep: int, **params) -> dict:
    return a2a_benchmark(ep=ep, experts=experts_for(ep), network=kernel_preset("deepep-ll", **params), **SHAPE)


def _times(nvlink_efficiency: float) -> np.ndarray:
    """Simulated dispatch and combine us at EP8 and EP16 without the fixed cost, [4]."""
    out = []
    for ep in PUBLISHED:
        m = measure(ep, launch_s=0.0, nvlink_efficiency=nvlink_efficiency)
        out += [m["dispatch_us"], m["combine_us"]]
    return np.asarray(out)


def fit() -> dict[str, float]:
    """``launch_s`` and ``nvlink_efficiency`` minimising the squared relative error of the four
    published times. The fixed cost adds to every time, so for a given efficiency its best
    value is closed form; the efficiency by golden-section search."""
    target = np.asarray([t for row in PUBLISHED.values() for t in row])
    w = 1.0 / target**2

    def best(eff: float) -> tuple[float, float]:
        f = _times(eff)
        launch = float(np.sum(w * (target - f)) / np.sum(w))
        return float(np.sum(w * (launch + f - target) ** 2)), launch

    lo, hi = 0.5, 1.5
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = best(a)[0], best(b)[0]
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = best(a)[0]
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = best(b)[0]
    eff = (lo + hi) / 2
    return {"launch_s": round(best(eff)[1] * 1e-6, 8), "nvlink_efficiency": round(float(eff), 3)}


def main() -> None:
    params = fit()
    print(f"fitted: {params}")
    print(f"preset: {DEEPEP_LL_FIT}" + ("" if DEEPEP_LL_FIT == params else "  <- update config.py"))
    print()
    print("| EP | experts | role | dispatch us sim | published | error | combine us sim | published | error "
          "| dispatch GB/s (DeepEP count) | combine GB/s (DeepEP count) | bottleneck |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for ep in (*PUBLISHED, *PREDICT):
        out = measure(ep, **params)
        d, c = out["dispatch_us"], out["combine_us"]
        if ep in PUBLISHED:
            pd, pc = PUBLISHED[ep]
            cells = f"{pd:.0f} | {(d / pd - 1) * 100:+.1f}% | {c:.1f} | {pc:.0f} | {(c / pc - 1) * 100:+.1f}%"
            role = "fit"
        else:
            cells = f"- | - | {c:.1f} | - | -"
            role = "prediction"
        print(f"| {ep} | {experts_for(ep)} | {role} | {d:.1f} | {cells} | {out['deepep_dispatch_gbps']:.1f} | "
              f"{out['deepep_combine_gbps']:.1f} | {out['bottleneck']} |")


if __name__ == "__main__":
    main()
