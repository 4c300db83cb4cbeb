"""Simulator parameters: network kernels, compute roofline, workloads. No side effects.

Every default names its source; the numbers are in docs/reference/simulator.md
(section numbers below refer to that copy) and the calibration in benchmarks/fidelity.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypedDict

from placer.errors import InvalidInputError
from placer.simulator.network_kernels import kernel_names, network_kernel

KERNELS = kernel_names()
"""The built-in kernels (``nccl``, ``deepep-normal``, ``deepep-ll``, ``deepep-v2``); :func:`kernel_names` also
lists those registered since (:func:`~placer.simulator.network_kernels.register_kernel`)."""
CONGESTION_MODELS = ("none", "fifo")
# Achieved over peak HBM bandwidth: DeepGEMM dense M=64, 2470 GB/s of 3350 (sheet 2.7).
HBM_EFFICIENCY = 0.74
WORKLOADS = ("serving", "replay")
LENGTH_DISTRIBUTIONS = ("fixed", "exponential")
OVERLAP_MODES = ("none", "two-batch")
"""How a step overlaps communication with compute: ``none`` (every phase in turn) or
``two-batch`` (two micro-batches, one's all-to-all under the other's compute; cost/overlap.py)."""

# SimAI astra-sim-alibabacloud/inputs/ratio/ata_ratio.csv (sheet 2.6): all-to-all efficiency by
# total bytes, one column per node count (1, 2, 4, 8, 16 nodes). Below 16 MiB SimAI clamps.
SIMAI_ATA_SIZES = (16 * 2**20, 64 * 2**20, 256 * 2**20, 2**30, 8 * 2**30)
SIMAI_ATA_RATIO = {
    1: (0.44, 0.60, 0.70, 0.74, 0.78),
    2: (0.52, 0.72, 0.79, 0.81, 0.80),
    4: (0.67, 0.83, 0.92, 0.94, 0.95),
    8: (0.64, 0.82, 0.87, 0.92, 0.94),
    16: (0.62, 0.66, 0.75, 0.85, 0.90),
}


@dataclass(frozen=True)
class NetworkParams:
    """All-to-all cost model of one kernel family (``kernel``: a registered
    :class:`~placer.simulator.network_kernels.NetworkKernel`, which does the byte accounting).

    A phase on a GPU port (NVLink out/in, NIC out/in) takes ``launch_s + hops * hop_s +
    bytes / (bandwidth * efficiency)``; the bandwidths are the topology's achievable per-GPU
    per-direction figures, ``*_efficiency`` scale them (kernel-specific, fitted or sourced);
    ``forward_efficiency`` (when set) replaces ``nvlink_efficiency`` once the EP group spans
    nodes (DeepEP's internode kernels forward over NVLink with a share of their SMs).
    ``size_curve`` (``nccl`` only) multiplies the bandwidth by SimAI's efficiency at the
    phase's total bytes. ``congestion="fifo"`` serialises the messages on each port in a fixed
    order (ASTRA-sim's congestion-aware analytical backend) instead of the closed form.

    Kernels that send one message per token unit (``deepep-ll``: one per (token, expert)) set
    ``message_rate``: a NIC port then takes at least ``messages / message_rate`` seconds, which
    bounds small messages where bandwidth bounds large ones. ``recv_hbm_passes`` charges the
    receive side's pack: every received token (the sender's own rank's included) crosses HBM
    that many times (read from the receive buffer, write to the packed layout) at the cluster's
    HBM bandwidth x ``HBM_EFFICIENCY``, after the last arrival.
    """

    kernel: str = "deepep-normal"
    dispatch_dtype: str = "fp8"
    combine_dtype: str = "bf16"
    launch_s: float = 0.0
    nvlink_hop_s: float = 0.0
    rdma_hop_s: float = 0.0
    nvlink_efficiency: float = 1.0
    forward_efficiency: float | None = None
    rdma_efficiency: float = 1.0
    size_curve: bool = False
    congestion: str = "none"
    message_rate: float | None = None
    recv_hbm_passes: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        network_kernel(self.kernel)  # raises InvalidInputError for an unregistered kernel
        if self.congestion not in CONGESTION_MODELS:
            raise InvalidInputError(f"unknown congestion model {self.congestion!r}; known: "
                                    f"{', '.join(CONGESTION_MODELS)}", source="--congestion")
        for name in ("dispatch_dtype", "combine_dtype"):
            if getattr(self, name) not in ("fp8", "bf16"):
                raise InvalidInputError(f"{name} must be fp8 or bf16, got {getattr(self, name)!r}",
                                        source=f"--{name.replace('_', '-')}")
        if self.message_rate is not None and not 0 < self.message_rate < float("inf"):
            raise InvalidInputError("message_rate must be a positive finite number", source="network parameters")
        for name in ("launch_s", "nvlink_hop_s", "rdma_hop_s", "recv_hbm_passes"):
            if not getattr(self, name) >= 0:
                raise InvalidInputError(f"{name} must be >= 0", source="network parameters")
        if self.forward_efficiency is not None and not 0 < self.forward_efficiency <= 2:
            raise InvalidInputError("forward_efficiency must be in (0, 2]", source="network parameters")
        for name in ("nvlink_efficiency", "rdma_efficiency"):
            if not 0 < getattr(self, name) <= 2:
                raise InvalidInputError(f"{name} must be in (0, 2]", source="network parameters")


class _Efficiencies(TypedDict):
    """The efficiency fields of :class:`NetworkParams` a calibration fits."""

    nvlink_efficiency: float
    forward_efficiency: float
    rdma_efficiency: float


# DeepEP normal kernels: NVLink efficiency fitted on DeepEP's EP8 row, the internode kernel's
# NVLink (forwarding) efficiency on its EP16 row (docs/legacy.md: H800, 4096 tokens, hidden 7168,
# top-8 of 256, routed as DeepEP's tests route: one group per node, the top min(nodes, 4)) by
# benchmarks/calibrate_deepep.py; the NIC is not fitted (48.5 GB/s, SimAI's CX7 constant). EP32
# and EP64 are predictions (benchmarks/fidelity.md).
DEEPEP_NORMAL_FIT: _Efficiencies = {"nvlink_efficiency": 0.976, "forward_efficiency": 0.783, "rdma_efficiency": 1.0}

class _LowLatencyFit(TypedDict):
    """The two constants fitted on DeepEP's low-latency EP8 and EP16 rows."""

    launch_s: float
    nvlink_efficiency: float


# DeepEP low-latency kernels: the fixed per-kernel cost (launch, the per-expert count exchange and
# its polling) and the NVLink efficiency, fitted by least squares on DeepEP's EP8 and EP16 rows
# (H800, 128 tokens per rank, hidden 7168, top-8 of 288) by benchmarks/calibrate_deepep_ll.py.
DEEPEP_LL_FIT: _LowLatencyFit = {"launch_s": 2.829e-05, "nvlink_efficiency": 1.115}

# DeepEP V2: the NIC efficiency fitted on the README's SM90 EP 8 x 2 dispatch row (8192 tokens per
# rank, hidden 7168, top-8 of 256) by benchmarks/calibrate_deepep_v2.py.
DEEPEP_V2_RDMA_EFFICIENCY = 0.947

KERNEL_PRESETS: dict[str, NetworkParams] = {
    # NCCL grouped send/recv all-to-all: Ring/Simple base latency 8.4 us, per-hop NVLink 3.4 us,
    # NET 14 us (nccl src/graph/tuning.cc v2.30.7, sheet 2.3); bf16 both ways; SimAI size curve.
    "nccl": NetworkParams(kernel="nccl", dispatch_dtype="bf16", combine_dtype="bf16", launch_s=8.4e-6,
                          nvlink_hop_s=3.4e-6, rdma_hop_s=14e-6, size_curve=True,
                          source="nccl tuning.cc v2.30.7 latencies; SimAI ata_ratio.csv size curve"),
    # DeepEP normal: fp8 dispatch (+1 fp32 scale per 128 elements), bf16 combine, once per
    # destination rank inside the node and once per remote node across (then NVLink forwarding).
    "deepep-normal": NetworkParams(kernel="deepep-normal", launch_s=8.4e-6, nvlink_hop_s=3.4e-6,
                                   rdma_hop_s=14e-6, **DEEPEP_NORMAL_FIT,
                                   source="DeepEP docs/legacy.md EP8/EP16 fit (benchmarks/fidelity.md)"),
    # DeepEP low-latency: one message per (token, expert), fp8 + 16 B metadata per token
    # (tests/test_low_latency.py), NVLink to same-node ranks, RDMA across. Per-hop latencies:
    # NCCL's LL protocol (NVLink 0.6 us, NET 2.7 us; tuning.cc v2.30.7, sheet 2.3). NIC message
    # rate: ConnectX-7, 330 M messages/s (the low end of NVIDIA's product brief, 330-370 M).
    # Receive-side pack: each received token read from the receive buffer and written to the
    # packed per-expert layout (2 HBM passes). Fixed cost and NVLink efficiency fitted.
    "deepep-ll": NetworkParams(kernel="deepep-ll", nvlink_hop_s=0.6e-6, rdma_hop_s=2.7e-6, rdma_efficiency=1.0,
                               message_rate=330e6, recv_hbm_passes=2.0, **DEEPEP_LL_FIT,
                               source="DeepEP docs/legacy.md LL EP8/EP16 fit (benchmarks/fidelity.md)"),
    # DeepEP V2 (ElasticBuffer): the normal kernels' route and byte accounting (fp8 + scales, no
    # metadata), their latencies and V1's intranode NVLink fit; the NIC efficiency fitted on the
    # README's SM90 EP 8 x 2 dispatch row; EP 8 x 4 is a prediction.
    "deepep-v2": NetworkParams(kernel="deepep-v2", launch_s=8.4e-6, nvlink_hop_s=3.4e-6, rdma_hop_s=14e-6,
                               nvlink_efficiency=DEEPEP_NORMAL_FIT["nvlink_efficiency"],
                               rdma_efficiency=DEEPEP_V2_RDMA_EFFICIENCY,
                               source="DeepEP V2 README EP 8 x 2 fit (benchmarks/fidelity.md)"),
}


def kernel_preset(kernel: str, **overrides: Any) -> NetworkParams:
    """The preset of ``kernel`` with ``overrides`` (None values ignored); a registered kernel
    without a preset starts from the :class:`NetworkParams` defaults. InvalidInputError for an
    unregistered kernel."""
    base = KERNEL_PRESETS.get(kernel) or NetworkParams(kernel=kernel)
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# DeepGEMM README (commit 55ab91f, H800 FP8, sheet 2.7): grouped-GEMM TFLOPS / 1979 peak by
# rows per expert; the large-M rows are compute-bound, the small-M rows HBM-bound (the roofline
# takes the HBM side from ``hbm_efficiency``).
DEEPGEMM_EFFICIENCY = ((256, 0.47), (512, 0.53), (1024, 0.62), (4096, 0.68))


@dataclass(frozen=True)
class ComputeParams:
    """Roofline compute model of one GPU.

    Grouped expert GEMMs per GPU per MoE layer: ``max(FLOPs / (peak * eff(rows per expert)),
    bytes / (HBM * hbm_efficiency)) + gemm_launch_s``; FLOPs 6*h*I per (token, expert) (SwiGLU:
    gate, up, down), bytes = the weights of every expert with work plus activations in and out.
    Attention and the dense parts are per-token costs by the same roofline:
    ``attention_params`` weights (default 4*h*h: q, k, v, o projections), the KV cache read
    by decode tokens (``kv_bytes_per_token`` per context token per layer; default a GQA cache
    with 8 query heads per KV head, K and V at the activation width: 2 * h / 8 * bytes), and
    prefill's quadratic part (4*h FLOPs per token per context position). Dense FFN layers use
    ``(top_k + shared) * expert_ffn_size`` as their intermediate size (the activated-equivalent
    width; the presets do not carry the dense width). ``step_overhead_s`` is charged once per
    step (scheduler, sampling). Tensor parallelism is not modelled.
    """

    gemm_efficiency: tuple[tuple[int, float], ...] = DEEPGEMM_EFFICIENCY
    hbm_efficiency: float = HBM_EFFICIENCY
    gemm_launch_s: float = 5e-6
    attention_params: float | None = None
    kv_bytes_per_token: float | None = None
    attention_launch_s: float = 5e-6
    step_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.hbm_efficiency <= 1:
            raise InvalidInputError("hbm_efficiency must be in (0, 1]", source="compute parameters")
        if not self.gemm_efficiency or any(not 0 < e <= 1 or m < 1 for m, e in self.gemm_efficiency):
            raise InvalidInputError("gemm_efficiency needs (rows, efficiency in (0, 1]) points",
                                    source="compute parameters")
        for name in ("gemm_launch_s", "attention_launch_s", "step_overhead_s"):
            if not getattr(self, name) >= 0:
                raise InvalidInputError(f"{name} must be >= 0", source="compute parameters")


@dataclass(frozen=True)
class ServingWorkload:
    """Poisson arrivals, prompt/output lengths, continuous batching per rank (DP attention).

    Each request lives on one rank (least outstanding tokens at arrival). Every step, each rank
    runs one decode token per running request and fills the rest of its ``token_budget`` with
    chunked prefill, admitting a request only when its whole KV cache (prompt + output) fits.
    """

    rate: float = 20.0
    duration_s: float = 60.0
    prompt_len: int = 1024
    output_len: int = 256
    length_dist: str = "exponential"
    token_budget: int = 2048
    max_running: int = 256
    max_steps: int | None = None
    kind: str = field(default="serving", init=False)

    def __post_init__(self) -> None:
        if not 0 < self.rate < float("inf"):
            raise InvalidInputError(f"must be a positive finite number, got {self.rate}", source="--rate")
        if not 0 < self.duration_s < float("inf"):
            raise InvalidInputError(f"must be a positive finite number, got {self.duration_s}", source="--duration")
        for flag, v in (("--prompt-len", self.prompt_len), ("--output-len", self.output_len),
                        ("--token-budget", self.token_budget), ("--max-running", self.max_running)):
            if v < 1:
                raise InvalidInputError(f"must be at least 1, got {v}", source=flag)
        if self.length_dist not in LENGTH_DISTRIBUTIONS:
            raise InvalidInputError(f"unknown length distribution {self.length_dist!r}", source="--length-dist")


@dataclass(frozen=True)
class ReplayWorkload:
    """Batches of real routed tokens, ``tokens_per_rank`` per rank per step, read in order.

    Decode-like steps: each token is one decode token with ``context_len`` tokens of context.
    A trace is replayed once (the last step holds what is left; at most ``iterations`` steps),
    or with ``wrap`` for ``iterations`` full steps cycling through it.
    """

    tokens_per_rank: int = 128
    iterations: int | None = None
    context_len: int = 1024
    wrap: bool = False
    kind: str = field(default="replay", init=False)

    def __post_init__(self) -> None:
        if self.tokens_per_rank < 1:
            raise InvalidInputError(f"must be at least 1, got {self.tokens_per_rank}", source="--tokens-per-rank")
        if self.iterations is not None and self.iterations < 1:
            raise InvalidInputError(f"must be at least 1, got {self.iterations}", source="--iterations")
        if self.context_len < 0:
            raise InvalidInputError("must be >= 0", source="--context-len")


@dataclass(frozen=True)
class SimConfig:
    """Everything a run needs besides the model, cluster, placement and routing.

    ``dispatch`` None (comparisons only) means each placement's own rule (its file's, else
    nearest). ``overlap``: one of :data:`OVERLAP_MODES`; ``two-batch`` needs standard execution.
    """

    network: NetworkParams = field(default_factory=lambda: KERNEL_PRESETS["deepep-normal"])
    compute: ComputeParams = field(default_factory=ComputeParams)
    execution: str = "standard"
    dispatch: str | None = "nearest"
    seed: int = 0
    pool_size: int = 4096
    overlap: str = "none"

    def __post_init__(self) -> None:
        if self.overlap not in OVERLAP_MODES:
            raise InvalidInputError(f"unknown overlap mode {self.overlap!r}; known: {', '.join(OVERLAP_MODES)}",
                                    source="--overlap")
        if self.overlap != "none" and self.execution != "standard":
            raise InvalidInputError(f"{self.overlap} overlap models standard expert parallelism, not "
                                    f"{self.execution} execution", source="--overlap")

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values; ``overlap`` only when not ``none`` (results written without
        overlap stay as they were)."""
        out = asdict(self)
        if self.overlap == "none":
            del out["overlap"]
        return out
