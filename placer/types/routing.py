"""Routing data: per-token :class:`RoutingTrace` and its sufficient statistics :class:`RoutingStats`.

Import them from :mod:`placer.types` (the glossary of symbols is there).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from placer.errors import InvalidInputError
from placer.types._fields import as_int_array, bad_field, freeze
from placer.types.specs import ModelSpec

PHASES = ("prefill", "decode")
"""Phase codes in ``RoutingTrace.phase``: 0 prefill, 1 decode, -1 unknown."""
PHASE_CODES = {"prefill": 0, "decode": 1, "unknown": -1}
TRACE_ORDERS = ("sorted", "unknown")


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
        ids = as_int_array("expert_ids", self.expert_ids, 3, np.int16)
        t, num_layers, k = ids.shape
        if num_layers < 1 or k < 1:
            raise bad_field("expert_ids", f"need at least one layer and one expert per token, got shape {ids.shape}")
        e = int(self.num_experts)
        if e < k:
            raise bad_field("expert_ids", f"top_k={k} exceeds num_experts={e}")
        if ids.size:
            from placer.types._scan import scan  # deferred: keeps numba off placer --help
            lo, hi, dup = scan(ids)  # one compiled pass (a min, a max and a sort per row before)
            if lo < 0 or hi >= e:
                raise bad_field("expert_ids", f"expert ids must be in [0, {e}), found {lo if lo < 0 else hi}")
            if dup:
                raise bad_field("expert_ids", "a token picks the same expert twice in one layer")
        if self.order not in TRACE_ORDERS:
            raise bad_field("order", f"must be one of {TRACE_ORDERS}, got {self.order!r}")
        if self.model is not None:
            if self.model.num_experts != e or self.model.top_k != k or self.model.num_moe_layers != num_layers:
                raise bad_field("expert_ids", f"shape [T, {num_layers}, {k}] with E={e} does not match model "
                                f"{self.model.name} ({self.model.num_moe_layers} MoE layers, "
                                f"E={self.model.num_experts}, top_k={self.model.top_k})")
        object.__setattr__(self, "expert_ids", freeze(ids))
        if self.gate_weights is not None:
            w = np.ascontiguousarray(self.gate_weights, dtype=np.float32)
            if w.shape != ids.shape:
                raise bad_field("gate_weights", f"shape {w.shape} does not match expert_ids {ids.shape}")
            if not np.all(np.isfinite(w)):
                raise bad_field("gate_weights", "contains NaN or infinite values")
            object.__setattr__(self, "gate_weights", freeze(w))
        for name, dtype in (("request_ids", np.int64), ("phase", np.int8), ("home_rank", np.int32)):
            v = getattr(self, name)
            if v is None:
                continue
            arr = as_int_array(name, v, 1, dtype)
            if arr.shape[0] != t:
                raise bad_field(name, f"has {arr.shape[0]} entries for {t} tokens")
            if name == "phase" and arr.size and (arr.min() < -1 or arr.max() > 1):
                raise bad_field(name, "phase codes must be 0 (prefill), 1 (decode) or -1 (unknown)")
            if name == "home_rank" and arr.size and arr.min() < 0:
                raise bad_field(name, "home ranks must be non-negative")
            object.__setattr__(self, name, freeze(arr))

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
            raise bad_field("load", f"expected a [layers, experts] matrix, got shape {load.shape}")
        if load.size and not np.all(np.isfinite(load.astype(np.float64))):
            raise bad_field("load", "contains NaN or infinite values")
        if load.size and load.min() < 0:
            raise bad_field("load", f"contains negative values (min {load.min()})")
        load = load.astype(np.int64 if np.issubdtype(load.dtype, np.integer) else np.float64)
        object.__setattr__(self, "load", freeze(np.ascontiguousarray(load)))
        num_layers, e = load.shape
        if self.top_k < 1 or self.top_k > e:
            raise bad_field("top_k", f"must be in [1, {e}], got {self.top_k}")
        if self.num_tokens < 0:
            raise bad_field("num_tokens", "must be non-negative")
        for name, shape in (("top1_transitions", (num_layers - 1, e, e)),
                            ("pair_transitions", (num_layers - 1, e, e)),
                            ("coactivation", (num_layers, e, e))):
            v = getattr(self, name)
            if v is None:
                continue
            arr = np.ascontiguousarray(v, dtype=np.int64)
            if arr.shape != shape:
                raise bad_field(name, f"expected shape {shape}, got {arr.shape}")
            if arr.size and arr.min() < 0:
                raise bad_field(name, "contains negative counts")
            object.__setattr__(self, name, freeze(arr))
        if self.sample_ids is not None:
            s = as_int_array("sample_ids", self.sample_ids, 3, np.int16)
            if s.shape[1:] != (num_layers, self.top_k):
                raise bad_field("sample_ids", f"expected shape [S, {num_layers}, {self.top_k}], got {s.shape}")
            if s.size and (s.min() < 0 or s.max() >= e):
                raise bad_field("sample_ids", f"expert ids must be in [0, {e})")
            n = s.shape[0]
            idx = as_int_array("sample_token_index", self.sample_token_index
                               if self.sample_token_index is not None else np.arange(n), 1, np.int64)
            home = as_int_array("sample_home_rank", self.sample_home_rank
                                if self.sample_home_rank is not None else np.full(n, -1), 1, np.int32)
            keys = np.ascontiguousarray(self.sample_keys if self.sample_keys is not None
                                        else np.linspace(0, 1, n, endpoint=False), dtype=np.float64)
            if not idx.shape[0] == home.shape[0] == keys.shape[0] == n:
                raise bad_field("sample_ids", "sample arrays have different lengths")
            for name, sample in (("sample_ids", s), ("sample_token_index", idx),
                                 ("sample_home_rank", home), ("sample_keys", keys)):
                object.__setattr__(self, name, freeze(sample))

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
            raise bad_field("layers", f"range {start}:{stop} is outside 0:{self.num_layers}")

        def cut(a: np.ndarray | None, n: int) -> np.ndarray | None:
            return None if a is None else a[start:stop - n]
        return replace(
            self, load=self.load[start:stop], top1_transitions=cut(self.top1_transitions, 1),
            pair_transitions=cut(self.pair_transitions, 1), coactivation=cut(self.coactivation, 0),
            sample_ids=None if self.sample_ids is None else self.sample_ids[:, start:stop],
            model=None)
