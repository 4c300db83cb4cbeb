"""The data model of placer: frozen dataclasses over numpy arrays, validated on construction.

Glossary (the symbols are fixed here and used everywhere):

- **L**: number of MoE layers (dense layers are never counted; ``ModelSpec.moe_layer_ids``
  maps MoE ordinal -> absolute hidden-layer index).
- **E**: logical experts per MoE layer, ids ``0..E-1`` as the checkpoint defines them.
- **K**: experts each token picks per layer (top-k).
- **P**: physical experts (slots) per layer, ``P = E + R`` with ``R`` redundant slots.
- **G**: GPUs (EP ranks); **N**: nodes; ``G = N * gpus_per_node``.
- **T**: tokens of a trace; **S**: tokens of a stats reservoir sample.
- **slot-to-GPU rule**: slot ``p`` lives on GPU ``p // slots_per_gpu`` (the rule SGLang, vLLM
  and DeepEP share); GPU ``g`` lives on node ``g // gpus_per_node``.

Only ``Placement.physical_to_logical [L, P]`` is stored; ``log2phy``, ``logcnt`` and the GPU and
node of each replica are derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from placer.errors import InvalidInputError, PlacementError

PHASES = ("prefill", "decode")
"""Phase codes in ``RoutingTrace.phase``: 0 prefill, 1 decode, -1 unknown."""
PHASE_CODES = {"prefill": 0, "decode": 1, "unknown": -1}
TRACE_ORDERS = ("sorted", "unknown")
DISPATCH_RULES = ("nearest", "sglang-static", "sglang-dynamic", "vllm", "vllm-ascend")
"""Replica rules of :mod:`placer.metrics.dispatch`; ``POSITION_RULES`` choose by the token's row in the batch."""
POSITION_RULES = ("sglang-dynamic", "vllm")
# Rules of stacks that cannot use two copies of one expert on one GPU (vllm-ascend keeps one
# local slot per expert): problems under them keep copies on distinct GPUs.
DISTINCT_RULES = ("vllm-ascend",)
EXECUTION_MODES = ("standard", "context-coherent")
SOLVE_STATUSES = ("optimal", "feasible", "timeout", "infeasible")


def _bad(field_name: str, message: str) -> InvalidInputError:
    return InvalidInputError(message, source=field_name)


