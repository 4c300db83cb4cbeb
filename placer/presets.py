"""Model and cluster presets.

Model shapes from docs/reference/simulator.md section 3.1 (each row there names the
config file it was read from). Cluster numbers from section 2 of the same sheet: achievable
NVLink and NIC bandwidth per GPU per direction (nccl-tests maintainers, SimAI constants,
DeepEP), NCCL-order latencies (nccl ``tuning.cc``), datasheet HBM bandwidth and dense peak FLOP/s.
"""

from __future__ import annotations

from typing import Any

from placer.errors import InvalidInputError
from placer.resources import check_memory, human_bytes
from placer.types import ModelSpec, Topology


def _model(name, layers, moe_ids, experts, top_k, hidden, ffn, shared=0, groups=1, topk_groups=1,
           weight_bytes=2.0) -> ModelSpec:
    return ModelSpec(name=name, num_hidden_layers=layers, moe_layer_ids=tuple(moe_ids),
                     num_experts=experts, top_k=top_k, hidden_size=hidden, expert_ffn_size=ffn,
                     num_shared_experts=shared, num_groups=groups, topk_groups=topk_groups,
                     activation_bytes=2.0, weight_bytes=weight_bytes)


MODELS: dict[str, ModelSpec] = {m.name: m for m in (
    _model("mixtral-8x7b", 32, range(32), 8, 2, 4096, 14336),
    _model("mixtral-8x22b", 56, range(56), 8, 2, 6144, 16384),
    # 1 dense layer first, then 26 MoE layers; 2 shared experts.
    _model("deepseek-v2-lite", 27, range(1, 27), 64, 6, 2048, 1408, shared=2),
    # 3 dense layers first; 8 groups, top-4 groups (group-limited routing); FP8 weights.
    _model("deepseek-v3", 61, range(3, 61), 256, 8, 7168, 2048, shared=1, groups=8, topk_groups=4,
           weight_bytes=1.0),
    _model("qwen3-30b-a3b", 48, range(48), 128, 8, 2048, 768),
    _model("qwen3-235b-a22b", 94, range(94), 128, 8, 4096, 1536),
    _model("olmoe-1b-7b", 16, range(16), 64, 8, 2048, 1024),
    # experts shipped in MXFP4: 4 bits + one 8-bit scale per 32 elements = 4.25 bits.
    _model("gpt-oss-120b", 36, range(36), 128, 4, 2880, 2880, weight_bytes=4.25 / 8),
    # MoE every second layer (interleave_moe_layer_step 2: layers 1, 3, ..., 47); 1 shared expert.
    _model("llama-4-maverick", 48, range(1, 48, 2), 128, 1, 5120, 8192, shared=1),
    # 1 dense layer first; no group limit (n_group 1); block-FP8 weights.
    _model("kimi-k2", 61, range(1, 61), 384, 8, 7168, 2048, shared=1, weight_bytes=1.0),
)}

# Per-GPU numbers of one node kind; nodes (NVLink domains) are 8 GPUs but where _DOMAIN says.
_CLUSTERS: dict[str, dict[str, float]] = {
    "a100": dict(nvlink_gbps=230.0, nic_gbps=23.5, hbm_gbps=2039.0, bf16_flops=312e12,
                 fp8_flops=312e12, memory_bytes=80e9),
    "h100": dict(nvlink_gbps=370.0, nic_gbps=48.5, hbm_gbps=3350.0, bf16_flops=989e12,
                 fp8_flops=1979e12, memory_bytes=80e9),
    "h200": dict(nvlink_gbps=370.0, nic_gbps=48.5, hbm_gbps=4800.0, bf16_flops=989e12,
                 fp8_flops=1979e12, memory_bytes=141e9),
    "h800": dict(nvlink_gbps=160.0, nic_gbps=48.5, hbm_gbps=3350.0, bf16_flops=989e12,
                 fp8_flops=1979e12, memory_bytes=80e9),
    "b200": dict(nvlink_gbps=726.0, nic_gbps=48.5, hbm_gbps=8000.0, bf16_flops=2250e12,
                 fp8_flops=4500e12, memory_bytes=180e9),
    # GB200 NVL72: 72 B200s (1200 W: 2.5 PF dense bf16) on one NVLink5 switch domain, DeepEP's
    # measured 726 GB/s; racks joined by a 400 Gb/s ConnectX-7 per GPU, as the other presets.
    "gb200-nvl72": dict(nvlink_gbps=726.0, nic_gbps=48.5, hbm_gbps=8000.0, bf16_flops=2500e12,
                        fp8_flops=5000e12, memory_bytes=186e9),
}
_DOMAIN = {"gb200-nvl72": 72}
"""GPUs per NVLink domain where it is not :data:`GPUS_PER_NODE`."""
CLUSTERS = tuple(_CLUSTERS)
DEFAULT_CLUSTER = "h100"
GPUS_PER_NODE = 8


