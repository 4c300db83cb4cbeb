"""Where the experts live: :class:`Placement` (the one canonical map), its structural checks, and
:class:`SolveResult`, what every solver returns.

Import them from :mod:`placer.types` (the glossary of symbols is there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from placer.errors import PlacementError
from placer.types._fields import as_int_array, bad_field, freeze

SOLVE_STATUSES = ("optimal", "feasible", "timeout", "infeasible")


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
        p2l = as_int_array("physical_to_logical", self.physical_to_logical, 2, np.int32)
        object.__setattr__(self, "physical_to_logical", freeze(p2l))
        check_structure(p2l, int(self.slots_per_gpu), int(self.num_experts))
        if self.replica_rank is not None:
            rank = as_int_array("replica_rank", self.replica_rank, 2, np.int64)
            if rank.shape != p2l.shape:
                raise bad_field("replica_rank", f"shape {list(rank.shape)} differs from the map's {list(p2l.shape)}")
            slot_rank = self._slot_ranks()
            keys = p2l.astype(np.int64) * p2l.shape[1] + rank  # (expert, rank) per layer
            if rank.min() < 0 or rank.max() >= p2l.shape[1] or not np.array_equal(np.sort(keys, axis=1),
                                                    np.sort(p2l.astype(np.int64) * p2l.shape[1] + slot_rank,
                                                            axis=1)):
                raise bad_field("replica_rank", "each expert's slots must carry the ranks 0..replicas-1 once each")
            object.__setattr__(self, "replica_rank",
                               None if np.array_equal(rank, slot_rank) else freeze(rank))

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
            raise bad_field("order", f"must be 'slot' or 'replica', got {order!r}")
        cnt = self.logcnt()
        need = int(cnt.max())
        width = need if width is None else int(width)
        if width < need:
            raise bad_field("width", f"{width} is below the largest replica count {need}")
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
            raise bad_field("status", f"must be one of {SOLVE_STATUSES}, got {self.status!r}")
        if self.placement is None and self.status != "infeasible":
            raise bad_field("placement", f"status {self.status!r} needs a placement")
