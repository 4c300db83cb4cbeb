"""Placement-quality metrics: the one source of the numbers solvers, reports and the simulator use.

Every function takes a placement, the cluster and routing data, either a
:class:`~placer.types.RoutingTrace` (exact, per token) or :class:`~placer.types.RoutingStats`
(load from the full counts, per-token metrics on the stats' reservoir sample). Replicas are
chosen by the dispatch rule of :mod:`placer.metrics.dispatch` (``nearest`` | ``sglang-static`` | ``sglang-dynamic`` |
``vllm``); tokens start on their home rank (``trace.home_rank``, else round-robin by token index).

Two execution modes are measured:

- **standard** expert parallelism as DeepEP's normal kernels do it: a token goes from its home
  rank once to every other rank holding one of its chosen replicas, and once per remote node over
  RDMA (to the GPU with the home's local index there), then over NVLink inside that node.
  Bytes are the **dispatch** direction only; combine sends the same amount back.
- **context-coherent** (ExFlow): the token's state lives on the GPU of its top-1 expert's
  replica; the other K-1 experts are dispatched from there and their outputs come back there.

Means are "per token-layer" (absolute counts); fractions carry their denominator in their name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from placer.display import json_value
from placer.errors import InvalidInputError
from placer.metrics import core
from placer.metrics._count import dispatch_arrays
from placer.metrics.dispatch import DEFAULT_DISPATCH_SEED, slot_load
from placer.metrics.report import METRIC_DESCRIPTIONS, format_comparison, format_table
from placer.metrics.stream import TraceStream
from placer.types import EXECUTION_MODES, ModelSpec, Placement, RoutingStats, RoutingTrace, Topology
from placer.validate import expert_memory_per_gpu

Data = RoutingTrace | TraceStream | RoutingStats

__all__ = ["METRIC_DESCRIPTIONS", "TraceStream", "context_coherent_traffic", "dispatch_traffic", "evaluate",
           "evaluate_many", "expert_memory", "format_comparison", "format_table", "gpu_load", "load_balance"]


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _per(num: np.ndarray, den: float | np.ndarray) -> np.ndarray:
    """num / den elementwise as float64, NaN where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.broadcast_to(np.asarray(den, dtype=np.float64), num.shape)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def gpu_load(placement: Placement, topology: Topology, data: Data, *, dispatch: str = "nearest",
             seed: int = DEFAULT_DISPATCH_SEED, table: np.ndarray | None = None) -> np.ndarray:
    """Token-slots served by each GPU at each layer. Returns float64 [L, G].

    From a trace (whole or streamed): exact, every (token, k) counted on the GPU of its chosen replica. From stats:
    :func:`placer.metrics.dispatch.slot_load` summed per GPU, the expected value when home ranks (or
    positions, for ``vllm``) are uniform; exact when there are no replicas. ``table``: a
    precomputed :func:`~placer.metrics.dispatch.dispatch_table` for this placement, rule and seed.
    """
    num_layers, num_experts, _ = core.data_shape(data)
    core.check_shapes(placement, topology, num_layers, num_experts)
    if table is None:
        table = core.rank_table(placement, topology, dispatch, seed, getattr(data, "model", None))
    core.check_rule(dispatch)
    num_gpus = placement.num_gpus
    if isinstance(data, RoutingStats):
        per_slot = slot_load(data.load, placement, topology, dispatch, seed, table=table)
        return per_slot.reshape(num_layers, num_gpus, placement.slots_per_gpu).sum(axis=2)
    tokens = core.resolve_tokens(placement, topology, data, need_top1=False, what="gpu load")
    c = _token_counts([placement], topology, tokens, dispatch, [table], False, num_layers)[0]
    return _load_of(c, num_layers, num_gpus)


def _token_counts(placements: Sequence[Placement], topology: Topology, tokens: core.Tokens | core.StreamTokens,
                  dispatch: str, tables: Sequence[np.ndarray | None], coherent: bool,
                  num_layers: int) -> list[dict[str, np.ndarray]]:
    """:func:`core.count_tokens` of ``placements`` (their rank ``tables``, None for the position rules)."""
    arrays = [dispatch_arrays(p, topology.gpus_per_node, t) for p, t in zip(placements, tables, strict=True)]
    return core.count_tokens(tokens, arrays, dispatch, coherent, num_layers,
                             pairs=topology.bandwidth_gbps is not None)


