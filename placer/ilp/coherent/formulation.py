"""The MIP of context-coherent placement (no replicas), one description for CP-SAT, CBC and HiGHS.

Variables: ``x[l, e, g]`` = 1 when expert e of layer l sits on GPU g; ``y[l, i, j]`` = 1 only
if expert i of layer l and expert j of layer l+1 share a GPU; ``z[l]`` >= the largest GPU load
of layer l. Minimise ``B * sum_l z[l] - A * sum T[l, i, j] * y[l, i, j]``, which is ``J`` less
the constant ``A * sum T``. Built through :class:`placer.ilp.mip.MipModel`: CP-SAT gets the
data rounded to integers (the caller drops the bound and the proof when that rounding changed
them), binary ``y`` and an integer ``z``; PuLP gets the data as they are, ``y`` continuous in
[0, 1] (at integer x it is 1 only when i and j share a GPU) and a continuous ``z``. The start
is a CP-SAT hint and CBC's MIP start; PuLP's HiGHS interface takes none, so HiGHS runs cold.
The b-matching equalities and the symmetry breaking are cuts (:meth:`MipModel.add`): in place
for CP-SAT, after the other rows for PuLP.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from placer.ilp._pulp import check_backend
from placer.ilp.coherent.objective import CoherentObjective, _load_floor
from placer.ilp.exact import coherent_cost
from placer.ilp.mip import MipModel

__all__ = ["MAX_MIP_SIZE", "solve_mip"]

MAX_MIP_SIZE = 100_000
"""Largest (L-1) * E^2 * G (the linking constraints) the CP-SAT and PuLP models are built for."""


def _sym_relabel(obj: CoherentObjective, gpu: np.ndarray) -> np.ndarray:
    """Relabel GPUs (same permutation in every layer) so that layer 0's GPUs are ordered by
    their smallest expert, the form the symmetry-breaking constraints admit."""
    first = np.array([np.flatnonzero(gpu[0] == g).min() for g in range(obj.num_gpus)])
    new_label = np.empty(obj.num_gpus, dtype=np.int64)
    new_label[np.argsort(first, kind="stable")] = np.arange(obj.num_gpus)
    return new_label[gpu]


def solve_mip(obj: CoherentObjective, hint: np.ndarray | None = None, *, backend: str = "cpsat",
              time_limit_s: float | None = None, deterministic_time: float | None = None,
              num_workers: int = 1, seed: int = 0, log: bool = False) -> dict[str, Any]:
    """Solve the MIP of ``obj`` (see the module docstring) with ``backend``.

    ``backend``: "cpsat", "pulp-cbc" or "pulp-highs". ``hint``: int [L, E] GPU of every expert
    (the start) or None. ``deterministic_time`` and ``seed`` go to CP-SAT; ``num_workers`` is
    CP-SAT's worker count and the MIP solvers' thread count. Returns ``{"gpu": int64 [L, E] or
    None, "status", "objective" (J), "bound" (J, as the solver reported it)}``.
    """
    if backend.startswith("pulp-"):
        check_backend(backend.removeprefix("pulp-"))
    model = MipModel(backend, "coherent", numbered=False)

    # --- data ---
    num_layers, num_experts, num_gpus = obj.num_layers, obj.num_experts, obj.num_gpus
    layers, experts, gpus = range(num_layers), range(num_experts), range(num_gpus)
    t, load = obj.transitions, obj.load
    if model.integral:  # CP-SAT takes integer coefficients only
        t, load = np.round(t).astype(np.int64), np.round(load).astype(np.int64)
    caps = obj.capacities
    cap: list[float] = []  # the per-layer cap on the largest GPU load (rounded down for CP-SAT)
    if obj.has_cap:
        cap = [int(np.floor(c + 1e-9)) if model.integral else float(c) for c in obj.cap_load]
    # z's domain starts at the load floor (valid for every placement; tightens the relaxation);
    # CP-SAT needs a finite domain too: at most the layer's whole load.
    floor = _load_floor(obj)
    z_low = np.ceil(floor - 1e-9) if model.integral else floor
    z_high = load.sum(axis=1) if model.integral else None

    # --- variables ---
    # x[l, e, g] = 1 when expert e of layer l sits on GPU g.
    x = {(layer, e, g): model.bool_var(f"x_{layer}_{e}_{g}") for layer in layers for e in experts for g in gpus}
    # y[l, i, j] = 1 only if expert i of layer l and expert j of layer l+1 share a GPU (tokens
    # i -> j then stay put); maximised, so it is 1 exactly when they do. Every (i, j) pair gets
    # a y, so the row and column sums below can be equalities.
    y = {(layer, i, j): model.aux_var(1, f"y_{layer}_{i}_{j}")
         for layer in range(num_layers - 1) for i in experts for j in experts}
    # z[l] >= the largest GPU load of layer l (tight at the optimum when balance is weighted).
    use_z = obj.bal_int > 0 or obj.has_cap
    z = {layer: model.num_var(float(z_low[layer]), None if z_high is None else float(z_high[layer]),
                              f"z_{layer}") for layer in layers} if use_z else {}

    # --- constraints ---
    for layer in layers:
        for e in experts:
            # Every expert sits on exactly one GPU.
            model.exactly_one([x[layer, e, g] for g in gpus])
        for g in gpus:
            column = [x[layer, e, g] for e in experts]
            # Every GPU holds its number of experts (equal slots per GPU).
            model.add(model.dot([1] * num_experts, column) == caps[g])
            if use_z:
                # z[l] is at least every GPU's load.
                model.add(z[layer] >= model.dot(load[layer], column))
        if use_z and obj.has_cap:
            # The per-layer cap on the largest GPU load.
            model.add(z[layer] <= cap[layer])
    for layer in range(num_layers - 1):
        for i in experts:
            for j in experts:
                for g in gpus:
                    # Sharing needs j on i's GPU: y => (i on g => j on g).
                    model.implies(y[layer, i, j], x[layer, i, g], x[layer + 1, j, g])
        if obj.equal:
            for i in experts:
                # Expert i of layer l shares its GPU with exactly E/G experts of layer l+1, and
                # expert i of layer l+1 with exactly E/G of layer l (makes y exact; strong cut).
                model.add(model.dot([1] * num_experts, [y[layer, i, j] for j in experts]) == caps[0], cut=True)
                model.add(model.dot([1] * num_experts, [y[layer, j, i] for j in experts]) == caps[0], cut=True)
    if obj.equal:
        # Symmetry breaking (GPU labels are interchangeable): in layer 0, expert e may sit on
        # GPU g >= 1 only if a smaller expert sits on GPU g - 1 (GPUs ordered by smallest expert).
        for e in experts:
            for g in range(1, num_gpus):
                if e < g:
                    model.add(x[0, e, g] == 0, cut=True)
                else:
                    model.add(x[0, e, g] <= model.dot([1] * e, [x[0, k, g - 1] for k in range(e)]), cut=True)

    # --- objective: minimise B * sum z - A * (same-GPU transitions); J = that + A * total ---
    terms = [(obj.bal_int, v) for v in z.values()] if obj.bal_int else []
    if obj.aff_int:
        terms += [(-obj.aff_int * t[k], v) for k, v in y.items() if t[k] > 0]
    model.minimize(model.dot([c for c, _ in terms], [v for _, v in terms]))
    offset = obj.aff_int * float(t.sum())

    # --- start: the hint, relabelled into the symmetry-broken form ---
    if hint is not None:
        h = _sym_relabel(obj, hint) if obj.equal else hint
        for (layer, e, g), v in x.items():
            model.hint(v, int(h[layer, e] == g))
        for (layer, i, j), v in y.items():
            model.hint(v, int(h[layer, i] == h[layer + 1, j]))
        if use_z:
            ml = coherent_cost(h, None, load, num_gpus)[1]
            for layer, v in z.items():
                model.hint(v, float(ml[layer]))

    # --- solve, triage, read back ---
    out = model.solve(time_limit_s=time_limit_s, deterministic_time=deterministic_time,
                      num_workers=num_workers, seed=seed, warm_start=hint is not None, log=log)
    gpu = None
    if out.level is not None:
        val = np.array([[[out.level(x[layer, e, g]) for g in gpus] for e in experts] for layer in layers])
        gpu = val.argmax(axis=2).astype(np.int64)
        if np.any(np.abs(val.max(axis=2) - 1.0) > 1e-6):
            gpu = None  # a fractional x: no placement to read
    status = out.status if gpu is not None or out.status in ("infeasible", "unknown") else "unknown"
    return {"gpu": gpu, "status": status,
            "objective": None if out.objective is None else out.objective + offset,
            "bound": None if out.solver_bound is None else out.solver_bound + offset}
