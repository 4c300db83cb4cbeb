"""Swap-based local search for context-coherent placement, with its starts (see the package).

Best of three starts (contiguous, greedy affinity clustering, balanced packing with optimal GPU
relabelling), then best-improvement swaps of two experts of one layer between GPUs with
incremental deltas, alternated with an exact GPU relabelling (a chain of assignment problems
over the groups) and seeded perturbations. Placements are ``gpu`` int [L, E], the GPU of every
expert.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from placer.ilp.coherent.objective import CoherentObjective, _lpt_gpu
from placer.ilp.exact import assign_max

__all__ = ["LocalSearchInfo", "local_search", "relabel_gpus"]


def _onehot(gpu: np.ndarray, num_gpus: int) -> np.ndarray:
    out = np.zeros(gpu.shape + (num_gpus,))
    np.put_along_axis(out, gpu[..., None], 1.0, axis=-1)
    return out


def _contiguous_gpu(obj: CoherentObjective) -> np.ndarray:
    row = np.repeat(np.arange(obj.num_gpus), obj.capacities)
    return np.tile(row, (obj.num_layers, 1)).astype(np.int64)


def _greedy_gpu(obj: CoherentObjective) -> np.ndarray:
    """Layer 0 contiguous; each next layer's experts join the GPU most of their tokens come
    from (pairs (expert, GPU) by descending inflow, while the GPU has room)."""
    gpu = _contiguous_gpu(obj)
    cap = np.asarray(obj.capacities)
    for layer in range(obj.num_layers - 1):
        inflow = obj.transitions[layer].T @ _onehot(gpu[layer], obj.num_gpus)   # [E, G]
        order = np.argsort(-inflow, axis=None, kind="stable")
        count = np.zeros(obj.num_gpus, dtype=np.int64)
        done = np.zeros(obj.num_experts, dtype=bool)
        row = np.empty(obj.num_experts, dtype=np.int64)
        for flat in order:
            e, g = divmod(int(flat), obj.num_gpus)
            if done[e] or count[g] >= cap[g]:
                continue
            row[e], done[e] = g, True
            count[g] += 1
        gpu[layer + 1] = row
    return gpu


def relabel_gpus(obj: CoherentObjective, gpu: np.ndarray) -> np.ndarray:
    """Optimal GPU labels for the given per-layer groups (equal capacities only).

    Which GPU a layer's group gets does not change the load, and the transitions depend only on
    which group of layer l shares a label with which group of layer l+1: a bijection per layer
    pair, chosen by an assignment problem on the group-to-group transition counts (as in
    :func:`placer.ilp.exact.exact_one_per_gpu`). Never worse than ``gpu``.
    """
    if not obj.equal or obj.num_layers < 2:
        return gpu
    out = gpu.copy()
    oh = _onehot(gpu, obj.num_gpus)
    # Group-to-group transition counts of every layer pair, [L-1, G, G] (old labels).
    groups = np.swapaxes(oh[:-1], 1, 2) @ obj.transitions @ oh[1:]
    label = np.arange(obj.num_gpus)           # label[old group of layer l] -> new GPU
    for layer in range(obj.num_layers - 1):
        sigma = assign_max(groups[layer])      # group g of layer l shares a GPU with sigma[g]
        nxt = np.empty(obj.num_gpus, dtype=np.int64)
        nxt[sigma] = label
        out[layer + 1] = nxt[gpu[layer + 1]]
        label = nxt
    return out


class _State:
    """Incremental bookkeeping for swaps: GPU loads and per-expert transition counts by GPU."""

    def __init__(self, obj: CoherentObjective, gpu: np.ndarray, tol: float | None = None):
        self.obj = obj
        self.gpu = gpu.copy()
        if tol is None:
            # Improvements smaller than this are rounding noise (the data are usually integers).
            per_pair = obj.aff_int * float(obj.transitions.sum()) / max(obj.num_layers - 1, 1)
            tol = 1e-9 * max(1.0, per_pair + obj.bal_int * float(obj.load.sum()) / obj.num_layers)
        self.tol = tol
        self.rebuild()

    def copy(self) -> _State:
        new = object.__new__(_State)
        new.obj, new.tol = self.obj, self.tol
        new.gpu, new.gl, new.cin, new.cout = self.gpu.copy(), self.gl.copy(), self.cin.copy(), self.cout.copy()
        return new

    def rebuild(self) -> None:
        obj, g = self.obj, self.obj.num_gpus
        oh = _onehot(self.gpu, g)                                   # [L, E, G]
        num_layers, e = self.gpu.shape
        self.gl = np.einsum("leg,le->lg", oh, obj.load)             # [L, G]
        self.cin = np.zeros((num_layers, e, g))                     # tokens into (l, i) from GPU
        self.cout = np.zeros((num_layers, e, g))                    # tokens from (l, i) to GPU
        if num_layers > 1:
            self.cout[:-1] = np.einsum("lij,ljg->lig", obj.transitions, oh[1:])
            self.cin[1:] = np.einsum("lij,lig->ljg", obj.transitions, oh[:-1])

    def best_swap(self, layer: int) -> tuple[int, int] | None:
        """The best improving swap of layer ``layer`` by (cap violation, J), or None."""
        obj = self.obj
        g = self.gpu[layer]
        c = self.cin[layer] + self.cout[layer]                      # [E, G]
        m = c[:, g]                                                  # m[a, b] = C[a, gpu[b]]
        s = np.diag(m)
        gain = m + m.T - s[:, None] - s[None, :]                    # same-GPU transitions gained
        valid = g[:, None] != g[None, :]
        dj = -obj.aff_int * gain
        dviol = None
        if obj.bal_int or obj.has_cap:
            ld, gl = obj.load[layer], self.gl[layer]
            d = ld[None, :] - ld[:, None]                            # GPU of a gets b, loses a
            new_a = gl[g][:, None] + d
            new_b = gl[g][None, :] - d
            order = np.argsort(-gl, kind="stable")
            top = order[:3]
            # Max load over the GPUs other than g_a and g_b, from the three heaviest GPUs.
            other = np.full((obj.num_gpus, obj.num_gpus), 0.0)
            for k in range(len(top) - 1, -1, -1):
                keep = (np.arange(obj.num_gpus)[:, None] != top[k]) & (np.arange(obj.num_gpus)[None, :] != top[k])
                other = np.where(keep, gl[top[k]], other)
            new_max = np.maximum(np.maximum(new_a, new_b), other[g][:, g])
            cur = gl.max()
            dj = dj + obj.bal_int * (new_max - cur)
            if obj.has_cap:
                cap = obj.cap_load[layer]
                dviol = np.maximum(new_max - cap, 0.0) - max(cur - cap, 0.0)
        dj = np.where(valid, dj, np.inf)
        tol = self.tol
        if dviol is not None:
            dviol = np.where(valid, dviol, np.inf)
            lo = float(dviol.min())
            if lo < -tol:
                cand = np.where(dviol <= lo + tol, dj, np.inf)
                a, b = np.unravel_index(int(np.argmin(cand)), cand.shape)
                return int(a), int(b)
            dj = np.where(dviol <= tol, dj, np.inf)
        a, b = np.unravel_index(int(np.argmin(dj)), dj.shape)
        if dj[a, b] < -tol:
            return int(a), int(b)
        return None

    def swap(self, layer: int, a: int, b: int) -> None:
        obj, t = self.obj, self.obj.transitions
        ga, gb = int(self.gpu[layer, a]), int(self.gpu[layer, b])
        self.gpu[layer, a], self.gpu[layer, b] = gb, ga
        da = obj.load[layer, a] - obj.load[layer, b]
        self.gl[layer, ga] -= da
        self.gl[layer, gb] += da
        if layer > 0:
            diff = t[layer - 1][:, a] - t[layer - 1][:, b]           # tokens into a minus into b
            self.cout[layer - 1][:, ga] -= diff
            self.cout[layer - 1][:, gb] += diff
        if layer < obj.num_layers - 1:
            diff = t[layer][a] - t[layer][b]
            self.cin[layer + 1][:, ga] -= diff
            self.cin[layer + 1][:, gb] += diff


def _descend(state: _State, layers: list[int], deadline: float | None) -> int:
    """Best-improvement swaps until no layer improves (or the deadline). Returns the swap count."""
    queue = list(dict.fromkeys(layers))
    queued = set(queue)
    swaps = 0
    while queue:
        if deadline is not None and time.perf_counter() > deadline:
            break
        layer = queue.pop(0)
        queued.discard(layer)
        moved = False
        while True:
            pair = state.best_swap(layer)
            if pair is None:
                break
            state.swap(layer, *pair)
            swaps += 1
            moved = True
        if moved:
            for nb in (layer - 1, layer + 1):
                if 0 <= nb < state.obj.num_layers and nb not in queued:
                    queue.append(nb)
                    queued.add(nb)
    return swaps


@dataclass(frozen=True)
class LocalSearchInfo:
    start: str
    start_key: tuple[float, float]
    key: tuple[float, float]
    rounds: int
    swaps: int
    stopped_by_time: bool


def local_search(obj: CoherentObjective, start: np.ndarray | None = None, *, seed: int = 0,
                 max_rounds: int = 200, time_limit_s: float | None = None) -> tuple[np.ndarray, LocalSearchInfo]:
    """Swap-based local search on ``obj`` from ``start`` (default: the best of the contiguous,
    greedy-affinity and balanced-relabelled starts).

    ``start``: int [L, E] GPU of every expert. Each round: descend by best-improvement swaps
    (two experts of one layer exchange GPUs; deltas from the per-expert GPU transition counts),
    relabel GPUs optimally (:func:`relabel_gpus`), then perturb a random window of layers with
    random swaps and descend again, keeping the result only when it is better. Returns the best
    placement ``gpu [L, E]`` (never worse than the start by (cap violation, J)) and a summary.
    """
    deadline = None if time_limit_s is None else time.perf_counter() + float(time_limit_s)
    if start is None:
        starts = {"contiguous": _contiguous_gpu(obj), "greedy": _greedy_gpu(obj)}
        if obj.equal:
            starts["balanced"] = relabel_gpus(obj, _lpt_gpu(obj.load, obj.capacities))
        keys = {name: obj.key(g) for name, g in starts.items()}
        name = min(keys, key=lambda k: keys[k])
        start = starts[name]
    else:
        name = "given"
    start = np.asarray(start, dtype=np.int64)
    start_key = obj.key(start)
    rng = np.random.default_rng(seed)
    state = _State(obj, start)
    swaps = _descend(state, list(rng.permutation(obj.num_layers)), deadline)
    best, best_key = state, obj.key(state.gpu)
    relabel_due = True
    rounds = 0
    stopped = False
    for rounds in range(1, max_rounds + 1):  # noqa: B007 - rounds is reported
        if deadline is not None and time.perf_counter() > deadline:
            stopped = True
            break
        if relabel_due:  # optimal GPU labels for the current groups, then descend again
            relabel_due = False
            relabelled = relabel_gpus(obj, best.gpu)
            if obj.key(relabelled) < best_key:
                state = _State(obj, relabelled, best.tol)
                swaps += _descend(state, list(range(obj.num_layers)), deadline)
                key = obj.key(state.gpu)
                if key < best_key:
                    best, best_key = state, key
        # Perturb a window of layers with random swaps, then descend.
        state = best.copy()
        width = int(rng.integers(1, min(4, obj.num_layers) + 1))
        first = int(rng.integers(0, obj.num_layers - width + 1))
        window = list(range(first, first + width))
        for layer in window:
            for _ in range(max(1, obj.num_experts // 8)):
                a, b = rng.choice(obj.num_experts, size=2, replace=False)
                if state.gpu[layer, a] != state.gpu[layer, b]:
                    state.swap(layer, int(a), int(b))
        around = sorted({x for layer in window for x in (layer - 1, layer, layer + 1)
                         if 0 <= x < obj.num_layers})
        swaps += _descend(state, around, deadline)
        key = obj.key(state.gpu)
        if key < best_key:
            best, best_key = state, key
            relabel_due = True
    best_gpu = best.gpu.copy()
    if best_key > start_key:  # cannot happen: every accepted step improves
        best_gpu, best_key = start, start_key
    return best_gpu, LocalSearchInfo(start=name, start_key=start_key, key=best_key, rounds=rounds,
                                 swaps=swaps, stopped_by_time=stopped)