def _load_of(c: dict[str, np.ndarray], num_layers: int, num_gpus: int) -> np.ndarray:
    """float64 [L, G] from accumulated counts (zeros when no token streamed)."""
    load = c.get("gpu_load", np.zeros(num_layers * num_gpus, dtype=np.int64))
    return load.reshape(num_layers, num_gpus).astype(np.float64)


def load_balance(gpu_load: np.ndarray, time_scale: np.ndarray | None = None) -> dict[str, Any]:
    """Max/mean GPU load per layer and its summary.

    ``gpu_load``: [L, G]. Returns ``per_layer`` float64 [L] (max/mean; a layer with no load
    counts as 1.0), ``median`` and ``mean`` over layers, ``worst`` (the largest) and
    ``worst_layer`` (its index). ``time_scale`` float [G] (:meth:`~placer.types.Topology.time_scale`,
    GPUs of different speeds): the max is of load as time, ``max(load * time_scale) / mean(load)``
    (1.0 when the load is split in proportion to the speeds).
    """
    load = np.asarray(gpu_load, dtype=np.float64)
    if load.ndim != 2 or load.shape[0] < 1 or load.shape[1] < 1:
        raise InvalidInputError(f"expected a [layers, gpus] load matrix, got shape {load.shape}",
                                source="gpu_load")
    mean = load.mean(axis=1)
    ratio = np.ones(load.shape[0])
    busiest = load.max(axis=1) if time_scale is None else (load * time_scale[None, :]).max(axis=1)
    np.divide(busiest, mean, out=ratio, where=mean > 0)
    worst = int(np.argmax(ratio))
    return {"per_layer": ratio, "median": float(np.median(ratio)), "mean": float(ratio.mean()),
            "worst": float(ratio[worst]), "worst_layer": worst}


# --------------------------------------------------------------------------------------------
# Standard expert-parallel dispatch
# --------------------------------------------------------------------------------------------


def dispatch_traffic(placement: Placement, topology: Topology, model: ModelSpec, data: Data, *,
                     dispatch: str = "nearest", seed: int = DEFAULT_DISPATCH_SEED,
                     table: np.ndarray | None = None) -> dict[str, Any]:
    """Standard EP dispatch traffic (DeepEP normal kernels), dispatch direction only.

    Per token and layer: ``intra_node_ranks`` (distinct ranks other than home in the home node
    receiving the token), ``inter_node_nodes`` (distinct remote nodes, one RDMA send each),
    ``remote_node_ranks`` (distinct destination ranks in remote nodes; all but the landing GPU,
    the one with home's local index, get it forwarded over NVLink). ``rdma_bytes =
    inter_node_nodes * token_bytes``, ``nvlink_bytes = (intra_node_ranks + remote ranks other
    than the landing GPU) * token_bytes``. Combine is symmetric and not included.

    Exact on a trace; on stats, exact on the reservoir sample (``source`` says which,
    ``tokens`` how many). Scalars are means per token-layer (``None`` with no tokens);
    ``per_layer`` holds float64 [L] means. ``frac_token_slots_off_gpu`` = token-expert pairs
    served off the home GPU / (tokens * layers * top_k); ``..._off_node`` likewise.
    ``link_time_per_token_layer_s``: every send's bytes over its rank pair's bandwidth (the
    bandwidth-weighted traffic; ``per_layer["link_time_s"]``), on a cluster with a bandwidth per
    rank pair from ``pair_sends`` int64 [L, G, G] (also returned: the sends per layer from rank to
    rank: home to the other ranks of its node, one RDMA send to home's lane in each remote node,
    forwarded from there).
    """
    num_layers = core.data_shape(data)[0]
    tokens = core.resolve_tokens(placement, topology, data, need_top1=False, what="dispatch traffic")
    if table is None:
        table = core.rank_table(placement, topology, dispatch, seed, getattr(data, "model", None))
    core.check_rule(dispatch)
    c = _token_counts([placement], topology, tokens, dispatch, [table], False, num_layers)[0]
    return _standard_summary(c, tokens, num_layers, model, topology)