def _as_int_array(name: str, value: Any, ndim: int, dtype: type) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise _bad(name, f"expected {ndim} dimensions, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            pass
        else:
            raise _bad(name, f"expected integer ids, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _freeze(arr: np.ndarray | None) -> np.ndarray | None:
    if arr is not None:
        arr.flags.writeable = False
    return arr


# --------------------------------------------------------------------------------------------
# Model and cluster
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a MoE model as far as placement, traffic and memory are concerned.

    ``moe_layer_ids`` are absolute hidden-layer indices of the MoE layers (DeepSeek-V3: 3..60).
    ``hidden_size`` and ``expert_ffn_size`` may be 0 when unknown (then bytes and memory are
    not computed). ``activation_bytes`` is bytes per hidden element on the wire,
    ``weight_bytes`` bytes per expert weight element.
    """

    name: str
    num_hidden_layers: int
    moe_layer_ids: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int = 0
    expert_ffn_size: int = 0
    num_shared_experts: int = 0
    num_groups: int = 1
    topk_groups: int = 1
    activation_bytes: float = 2.0
    weight_bytes: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe_layer_ids", tuple(int(i) for i in self.moe_layer_ids))
        ids = self.moe_layer_ids
        if self.num_experts < 1 or self.top_k < 1 or self.top_k > self.num_experts:
            raise _bad("model", f"need 1 <= top_k <= num_experts, got top_k={self.top_k}, "
                                f"num_experts={self.num_experts}")
        if not ids:
            raise _bad("model", "moe_layer_ids is empty")
        if list(ids) != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= self.num_hidden_layers:
            raise _bad("model", f"moe_layer_ids must be increasing and within "
                                f"[0, {self.num_hidden_layers}), got {ids[0]}..{ids[-1]}")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise _bad("model", f"num_groups={self.num_groups} must divide num_experts={self.num_experts}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise _bad("model", f"topk_groups={self.topk_groups} must be in [1, num_groups]")
        if min(self.hidden_size, self.expert_ffn_size, self.num_shared_experts) < 0:
            raise _bad("model", "sizes must be non-negative")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def sizes_known(self) -> bool:
        return self.hidden_size > 0 and self.expert_ffn_size > 0

    @property
    def token_bytes(self) -> float:
        """Bytes of one token's hidden state on the wire (0 when the hidden size is unknown)."""
        return float(self.hidden_size * self.activation_bytes)

    @property
    def expert_weight_bytes(self) -> float:
        """Bytes of one routed expert's weights: gate, up and down projections, 3 * h * I."""
        return float(3 * self.hidden_size * self.expert_ffn_size * self.weight_bytes)

    @classmethod
    def from_shape(cls, num_layers: int, num_experts: int, top_k: int, name: str = "custom") -> ModelSpec:
        """A model known only by its routing shape (every layer is MoE, sizes unknown)."""
        return cls(name=name, num_hidden_layers=num_layers, moe_layer_ids=tuple(range(num_layers)),
                   num_experts=num_experts, top_k=top_k)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["moe_layer_ids"] = list(self.moe_layer_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as exc:
            raise _bad("model", f"incomplete model description: {exc}") from None


@dataclass(frozen=True)
class Topology:
    """A GPU cluster: ``num_nodes`` nodes of ``gpus_per_node`` GPUs, one NIC per GPU.

    Bandwidths are achievable GB/s per GPU per direction, latencies seconds, memory bytes per
    GPU, peak FLOP/s dense.
    """

    name: str
    num_nodes: int
    gpus_per_node: int
    nvlink_gbps: float = 370.0
    nvlink_latency_s: float = 3e-6
    nic_gbps: float = 48.5
    nic_latency_s: float = 6e-6
    hbm_gbps: float = 3350.0
    bf16_flops: float = 989e12
    fp8_flops: float = 1979e12
    memory_bytes: float = 80e9

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise _bad("cluster", f"need at least one node and one GPU per node, got "
                                  f"{self.num_nodes} x {self.gpus_per_node}")
        for name in ("nvlink_gbps", "nic_gbps", "hbm_gbps", "bf16_flops", "fp8_flops", "memory_bytes"):
            v = getattr(self, name)
            if not np.isfinite(v) or v <= 0:
                raise _bad("cluster", f"{name} must be positive, got {v}")

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def node_of_gpu(self, gpu: np.ndarray | int) -> np.ndarray | int:
        return np.asarray(gpu) // self.gpus_per_node if not isinstance(gpu, int) else gpu // self.gpus_per_node

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Topology:
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as exc:
            raise _bad("topology", f"incomplete topology description: {exc}") from None


# --------------------------------------------------------------------------------------------
# Routing data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingTrace:
    """Per-token routing: which experts each token picked at each MoE layer.

    Attributes
    ----------
    expert_ids : int16 [T, L, K]
        Logical expert ids; with ``order == "sorted"`` column 0 is the highest-gate (top-1) expert.
    num_experts : int
        E; every id is in ``[0, E)`` and a token never picks one expert twice in a layer.
    order : "sorted" | "unknown"
        Whether the K columns are sorted by gate weight (descending).
    gate_weights : float32 [T, L, K] or None
    request_ids : int64 [T] or None
    phase : int8 [T] or None
        0 prefill, 1 decode, -1 unknown.
    home_rank : int32 [T] or None
        EP rank the token starts on; ``None`` means round-robin by token index.
    model : ModelSpec or None
        Carried along when the source knows it.
    """

    expert_ids: np.ndarray
    num_experts: int
    order: str = "sorted"
    gate_weights: np.ndarray | None = None
    request_ids: np.ndarray | None = None
    phase: np.ndarray | None = None
    home_rank: np.ndarray | None = None
    model: ModelSpec | None = None

    def __post_init__(self) -> None:
        ids = _as_int_array("expert_ids", self.expert_ids, 3, np.int16)
        t, num_layers, k = ids.shape
        if num_layers < 1 or k < 1:
            raise _bad("expert_ids", f"need at least one layer and one expert per token, got shape {ids.shape}")
        e = int(self.num_experts)
        if e < k:
            raise _bad("expert_ids", f"top_k={k} exceeds num_experts={e}")
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= e:
                raise _bad("expert_ids", f"expert ids must be in [0, {e}), found {lo if lo < 0 else hi}")
            if k > 1 and _has_duplicate_ids(ids):
                raise _bad("expert_ids", "a token picks the same expert twice in one layer")
        if self.order not in TRACE_ORDERS:
            raise _bad("order", f"must be one of {TRACE_ORDERS}, got {self.order!r}")
        if self.model is not None:
            if self.model.num_experts != e or self.model.top_k != k or self.model.num_moe_layers != num_layers:
                raise _bad("expert_ids", f"shape [T, {num_layers}, {k}] with E={e} does not match model "
                                         f"{self.model.name} ({self.model.num_moe_layers} MoE layers, "
                                         f"E={self.model.num_experts}, top_k={self.model.top_k})")
        object.__setattr__(self, "expert_ids", _freeze(ids))
        if self.gate_weights is not None:
            w = np.ascontiguousarray(self.gate_weights, dtype=np.float32)
            if w.shape != ids.shape:
                raise _bad("gate_weights", f"shape {w.shape} does not match expert_ids {ids.shape}")
            if not np.all(np.isfinite(w)):
                raise _bad("gate_weights", "contains NaN or infinite values")
            object.__setattr__(self, "gate_weights", _freeze(w))
        for name, dtype in (("request_ids", np.int64), ("phase", np.int8), ("home_rank", np.int32)):
            v = getattr(self, name)
            if v is None:
                continue
            arr = _as_int_array(name, v, 1, dtype)
            if arr.shape[0] != t:
                raise _bad(name, f"has {arr.shape[0]} entries for {t} tokens")
            if name == "phase" and arr.size and (arr.min() < -1 or arr.max() > 1):
                raise _bad(name, "phase codes must be 0 (prefill), 1 (decode) or -1 (unknown)")
            if name == "home_rank" and arr.size and arr.min() < 0:
                raise _bad(name, "home ranks must be non-negative")
            object.__setattr__(self, name, _freeze(arr))

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def has_top1(self) -> bool:
        """Whether the top-1 (highest-gate) expert of each token is known."""
        return self.order == "sorted" or self.gate_weights is not None

    def sorted_ids(self) -> np.ndarray:
        """Expert ids with column 0 the top-1 expert. Shape: int16 [T, L, K]."""
        if self.order == "sorted":
            return self.expert_ids
        if self.gate_weights is None:
            raise InvalidInputError("the top-1 expert is unknown: the trace's expert order is 'unknown' "
                                    "and it carries no gate weights", source="trace")
        idx = np.argsort(-self.gate_weights, axis=-1, kind="stable")
        return np.take_along_axis(self.expert_ids, idx, axis=-1)

    def select_tokens(self, mask_or_index: np.ndarray) -> RoutingTrace:
        """A new trace with the selected tokens (boolean mask or index array over T)."""
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[mask_or_index]
        return RoutingTrace(self.expert_ids[mask_or_index], self.num_experts, self.order,
                            pick(self.gate_weights), pick(self.request_ids), pick(self.phase),
                            pick(self.home_rank), self.model)

    def with_model(self, model: ModelSpec) -> RoutingTrace:
        return replace(self, model=model)


def _has_duplicate_ids(ids: np.ndarray, chunk: int = 1 << 16) -> bool:
    k = ids.shape[2]
    if k == 2:
        return bool(np.any(ids[:, :, 0] == ids[:, :, 1]))
    for start in range(0, ids.shape[0], chunk):
        s = np.sort(ids[start:start + chunk], axis=-1)
        if np.any(s[..., 1:] == s[..., :-1]):
            return True
    return False


@dataclass(frozen=True)
class RoutingStats:
    """Sufficient statistics of routing, what solvers and metrics consume.

    Attributes
    ----------
    load : int64 [L, E]
        Token-slots per expert (a token counts once for each of its K experts).
    num_tokens : int
    top_k : int
    top1_transitions : int64 [L-1, E, E] or None
        ``[l, i, j]`` = tokens whose top-1 expert is i at layer l and j at layer l+1.
        ``None`` when the source's order is unknown and it has no gate weights, or for
        load-only input.
    pair_transitions : int64 [L-1, E, E] or None
        ``[l, i, j]`` = (token, a, b) triples with a among the token's experts at layer l and
        b among them at layer l+1 (K*K per token and layer pair).
    coactivation : int64 [L, E, E] or None
        ``[l, i, j]`` = tokens that picked both i and j at layer l (symmetric, zero diagonal).
    sample_ids : int16 [S, L, K] or None
        A uniform reservoir sample of tokens (top-1 first when known), so dispatch metrics that
        pairwise counts cannot give exactly when K > 2 are exact on the sample.
    sample_token_index : int64 [S]
        Position of each sampled token in its stream (gives round-robin home ranks).
    sample_home_rank : int32 [S]
        Home rank of each sampled token, -1 when the source had none.
    sample_keys : float64 [S]
        Reservoir keys: the sample is the S tokens with the smallest keys, so merging keeps the
        smallest S of the union.
    phase : "all" | "prefill" | "decode" | "unknown"
    """

    load: np.ndarray
    num_tokens: int
    top_k: int
    top1_transitions: np.ndarray | None = None
    pair_transitions: np.ndarray | None = None
    coactivation: np.ndarray | None = None
    sample_ids: np.ndarray | None = None
    sample_token_index: np.ndarray | None = None
    sample_home_rank: np.ndarray | None = None
    sample_keys: np.ndarray | None = None
    phase: str = "all"
    model: ModelSpec | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        load = np.asarray(self.load)
        if load.ndim != 2 or load.shape[0] < 1 or load.shape[1] < 1:
            raise _bad("load", f"expected a [layers, experts] matrix, got shape {load.shape}")
        if load.size and not np.all(np.isfinite(load.astype(np.float64))):
            raise _bad("load", "contains NaN or infinite values")
        if load.size and load.min() < 0:
            raise _bad("load", f"contains negative values (min {load.min()})")
        if not np.issubdtype(load.dtype, np.integer):
            load = load.astype(np.float64)
        else:
            load = load.astype(np.int64)
        object.__setattr__(self, "load", _freeze(np.ascontiguousarray(load)))
        num_layers, e = load.shape
        if self.top_k < 1 or self.top_k > e:
            raise _bad("top_k", f"must be in [1, {e}], got {self.top_k}")
        if self.num_tokens < 0:
            raise _bad("num_tokens", "must be non-negative")
        for name, shape in (("top1_transitions", (num_layers - 1, e, e)),
                            ("pair_transitions", (num_layers - 1, e, e)),
                            ("coactivation", (num_layers, e, e))):
            v = getattr(self, name)
            if v is None:
                continue
            arr = np.ascontiguousarray(v, dtype=np.int64)
            if arr.shape != shape:
                raise _bad(name, f"expected shape {shape}, got {arr.shape}")
            if arr.size and arr.min() < 0:
                raise _bad(name, "contains negative counts")
            object.__setattr__(self, name, _freeze(arr))
        if self.sample_ids is not None:
            s = _as_int_array("sample_ids", self.sample_ids, 3, np.int16)
            if s.shape[1:] != (num_layers, self.top_k):
                raise _bad("sample_ids", f"expected shape [S, {num_layers}, {self.top_k}], got {s.shape}")
            if s.size and (s.min() < 0 or s.max() >= e):
                raise _bad("sample_ids", f"expert ids must be in [0, {e})")
            n = s.shape[0]
            idx = _as_int_array("sample_token_index", self.sample_token_index
                                if self.sample_token_index is not None else np.arange(n), 1, np.int64)
            home = _as_int_array("sample_home_rank", self.sample_home_rank
                                 if self.sample_home_rank is not None else np.full(n, -1), 1, np.int32)
            keys = np.ascontiguousarray(self.sample_keys if self.sample_keys is not None
                                        else np.linspace(0, 1, n, endpoint=False), dtype=np.float64)
            if not idx.shape[0] == home.shape[0] == keys.shape[0] == n:
                raise _bad("sample_ids", "sample arrays have different lengths")
            for name, arr in (("sample_ids", s), ("sample_token_index", idx),
                              ("sample_home_rank", home), ("sample_keys", keys)):
                object.__setattr__(self, name, _freeze(arr))

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])

    @property
    def has_top1(self) -> bool:
        return self.top1_transitions is not None

    @property
    def sample_size(self) -> int:
        return 0 if self.sample_ids is None else int(self.sample_ids.shape[0])

    def require_top1(self, what: str = "this statistic") -> np.ndarray:
        if self.top1_transitions is None:
            raise InvalidInputError(f"{what} needs top-1 experts, but the input's expert order is "
                                    "unknown and it has no gate weights (or it is load-only)",
                                    source="stats")
        return self.top1_transitions

    def require_sample(self, what: str = "this statistic") -> np.ndarray:
        if self.sample_ids is None or self.sample_ids.shape[0] == 0:
            raise InvalidInputError(f"{what} needs per-token routing; the input is load-only",
                                    source="stats")
        return self.sample_ids

    def layers(self, start: int, stop: int) -> RoutingStats:
        """Statistics of the MoE layers ``start..stop-1`` (transitions inside that range only)."""
        if not 0 <= start < stop <= self.num_layers:
            raise _bad("layers", f"range {start}:{stop} is outside 0:{self.num_layers}")

        def cut(a: np.ndarray | None, n: int) -> np.ndarray | None:
            return None if a is None else a[start:stop - n]
        return replace(
            self, load=self.load[start:stop], top1_transitions=cut(self.top1_transitions, 1),
            pair_transitions=cut(self.pair_transitions, 1), coactivation=cut(self.coactivation, 0),
            sample_ids=None if self.sample_ids is None else self.sample_ids[:, start:stop],
            model=None)


# --------------------------------------------------------------------------------------------
# Placement and results
# --------------------------------------------------------------------------------------------


def check_structure(physical_to_logical: np.ndarray, slots_per_gpu: int, num_experts: int) -> None:
    """Checks that need nothing but the map itself.

    ``physical_to_logical``: int [L, P]. Raises on ids out of ``[0, E)``, a slot count that is
    not a multiple of ``slots_per_gpu``, fewer slots than experts, or a logical expert with no
    slot in some layer.
    """
    violations = structure_violations(physical_to_logical, slots_per_gpu, num_experts)
    if violations:
        raise PlacementError(violations[0], source="placement")


def structure_violations(p2l: np.ndarray, slots_per_gpu: int, num_experts: int) -> list[str]:
    out: list[str] = []
    if p2l.ndim != 2 or p2l.shape[0] < 1:
        return [f"physical_to_logical must be [layers, slots], got shape {p2l.shape}"]
    num_layers, num_slots = p2l.shape
    if slots_per_gpu < 1:
        return [f"slots_per_gpu must be positive, got {slots_per_gpu}"]
    if num_experts < 1:
        return [f"num_experts must be positive, got {num_experts}"]
    if num_slots % slots_per_gpu:
        out.append(f"{num_slots} slots per layer are not a multiple of slots_per_gpu={slots_per_gpu} "
                   "(every GPU needs the same number of slots)")
    if num_slots < num_experts:
        out.append(f"{num_slots} slots per layer cannot hold {num_experts} experts")
    lo, hi = int(p2l.min()), int(p2l.max())
    if lo < 0 or hi >= num_experts:
        bad = lo if lo < 0 else hi
        layer = int(np.argwhere((p2l < 0) | (p2l >= num_experts))[0, 0])
        out.append(f"layer {layer}: logical id {bad} outside [0, {num_experts})")
        return out
    present = np.zeros((num_layers, num_experts), dtype=bool)
    present[np.repeat(np.arange(num_layers), num_slots), p2l.ravel()] = True
    if not present.all():
        layer, expert = (int(x) for x in np.argwhere(~present)[0])
        out.append(f"layer {layer}: logical expert {expert} has no slot")
    return out


@dataclass(frozen=True)
class Placement:
    """Where every physical expert lives: the one canonical map.

    Attributes
    ----------
    physical_to_logical : int32 [L, P]
        Logical expert held by each slot; slot ``p`` lives on GPU ``p // slots_per_gpu``.
    slots_per_gpu : int
    num_experts : int
        E; every logical expert has at least one slot in every layer.

    replica_rank : int64 [L, P] or None
        Replica rank of each slot among its expert's slots (0 for the first replica created), as
        DeepSeek's ``eplb.py`` returns it (``phyrank``); it orders ``log2phy(order="replica")``.
        None means ascending slot order (also what an ascending ``replica_rank`` is stored as).

    Example: ``Placement([[0, 1, 2, 3, 0, 1]], slots_per_gpu=3, num_experts=4)`` puts experts
    {0, 1, 2} on GPU 0 and {3, 0, 1} on GPU 1 (experts 0 and 1 replicated).
    """

    physical_to_logical: np.ndarray
    slots_per_gpu: int
    num_experts: int
    replica_rank: np.ndarray | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        p2l = _as_int_array("physical_to_logical", self.physical_to_logical, 2, np.int32)
        object.__setattr__(self, "physical_to_logical", _freeze(p2l))
        check_structure(p2l, int(self.slots_per_gpu), int(self.num_experts))
        if self.replica_rank is not None:
            rank = _as_int_array("replica_rank", self.replica_rank, 2, np.int64)
            if rank.shape != p2l.shape:
                raise _bad("replica_rank", f"shape {list(rank.shape)} differs from the map's {list(p2l.shape)}")
            slot_rank = self._slot_ranks()
            keys = p2l.astype(np.int64) * p2l.shape[1] + rank  # (expert, rank) per layer
            if rank.min() < 0 or rank.max() >= p2l.shape[1] or not np.array_equal(np.sort(keys, axis=1),
                                                    np.sort(p2l.astype(np.int64) * p2l.shape[1] + slot_rank,
                                                            axis=1)):
                raise _bad("replica_rank", "each expert's slots must carry the ranks 0..replicas-1 once each")
            object.__setattr__(self, "replica_rank",
                               None if np.array_equal(rank, slot_rank) else _freeze(rank))

    def _slot_ranks(self) -> np.ndarray:
        """Rank of each slot among its expert's slots in ascending slot order. int64 [L, P]."""
        p2l = self.physical_to_logical
        order = np.argsort(p2l, axis=1, kind="stable")
        experts = np.take_along_axis(p2l, order, axis=1).astype(np.int64)
        cnt = self.logcnt()
        starts = np.concatenate([np.zeros((self.num_layers, 1), np.int64), np.cumsum(cnt, axis=1)[:, :-1]], axis=1)
        ranks_sorted = np.arange(self.num_slots)[None, :] - np.take_along_axis(starts, experts, axis=1)
        out = np.empty_like(ranks_sorted)
        np.put_along_axis(out, order, ranks_sorted, axis=1)
        return out

    @property
    def num_layers(self) -> int:
        return int(self.physical_to_logical.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.physical_to_logical.shape[1])

    @property
    def num_gpus(self) -> int:
        return self.num_slots // self.slots_per_gpu

    @property
    def num_redundant(self) -> int:
        return self.num_slots - self.num_experts

    def gpu_of_slot(self) -> np.ndarray:
        """GPU of every slot. Shape: int64 [P]."""
        return np.arange(self.num_slots) // self.slots_per_gpu

    def logcnt(self) -> np.ndarray:
        """Replica count of every logical expert. Shape: int64 [L, E]."""
        out = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        rows = np.repeat(np.arange(self.num_layers), self.num_slots)
        np.add.at(out, (rows, self.physical_to_logical.ravel()), 1)
        return out

    def log2phy(self, order: str = "slot", width: int | None = None) -> np.ndarray:
        """Slots of every logical expert, right-padded with -1. Shape: int64 [L, E, X].

        ``order="slot"``: ascending slot (how SGLang and vLLM enumerate replicas of a map they
        load); ``order="replica"``: by ``replica_rank`` (DeepSeek ``eplb.py``'s ``log2phy``),
        ascending slot where the placement carries none. ``width`` X defaults to the largest
        replica count; DeepSeek's arrays use ``P - E + 1``.
        """
        if order not in ("slot", "replica"):
            raise _bad("order", f"must be 'slot' or 'replica', got {order!r}")
        cnt = self.logcnt()
        need = int(cnt.max())
        width = need if width is None else int(width)
        if width < need:
            raise _bad("width", f"{width} is below the largest replica count {need}")
        rank = self._slot_ranks() if order == "slot" or self.replica_rank is None else self.replica_rank
        out = np.full((self.num_layers, self.num_experts * width), -1, dtype=np.int64)
        p2l = self.physical_to_logical.astype(np.int64)
        np.put_along_axis(out, p2l * width + rank,
                          np.broadcast_to(np.arange(self.num_slots, dtype=np.int64), p2l.shape), axis=1)
        return out.reshape(self.num_layers, self.num_experts, width)

    def gpu_experts(self) -> np.ndarray:
        """Logical experts on each GPU in local-slot order. Shape: int32 [L, G, slots_per_gpu]."""
        return self.physical_to_logical.reshape(self.num_layers, self.num_gpus, self.slots_per_gpu)

    def layers(self, start: int, stop: int) -> Placement:
        rank = None if self.replica_rank is None else self.replica_rank[start:stop]
        return Placement(self.physical_to_logical[start:stop], self.slots_per_gpu, self.num_experts, rank)


@dataclass(frozen=True)
class SolveResult:
    """What every solver returns.

    ``status`` is ``optimal`` (proven), ``feasible`` (valid, not proven optimal), ``timeout``
    (limit hit; the best valid placement found is returned with its gap) or ``infeasible``
    (``placement`` is None). ``bound`` is a proven lower bound on ``objective`` (None when the
    method proves none) and ``gap = (objective - bound) / max(|objective|, eps)``.
    """

    placement: Placement | None
    status: str
    objective: float
    terms: dict[str, float] = field(default_factory=dict)
    bound: float | None = None
    gap: float | None = None
    wall_time_s: float = 0.0
    method: str = ""
    backend: str = "numpy"

    def __post_init__(self) -> None:
        if self.status not in SOLVE_STATUSES:
            raise _bad("status", f"must be one of {SOLVE_STATUSES}, got {self.status!r}")
        if self.placement is None and self.status != "infeasible":
            raise _bad("placement", f"status {self.status!r} needs a placement")
