"""The records of a live re-placement plan: transfers, local copies and the plan itself.

Made by :func:`placer.runtime.plan.plan_migration` (and importable from there); every array is
read-only. Shapes: ``physical_to_logical: [L, P]``, ``P = G * S`` slots, slot ``p`` on GPU
``p // S``; transfers ``[X]``, local copies ``[Y]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from placer.types import Placement

__all__ = ["LocalCopies", "MigrationPlan", "Transfers", "frozen_array"]


def frozen_array(arr: Any, dtype: Any) -> np.ndarray:
    """``arr`` as a contiguous, read-only array of ``dtype``."""
    out = np.ascontiguousarray(arr, dtype=dtype)
    out.flags.writeable = False
    return out


def _freeze_fields(obj: Any) -> None:
    """Every field of a dataclass of arrays as a read-only array (``bytes`` float64, else int64)."""
    for f in fields(obj):
        dtype = np.float64 if f.name == "bytes" else np.int64
        object.__setattr__(obj, f.name, frozen_array(getattr(obj, f.name), dtype))


@dataclass(frozen=True)
class Transfers:
    """Inter-GPU copies of one expert's weights, one row each; every array has shape [X].

    ``slot`` is the destination slot (on ``dst_gpu``), ``src_slot`` a slot of ``src_gpu``
    holding ``expert`` in the old placement, ``round`` the round the copy runs in.
    """

    layer: np.ndarray
    slot: np.ndarray
    dst_gpu: np.ndarray
    src_gpu: np.ndarray
    src_slot: np.ndarray
    expert: np.ndarray
    bytes: np.ndarray
    round: np.ndarray

    def __post_init__(self) -> None:
        _freeze_fields(self)

    def __len__(self) -> int:
        return int(self.layer.shape[0])


@dataclass(frozen=True)
class LocalCopies:
    """On-GPU copies made when a layer commits; every array has shape [Y].

    Slot ``slot`` of ``gpu`` takes ``expert`` from ``src_slot`` of the same GPU, read after
    the layer's staged transfers are written (the source is a kept or a received slot).
    """

    layer: np.ndarray
    slot: np.ndarray
    gpu: np.ndarray
    src_slot: np.ndarray
    expert: np.ndarray

    def __post_init__(self) -> None:
        _freeze_fields(self)

    def __len__(self) -> int:
        return int(self.layer.shape[0])


@dataclass(frozen=True)
class MigrationPlan:
    """How to go from ``old`` to ``new`` (the relabelled target) while serving.

    Attributes
    ----------
    new : Placement
        The relabelled target, ``physical_to_logical: [L, P]``, validated: what runs.
    gpu_relabel : int64 [G], node_relabel : int64 [N]
        Requested GPU ``j`` (node ``a``) becomes physical GPU ``gpu_relabel[j]`` (node
        ``node_relabel[a]``); ``gpu_relabel[j] // gpus_per_node == node_relabel[j // gpus_per_node]``.
    slot_map : int64 [L, P]
        ``new[l, slot_map[l, q]] == requested[l, q]``; ``kept : bool [L, P]``: unchanged slots.
    transfers : Transfers [X]; local_copies : LocalCopies [Y]
    commit_round : int64 [L]
        Layer ``l`` switches to its new map after round ``commit_round[l]`` (-1: before any).
    expert_bytes, staging_bytes, naive_bytes : float
        One expert; the staging headroom per rank; the naive plan (every changed slot sent).
    """

    new: Placement
    gpu_relabel: np.ndarray
    node_relabel: np.ndarray
    slot_map: np.ndarray
    kept: np.ndarray
    transfers: Transfers
    local_copies: LocalCopies
    commit_round: np.ndarray
    expert_bytes: float
    staging_bytes: float
    naive_bytes: float
    gpus_per_node: int

    @property
    def bytes_moved(self) -> float:
        """Bytes sent between GPUs (local copies excluded)."""
        return float(self.transfers.bytes.sum())

    @property
    def bytes_inter_node(self) -> float:
        t = self.transfers
        cross = t.src_gpu // self.gpus_per_node != t.dst_gpu // self.gpus_per_node
        return float(t.bytes[cross].sum())

    @property
    def local_copy_bytes(self) -> float:
        return len(self.local_copies) * self.expert_bytes

    @property
    def num_rounds(self) -> int:
        return int(self.transfers.round.max()) + 1 if len(self.transfers) else 0

    def layer_bytes(self) -> np.ndarray:
        """Bytes sent between GPUs per layer. Shape: float64 [L]."""
        return np.bincount(self.transfers.layer, weights=self.transfers.bytes,
                           minlength=self.new.num_layers)

    def summary(self) -> dict[str, float]:
        """Headline figures (bytes, rounds, saving vs the naive plan)."""
        naive = self.naive_bytes
        return {"naive_bytes": naive, "bytes_moved": self.bytes_moved,
                "bytes_inter_node": self.bytes_inter_node,
                "local_copy_bytes": self.local_copy_bytes,
                "saving": 1.0 - self.bytes_moved / naive if naive else 0.0,
                "transfers": float(len(self.transfers)), "rounds": float(self.num_rounds),
                "max_layer_bytes": float(self.layer_bytes().max())}