def link_seconds(c: dict[str, np.ndarray], topology: Topology, token_bytes: float) -> np.ndarray:
    """Seconds of link time per layer, float64 [L], of standard counts ``c``: each send's
    ``token_bytes`` over its pair's bandwidth (:meth:`~placer.types.Topology.bandwidth_matrix`),
    from ``c["pair_sends"]`` int [L, G, G] on a cluster with a bandwidth per pair, else from the
    NVLink and RDMA sends at their tiers' bandwidths (the same sum, every pair of a tier alike)."""
    if "pair_sends" in c:
        return (c["pair_sends"] * (token_bytes / (topology.bandwidth_matrix() * 1e9))).sum(axis=(1, 2))
    nvlink = c["intra_node_ranks"] + c["remote_node_ranks"] - c["remote_landing_ranks"]
    return (nvlink * (token_bytes / (topology.nvlink_gbps * 1e9))
            + c["inter_node_nodes"] * (token_bytes / (topology.nic_gbps * 1e9)))


def _standard_summary(c: dict[str, np.ndarray], tokens: core.Tokens | core.StreamTokens, num_layers: int,
                      model: ModelSpec, topology: Topology) -> dict[str, Any]:
    """:func:`dispatch_traffic`'s result from the accumulated standard counts (int64 [L] each,
    ``pair_sends`` [G, G])."""
    t, k, tb = tokens.num_tokens, tokens.top_k, model.token_bytes
    forwarded = c["remote_node_ranks"] - c["remote_landing_ranks"]
    sums = {
        "intra_node_ranks": c["intra_node_ranks"],
        "inter_node_nodes": c["inter_node_nodes"],
        "remote_node_ranks": c["remote_node_ranks"],
        "remote_forwarded_ranks": forwarded,
        "other_ranks": c["intra_node_ranks"] + c["remote_node_ranks"],
        "rdma_bytes": c["inter_node_nodes"] * tb,
        "nvlink_bytes": (c["intra_node_ranks"] + forwarded) * tb,
    }
    out: dict[str, Any] = {"source": tokens.source, "tokens": t, "direction": "dispatch",
                           "bytes_known": model.token_bytes > 0}
    for name, v in sums.items():
        out[f"{name}_per_token_layer"] = _ratio(v.sum(), t * num_layers)
    out["frac_token_slots_off_gpu"] = _ratio(c["token_slots_off_gpu"].sum(), t * num_layers * k)
    out["frac_token_slots_off_node"] = _ratio(c["token_slots_off_node"].sum(), t * num_layers * k)
    link_s = link_seconds(c, topology, tb) if tb > 0 else None
    out["link_time_per_token_layer_s"] = None if link_s is None else _ratio(link_s.sum(), t * num_layers)
    if "pair_sends" in c:
        out["pair_sends"] = c["pair_sends"]
    per_layer = {name: _per(v, t) for name, v in sums.items()}
    if link_s is not None:
        per_layer["link_time_s"] = _per(link_s, t)
    per_layer["frac_token_slots_off_gpu"] = _per(c["token_slots_off_gpu"], t * k)
    per_layer["frac_token_slots_off_node"] = _per(c["token_slots_off_node"], t * k)
    out["per_layer"] = per_layer
    return out


# --------------------------------------------------------------------------------------------
# Context-coherent execution (ExFlow)
# --------------------------------------------------------------------------------------------


