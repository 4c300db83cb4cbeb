"""One dispatch and one combine, as DeepEP's kernel tests measure them.

Times are one kernel call each (the slowest rank). Bottleneck bandwidth is the bottleneck link's
bytes over the phase time: when the EP group spans nodes, the RDMA bytes a rank sends (a token
once per remote node for the normal and V2 kernels, once per remote expert for the low-latency
ones); inside one node, the NVLink bytes a rank sends. Means over ranks. DeepEP's tests print
their own count instead, given beside it: every token-expert selection for the low-latency
kernels (tests/test_low_latency.py), tokens x distinct nodes hit (the sender's own node
included) across nodes (tests/test_internode.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from placer.errors import InvalidInputError
from placer.io.routing import gather_routing
from placer.presets import make_topology
from placer.simulator.config import NetworkParams, kernel_preset
from placer.simulator.cost.network import NetworkModel
from placer.simulator.routing import token_traffic
from placer.types import ModelSpec, Placement


def random_routing(num_tokens: int, num_experts: int, top_k: int, *, groups: int = 1, topk_groups: int = 1,
                   seed: int = 0) -> np.ndarray:
    """DeepEP-test routing: scores ``|N(0,1)| + 1``, top ``topk_groups`` groups by their best
    score, then the top-k experts of those groups, highest first. int64 [T, K]."""
    if num_experts % groups:
        raise InvalidInputError(f"{groups} groups do not divide {num_experts} experts", source="--groups")
    if not 1 <= topk_groups <= groups:
        raise InvalidInputError(f"must be in [1, {groups}]", source="--topk-groups")
    if top_k > num_experts // groups * topk_groups:
        raise InvalidInputError(f"top-{top_k} does not fit in {topk_groups} groups of {num_experts // groups}",
                                source="--top-k")
    rng = np.random.default_rng(seed)
    out = np.empty((num_tokens, top_k), dtype=np.int64)
    per = num_experts // groups
    for start in range(0, num_tokens, 8192):
        scores = np.abs(rng.standard_normal((min(8192, num_tokens - start), num_experts))) + 1.0
        if topk_groups < groups:
            best = scores.reshape(len(scores), groups, per).max(axis=2)
            chosen = np.argpartition(-best, topk_groups - 1, axis=1)[:, :topk_groups]
            mask = np.zeros((len(scores), groups), dtype=bool)
            np.put_along_axis(mask, chosen, True, axis=1)
            scores = np.where(np.repeat(mask, per, axis=1), scores, -np.inf)
        top = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start:start + len(scores)] = np.take_along_axis(top, order, axis=1)
    return out


def _trace_routing(path: str, num_tokens: int, num_experts: int, top_k: int, seed: int) -> np.ndarray:
    routing = gather_routing([path])
    if routing.trace is not None:
        ids = np.asarray(routing.trace.sorted_ids() if routing.trace.has_top1 else routing.trace.expert_ids)
    elif routing.stats.sample_ids is not None and len(routing.stats.sample_ids):
        ids = np.asarray(routing.stats.sample_ids)
    else:
        raise InvalidInputError("holds counts only; a2a needs per-token routing", source=path)
    if routing.model.num_experts != num_experts or ids.shape[2] != top_k:
        raise InvalidInputError(f"routes top-{ids.shape[2]} of {routing.model.num_experts} experts; "
                                f"pass --experts {routing.model.num_experts} --top-k {ids.shape[2]}", source=path)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(ids), size=num_tokens)
    return ids[pick, 0, :].astype(np.int64)


def a2a_benchmark(*, cluster: str = "h800", ep: int, tokens_per_rank: int = 128, top_k: int = 8, hidden: int = 7168,
                  experts: int = 256, kernel: str = "deepep-normal", routing: str = "uniform", groups: int = 8,
                  topk_groups: int = 4, seed: int = 0, network: NetworkParams | None = None) -> dict[str, Any]:
    """Times (us) and bottleneck bandwidth (GB/s) of one dispatch and one combine.

    Experts sit contiguously, ``experts / ep`` per rank; each rank sends ``tokens_per_rank``
    tokens routed by ``routing``: ``uniform``, ``group-limited`` (``groups``, ``topk_groups``),
    ``deepep`` (as DeepEP's tests draw it: uniform inside one node, otherwise one group per node
    and the top min(nodes, 4) groups, tests/test_internode.py), or a routing file. Besides the
    bottleneck bandwidth, ``deepep_*_gbps`` is the bandwidth in DeepEP's own byte count
    (``deepep_count``: ``selections`` for the low-latency kernels, ``nodes-hit`` across nodes).
    """
    topology = make_topology(cluster, gpus=ep)
    if experts % ep:
        raise InvalidInputError(f"{experts} experts do not split evenly over {ep} ranks", source="--gpus")
    model = ModelSpec(name="a2a", num_hidden_layers=1, moe_layer_ids=(0,), num_experts=experts, top_k=top_k,
                      hidden_size=hidden, expert_ffn_size=1)
    placement = Placement(np.arange(experts)[None, :], experts // ep, experts)  # contiguous
    num_tokens = tokens_per_rank * ep
    if routing == "uniform":
        ids = random_routing(num_tokens, experts, top_k, seed=seed)
    elif routing == "group-limited":
        ids = random_routing(num_tokens, experts, top_k, groups=groups, topk_groups=topk_groups, seed=seed)
    elif routing == "deepep":
        n = topology.num_nodes
        ids = random_routing(num_tokens, experts, top_k, groups=n, topk_groups=min(n, 4), seed=seed)
    else:
        ids = _trace_routing(routing, num_tokens, experts, top_k, seed)
    home = np.arange(num_tokens) // tokens_per_rank
    traffic = token_traffic(placement, topology, ids[:, None, :], home)
    net = NetworkModel(network or kernel_preset(kernel), topology, model)
    dispatch, combine = net.link_bytes(traffic)
    t_d, t_c = net.phase_times(dispatch).time_s[0], net.phase_times(combine).time_s[0]
    kind = "rdma" if topology.num_nodes > 1 else "nvlink"
    # Bytes each rank sends on the bottleneck kind (combine: the same tokens back, combine-sized).
    if kind == "rdma":
        sent_d = dispatch.rdma[0].sum(axis=1).mean()
        sent_c = combine.rdma[0].sum(axis=0).mean()
    else:
        sent_d = dispatch.nvlink[0].sum(axis=1).mean()
        sent_c = combine.nvlink[0].sum(axis=0).mean()
    # DeepEP's own counts, per rank. Low-latency (tests/test_low_latency.py): every token-expert
    # selection at the token size, local ones included. Internode (tests/test_internode.py):
    # tokens x distinct nodes hit, the sender's own node included; combine at the combine size.
    if net.kernel.needs_pairs:
        count = "selections"
        units = float(ids.size) / ep
    elif kind == "rdma":
        count = "nodes-hit"
        node_hits = np.sort(ids // (experts // topology.num_nodes), axis=1)
        units = float((np.diff(node_hits, axis=1) != 0).sum() + len(ids)) / ep
    else:
        count = None
        units = 0.0
    deepep_d = units * net.dispatch_bytes
    deepep_c = units * net.combine_bytes
    return {"kernel": net.params.kernel, "cluster": topology.name, "ep": ep, "nodes": topology.num_nodes,
            "routing": routing, "tokens_per_rank": tokens_per_rank, "top_k": top_k, "hidden": hidden,
            "experts": experts, "bottleneck": kind,
            "dispatch_us": float(t_d * 1e6), "combine_us": float(t_c * 1e6),
            "dispatch_gbps": float(sent_d / t_d / 1e9), "combine_gbps": float(sent_c / t_c / 1e9),
            "dispatch_bytes_per_rank": float(sent_d), "combine_bytes_per_rank": float(sent_c),
            "deepep_count": count,
            "deepep_dispatch_gbps": float(deepep_d / t_d / 1e9) if count else None,
            "deepep_combine_gbps": float(deepep_c / t_c / 1e9) if count else None}
