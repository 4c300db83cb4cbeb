"""One copy of an expert per GPU: the repair that vllm-ascend's constraint needs.

vllm-ascend 0.23 keeps one local slot per expert on each device (``expert_map[local_placement]
= arange``): a second copy of an expert on the same device is never reached and shifts the
device's other slots, so tokens go to the wrong experts. Methods that may stack copies
(EPLB's greedy packing, a search's start) call :func:`separate_copies` when the problem sets
``distinct_per_gpu``.
"""

from __future__ import annotations

from typing import overload

import numpy as np

from placer.errors import InfeasibleError
from placer.types import Placement


@overload
def separate_copies(p2l: np.ndarray, slots_per_gpu: int, share: np.ndarray,
                    gpus_per_group: int | None = None, rank: None = None) -> tuple[np.ndarray, None]: ...
@overload
def separate_copies(p2l: np.ndarray, slots_per_gpu: int, share: np.ndarray, gpus_per_group: int | None,
                    rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
def separate_copies(p2l: np.ndarray, slots_per_gpu: int, share: np.ndarray,
                    gpus_per_group: int | None = None,
                    rank: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Swap slots until no GPU holds two copies of one expert; loads move as little as possible.

    Parameters
    ----------
    p2l : int [L, P]
        The map to repair (not modified); slot p lives on GPU ``p // slots_per_gpu``.
    slots_per_gpu : int
    share : float [L, E]
        Load each copy of an expert carries (its load over its copy count).
    gpus_per_group : int or None
        GPUs are taken in groups of this many (EPLB's nodes): a duplicate is swapped inside its
        group when the group allows it, else with any GPU.
    rank : int [L, P] or None
        Per-slot values that travel with the slots (EPLB's replica ranks).

    Returns
    -------
    (p2l, rank): int64 [L, P] (and ``rank`` permuted alike, or None): each duplicate copy traded with a slot of another GPU that holds neither
    expert, choosing the partner whose per-copy load is closest. Every swap removes one
    duplicate, so the loop ends; it raises :class:`InfeasibleError` only when an expert has more
    copies than there are GPUs (no placement can then separate them).
    """
    out = np.array(p2l, dtype=np.int64, copy=True)
    moved = None if rank is None else np.array(rank, dtype=np.int64, copy=True)
    num_layers, num_slots = out.shape
    num_gpus = num_slots // slots_per_gpu
    group = num_gpus if gpus_per_group is None else int(gpus_per_group)
    for layer in range(num_layers):
        held = out[layer].reshape(num_gpus, slots_per_gpu)  # views: swaps write through
        ranks = None if moved is None else moved[layer].reshape(num_gpus, slots_per_gpu)
        w = share[layer]
        while True:
            dup = _first_duplicate(held)
            if dup is None:
                break
            gpu, pos = dup
            expert = int(held[gpu, pos])
            mine = set(held[gpu].tolist())
            best = None
            for same_group in (True, False):
                for other in range(num_gpus):
                    if other == gpu or (other // group == gpu // group) != same_group:
                        continue
                    theirs = held[other].tolist()
                    if expert in theirs:
                        continue
                    for q, f in enumerate(theirs):
                        if f not in mine:
                            key = (abs(float(w[f]) - float(w[expert])), other, q)
                            if best is None or key < best[0]:
                                best = (key, other, q)
                if best is not None:
                    break
            if best is None:
                raise InfeasibleError(f"layer {layer}: expert {expert} has more copies than can sit on "
                                      f"distinct GPUs ({num_gpus})")
            _, other, q = best
            held[gpu, pos], held[other, q] = held[other, q], expert
            if ranks is not None:
                ranks[gpu, pos], ranks[other, q] = ranks[other, q], ranks[gpu, pos]
    return out, moved


def separate_by_load(p2l: np.ndarray, slots_per_gpu: int, load: np.ndarray) -> np.ndarray:
    """:func:`separate_copies` with each copy carrying its expert's ``load`` [L, E] over its copy count."""
    cnt = Placement(p2l, slots_per_gpu, load.shape[1]).logcnt()
    return separate_copies(p2l, slots_per_gpu, np.asarray(load, dtype=np.float64) / cnt)[0]


def _first_duplicate(held: np.ndarray) -> tuple[int, int] | None:
    """(GPU, local slot) of the first second copy of an expert on one GPU, or None."""
    for gpu, row in enumerate(held.tolist()):
        seen: set[int] = set()
        for pos, e in enumerate(row):
            if e in seen:
                return gpu, pos
            seen.add(e)
    return None