def context_coherent_traffic(placement: Placement, topology: Topology, model: ModelSpec, data: Data, *,
                             dispatch: str = "nearest", seed: int = DEFAULT_DISPATCH_SEED,
                             table: np.ndarray | None = None) -> dict[str, Any]:
    """Context-coherent (ExFlow) execution: the token's state follows its top-1 expert.

    At layer 0 the state is on the home rank. At each layer the replica of the top-1 expert is
    chosen by the dispatch rule from the GPU holding the state, and the state moves there; the
    other K-1 experts are dispatched from that GPU and their outputs return to it.

    Returns ``frac_top1_transitions_cross_gpu`` / ``_cross_node`` (denominator: tokens x (L-1)
    consecutive-layer transitions; ``None`` when L == 1), ``state_moves_per_token_layer``,
    ``other_gpus_per_token_layer`` (distinct GPUs other than the top-1 GPU among the other
    experts' replicas) and ``bytes_per_token_layer`` = token_bytes x state moved + 2 x token_bytes
    x other GPUs (dispatch + combine). ``per_layer``: float64 [L-1] for the fractions, [L] for
    the rest.

    From stats without replicas the transition fractions are exact from
    ``stats.top1_transitions`` (``transitions_source == "stats"``); otherwise they and the bytes
    come from the sample (``source == "sample"``). Stats without a sample give the exact
    fractions only (the rest ``None``). Raises InvalidInputError when top-1 is unknown.
    """
    what = "context-coherent traffic"
    num_layers, num_experts, _ = core.data_shape(data)
    core.check_shapes(placement, topology, num_layers, num_experts)
    core.check_rule(dispatch)
    exact = None
    tokens = None
    if isinstance(data, RoutingStats):
        transitions = data.require_top1(what)
        if placement.num_slots == placement.num_experts:
            exact = core.exact_top1_transitions(placement, topology, transitions)
        if exact is None or data.sample_size > 0:
            tokens = core.resolve_tokens(placement, topology, data, need_top1=True, what=what)
    else:
        tokens = core.resolve_tokens(placement, topology, data, need_top1=True, what=what)

    c = None
    if tokens is not None:
        if table is None:
            table = core.rank_table(placement, topology, dispatch, seed, getattr(data, "model", None))
        c = _token_counts([placement], topology, tokens, dispatch, [table], True, num_layers)[0]
    return _cc_summary(c, tokens, exact, num_layers, model)


def _cc_summary(c: dict[str, np.ndarray] | None, tokens: core.Tokens | core.StreamTokens | None,
                exact: dict[str, np.ndarray] | None, num_layers: int, model: ModelSpec) -> dict[str, Any]:
    """:func:`context_coherent_traffic`'s result from the accumulated counts ``c`` of ``tokens``
    (both None without tokens) and the exact transitions from stats (``exact``, or None)."""
    out: dict[str, Any] = {"source": None if tokens is None else tokens.source,
                           "tokens": 0 if tokens is None else tokens.num_tokens,
                           "bytes_known": model.token_bytes > 0}
    per_layer: dict[str, np.ndarray] = {}
    if tokens is not None and c is not None:
        t, tb = tokens.num_tokens, model.token_bytes
        sums = {"state_moves": c["state_moves"], "other_gpus": c["other_gpus"],
                "bytes": tb * c["state_moves"] + 2 * tb * c["other_gpus"]}
        for name, v in sums.items():
            out[f"{name}_per_token_layer"] = _ratio(v.sum(), t * num_layers)
            per_layer[name] = _per(v, t)
        if exact is None:
            exact = {"cross_gpu": c["cross_gpu"], "cross_node": c["cross_node"],
                     "total": np.full(num_layers - 1, t, dtype=np.int64)}
            out["transitions_source"] = tokens.source
        else:
            out["transitions_source"] = "stats"
    else:
        for name in ("state_moves", "other_gpus", "bytes"):
            out[f"{name}_per_token_layer"] = None
        out["transitions_source"] = "stats"
    assert exact is not None
    out["transitions"] = int(exact["total"].sum())
    for name in ("cross_gpu", "cross_node"):
        out[f"frac_top1_transitions_{name}"] = _ratio(exact[name].sum(), exact["total"].sum())
        per_layer[f"frac_top1_transitions_{name}"] = _per(exact[name], exact["total"])
    out["per_layer"] = per_layer
    return out


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def expert_memory(placement: Placement, model: ModelSpec) -> dict[str, Any]:
    """Bytes of routed-expert weights per GPU (every slot holds one expert copy).

    Returns ``bytes_per_gpu`` and ``expert_weight_bytes`` (``None`` when the model's sizes are
    unknown), ``slots_per_gpu`` and ``expert_copies_per_gpu`` (slots per GPU x layers).
    """
    known = model.sizes_known
    return {"bytes_per_gpu": expert_memory_per_gpu(placement, model) if known else None,
            "expert_weight_bytes": model.expert_weight_bytes if known else None,
            "slots_per_gpu": int(placement.slots_per_gpu),
            "expert_copies_per_gpu": int(placement.slots_per_gpu * placement.num_layers)}


# --------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------

_STANDARD_KEYS = ("intra_node_ranks_per_token_layer", "inter_node_nodes_per_token_layer",
                  "remote_node_ranks_per_token_layer", "other_ranks_per_token_layer",
                  "rdma_bytes_per_token_layer", "nvlink_bytes_per_token_layer",
                  "frac_token_slots_off_gpu", "frac_token_slots_off_node", "link_time_per_token_layer_s")