def get_model(name: str) -> ModelSpec:
    """The preset called ``name`` (case-insensitive)."""
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise InvalidInputError(f"unknown model preset {name!r}; known: {', '.join(MODELS)}",
                                source="--model") from None


def make_topology(cluster: str = DEFAULT_CLUSTER, *, gpus: int | None = None,
                  nodes: int | None = None, gpus_per_node: int | None = None) -> Topology:
    """A cluster of preset GPUs; any two of ``gpus``, ``nodes``, ``gpus_per_node`` give the third.

    With only ``gpus``: one node when ``gpus <= 8``, else nodes of 8. With only ``nodes``: nodes
    of 8. A preset's NVLink domain replaces 8 where it is larger (``gb200-nvl72``: 72).
    """
    try:
        params: dict[str, Any] = _CLUSTERS[cluster.lower()]
    except KeyError:
        raise InvalidInputError(f"unknown cluster preset {cluster!r}; known: {', '.join(CLUSTERS)}",
                                source="--cluster") from None
    domain = _DOMAIN.get(cluster.lower(), GPUS_PER_NODE)
    for flag, v in (("--gpus", gpus), ("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if v is not None and v < 1:
            raise InvalidInputError(f"must be at least 1, got {v}", source=flag)
    if gpus is not None and nodes is not None and gpus_per_node is not None:
        if gpus != nodes * gpus_per_node:
            raise InvalidInputError(f"{gpus} GPUs != {nodes} nodes x {gpus_per_node} GPUs per node",
                                    source="--gpus")
    elif gpus is not None and nodes is not None:
        if gpus % nodes:
            raise InvalidInputError(f"{gpus} GPUs do not split evenly over {nodes} nodes; "
                                    f"nearest: --gpus {max(nodes, gpus // nodes * nodes)}", source="--gpus")
        gpus_per_node = gpus // nodes
    elif gpus is not None and gpus_per_node is not None:
        if gpus % gpus_per_node:
            raise InvalidInputError(f"{gpus} GPUs are not a whole number of {gpus_per_node}-GPU nodes",
                                    source="--gpus")
        nodes = gpus // gpus_per_node
    elif nodes is not None:
        gpus_per_node = gpus_per_node or domain
    elif gpus is not None:
        if gpus <= domain:
            nodes, gpus_per_node = 1, gpus
        elif gpus % domain == 0:
            nodes, gpus_per_node = gpus // domain, domain
        else:
            raise InvalidInputError(f"{gpus} GPUs are not a whole number of {domain}-GPU nodes; "
                                    "pass --nodes", source="--gpus")
    else:
        raise InvalidInputError("give the cluster size: --gpus N (and --nodes K)", source="--gpus")
    assert nodes is not None and gpus_per_node is not None
    return Topology(name=cluster.lower(), num_nodes=int(nodes), gpus_per_node=int(gpus_per_node),
                    nvlink_latency_s=3e-6, nic_latency_s=15e-6, **params)


MAX_CLUSTER_WORK = 1e11
"""Most element operations placer takes on for one placement's dispatch tables (beyond: hours)."""


def check_problem_size(model: ModelSpec, topology: Topology, *, simulate: bool = False,
                       source: str = "--gpus") -> None:
    """Refuse, before any work, a cluster too large for this machine (naming ``source``).

    The dispatch table of a placement is int64 ``[layers, GPUs, experts]`` and building it takes
    about ``layers x experts x GPUs x nodes`` operations; the simulator adds float64 ``[layers,
    GPUs, GPUs]`` traffic matrices (about four alive at once).
    """
    layers, g, e = model.num_moe_layers, topology.num_gpus, model.num_experts
    what = f"{g} GPUs"
    nbytes = 8.0 * layers * g * e
    if simulate:
        nbytes += 4 * 8.0 * layers * g * g
        what += f" (simulated [layers, GPUs, GPUs] traffic of {model.name})"
    else:
        what += f" (dispatch tables of {model.name})"
    check_memory(source, nbytes, f"{what} need about")
    work = float(layers) * e * g * max(1, topology.num_nodes)
    if work > MAX_CLUSTER_WORK:
        raise InvalidInputError(f"{g} GPUs: building the dispatch tables of {model.name} takes about {work:.1e} "
                                f"operations ({human_bytes(nbytes)} of arrays); placer refuses more than "
                                f"{MAX_CLUSTER_WORK:.0e}", source=source)