_CC_KEYS = ("frac_top1_transitions_cross_gpu", "frac_top1_transitions_cross_node",
            "cc_state_moves_per_token_layer", "cc_other_gpus_per_token_layer", "cc_bytes_per_token_layer")


def _trace_metrics(placements: Sequence[Placement], topology: Topology, model: ModelSpec,
                   data: RoutingTrace | TraceStream, *, dispatch: str, tables: Sequence[np.ndarray | None],
                   coherent: bool) -> list[tuple[np.ndarray, dict[str, Any], dict[str, Any] | None]]:
    """Per placement: GPU load float64 [L, G], :func:`dispatch_traffic` and (when ``coherent``)
    :func:`context_coherent_traffic` of a trace, every placement from one pass over its tokens
    (top-1 first when ``coherent``: load and standard counts do not depend on the order of a
    token's experts)."""
    num_layers = core.data_shape(data)[0]
    tokens = core.resolve_tokens(placements[0], topology, data, need_top1=coherent, what="metrics")
    out = []
    for p, c in zip(placements, _token_counts(placements, topology, tokens, dispatch, tables, coherent, num_layers),
                    strict=True):
        cc = _cc_summary(c, tokens, None, num_layers, model) if coherent else None
        out.append((_load_of(c, num_layers, p.num_gpus), _standard_summary(c, tokens, num_layers, model, topology), cc))
    return out


def evaluate(placement: Placement, topology: Topology, model: ModelSpec, data: Data, *,
             dispatch: str = "nearest", execution: str = "standard",
             seed: int = DEFAULT_DISPATCH_SEED) -> dict[str, Any]:
    """All headline metrics as one flat JSON-serialisable dict (plus ``data`` and ``per_layer``).

    Keys: see :data:`METRIC_DESCRIPTIONS`; also ``dispatch``, ``execution``, ``seed``, shape
    fields, ``load_source`` ("trace" exact | "stats-exact" | "stats-expected"),
    ``traffic_source``, ``transitions_source``, ``top1_known``. Context-coherent metrics are
    computed whenever top-1 is known, whatever ``execution`` is (``None`` otherwise;
    ``execution="context-coherent"`` without top-1 raises). Byte metrics are ``None`` when the
    model's hidden size is unknown; per-token metrics are ``None`` for load-only stats.
    """
    return evaluate_many([placement], topology, model, data, dispatch=dispatch, execution=execution, seed=seed)[0]


def evaluate_many(placements: Sequence[Placement], topology: Topology, model: ModelSpec, data: Data, *,
                  dispatch: str = "nearest", execution: str = "standard",
                  seed: int = DEFAULT_DISPATCH_SEED) -> list[dict[str, Any]]:
    """:func:`evaluate` of each placement (same cluster, model and routing), in order; a trace
    (whole or streamed) is read once for all of them."""
    core.check_rule(dispatch)
    if execution not in EXECUTION_MODES:
        raise InvalidInputError(f"unknown execution mode {execution!r}; known: {', '.join(EXECUTION_MODES)}",
                                source="--execution")
    num_layers, num_experts, _ = core.data_shape(data)
    for placement in placements:
        core.check_shapes(placement, topology, num_layers, num_experts)
    if model.num_moe_layers != num_layers or model.num_experts != num_experts:
        raise InvalidInputError(f"model {model.name} has {model.num_moe_layers} MoE layers x "
                                f"{model.num_experts} experts, the routing {num_layers} x {num_experts}",
                                source="model")
    if execution == "context-coherent" and not data.has_top1:
        raise InvalidInputError("context-coherent execution needs the top-1 expert of each token, but "
                                "the routing's expert order is unknown and it has no gate weights",
                                source="--execution")
    tables = [core.rank_table(p, topology, dispatch, seed, getattr(data, "model", None)) for p in placements]
    counted: list = [None] * len(placements)
    if placements and not isinstance(data, RoutingStats):  # one pass over the tokens (a stream is read once)
        counted = _trace_metrics(placements, topology, model, data, dispatch=dispatch, tables=tables,
                                 coherent=data.has_top1)
    return [_evaluate_one(p, topology, model, data, dispatch=dispatch, execution=execution, seed=seed, table=t,
                          counted=c) for p, t, c in zip(placements, tables, counted, strict=True)]


def _evaluate_one(placement: Placement, topology: Topology, model: ModelSpec, data: Data, *, dispatch: str,
                  execution: str, seed: int, table: np.ndarray | None,
                  counted: tuple[np.ndarray, dict[str, Any], dict[str, Any] | None] | None) -> dict[str, Any]:
    """:func:`evaluate` of one placement, checked already; ``counted``: its :func:`_trace_metrics`
    on a trace (None on stats)."""
    num_layers, num_experts, top_k = core.data_shape(data)
    top1 = data.has_top1
    is_trace = not isinstance(data, RoutingStats)
    has_tokens = not isinstance(data, RoutingStats) or data.sample_size > 0
    no_replicas = placement.num_slots == placement.num_experts

    out: dict[str, Any] = {
        "dispatch": dispatch, "execution": execution, "seed": int(seed),
        "num_layers": num_layers, "num_experts": num_experts, "top_k": top_k,
        "num_gpus": topology.num_gpus, "num_nodes": topology.num_nodes,
        "gpus_per_node": topology.gpus_per_node, "slots_per_gpu": placement.slots_per_gpu,
        "num_redundant": placement.num_redundant, "model": model.name, "cluster": topology.name,
    }
    per_layer: dict[str, Any] = {}

    if counted is not None:
        load, std, cc = counted
    else:
        load = gpu_load(placement, topology, data, dispatch=dispatch, seed=seed, table=table)
    lb = load_balance(load, None if topology.gpu_speed is None else topology.time_scale())
    out["load_as_time"] = topology.gpu_speed is not None
    out["load_source"] = "trace" if is_trace else ("stats-exact" if no_replicas else "stats-expected")
    out["load_max_over_mean_median"] = lb["median"]
    out["load_max_over_mean_worst"] = lb["worst"]
    out["load_max_over_mean_worst_layer"] = lb["worst_layer"]
    per_layer["load_max_over_mean"] = lb["per_layer"]

    bytes_known = model.token_bytes > 0
    source, tokens = None, 0
    if has_tokens:
        if not is_trace:
            std = dispatch_traffic(placement, topology, model, data, dispatch=dispatch, seed=seed, table=table)
        source, tokens = std["source"], std["tokens"]
        for key in _STANDARD_KEYS:
            out[key] = std[key] if bytes_known or "bytes" not in key else None
        for name, v in std["per_layer"].items():
            if bytes_known or "bytes" not in name:
                per_layer[name] = v
    else:
        out.update(dict.fromkeys(_STANDARD_KEYS))
    out["traffic_source"] = source

    out["top1_known"] = bool(top1)
    out["transitions_source"] = None
    out.update(dict.fromkeys(_CC_KEYS))
    if top1 and (has_tokens or no_replicas):
        if not is_trace:
            cc = context_coherent_traffic(placement, topology, model, data, dispatch=dispatch, seed=seed,
                                          table=table)
        assert cc is not None
        out["transitions_source"] = cc["transitions_source"]
        out["frac_top1_transitions_cross_gpu"] = cc["frac_top1_transitions_cross_gpu"]
        out["frac_top1_transitions_cross_node"] = cc["frac_top1_transitions_cross_node"]
        out["cc_state_moves_per_token_layer"] = cc["state_moves_per_token_layer"]
        out["cc_other_gpus_per_token_layer"] = cc["other_gpus_per_token_layer"]
        out["cc_bytes_per_token_layer"] = cc["bytes_per_token_layer"] if bytes_known else None
        for name, v in cc["per_layer"].items():
            if name == "bytes" and not bytes_known:
                continue
            per_layer[name if name.startswith("frac") else f"cc_{name}"] = v

    mem = expert_memory(placement, model)
    out["expert_memory_bytes_per_gpu"] = mem["bytes_per_gpu"]
    out["expert_memory_frac_of_gpu_memory"] = (None if mem["bytes_per_gpu"] is None
                                               else mem["bytes_per_gpu"] / topology.memory_bytes)
    out["data"] = {"source": source if source is not None else "stats",
                   "tokens": tokens if has_tokens else 0,
                   "total_tokens": data.num_tokens if data.num_tokens is not None else tokens,
                   "phase": getattr(data, "phase", None) if isinstance(data, RoutingStats) else None,
                   "synthetic": getattr(data, "synthetic", None)}
    out["per_layer"] = per_layer
    return json_value(out)
