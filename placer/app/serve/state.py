"""The service's memory: an exponentially decayed window of routing, and the state file.

Window
    Every observation (a posted load matrix, a dump file) is normalised per MoE layer to
    fractions of that layer's token-slots, so each observation weighs the same whatever its
    token count; the window keeps ``W <- d * W + x`` with ``d = 0.5 ** (1 / half_life)``: an
    observation ``half_life`` observations old weighs half as much as the newest. Per layer a
    weight ``w <- d * w + [layer has load]`` is kept alongside, so the window's estimate is
    ``W / w`` (uniform for a layer no observation has loaded). Top-1 transitions ``[L-1, E, E]``
    are windowed the same way (per layer pair) when observations carry them.

State file
    JSON (any suffix but ``.npz``) or npz: the window, the current published placement, the
    counters, the dump files already read and the last decision. Written atomically
    (:mod:`placer.io.atomic`); a service restarted on the same file resumes from it.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from placer.errors import InvalidInputError
from placer.io.atomic import atomic_path, atomic_write_text
from placer.io.common import load_arrays
from placer.types import ModelSpec, Placement, RoutingStats, Topology
from placer.validate import check_placement

STATE_KIND = "placer-serve-state"
STATE_VERSION = 1
NOMINAL_TOKENS = 100_000
"""Tokens the window's statistics are scaled to (only proportions matter to solvers and the simulator)."""
COUNTERS = ("observations_total", "bad_inputs_total", "placements_published_total", "evaluations_total")


@dataclass(frozen=True)
class Observation:
    """One load measurement: ``load`` float64 [L, E] token-slots, optional ``top1`` [L-1, E, E]."""

    load: np.ndarray
    source: str
    num_tokens: float | None = None
    top1: np.ndarray | None = None


MAX_POSTED_COUNT = 1e15
"""Largest count one posted entry may hold (larger values are refused: their sums overflow)."""


def _matrix(value: Any, shape: tuple[int, ...], name: str, source: str,
            limit: float | None = None) -> np.ndarray:
    """A finite, non-negative float64 array of exactly ``shape`` (one clear error otherwise).

    ``limit``: the largest value an entry may hold.
    """
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):  # ragged nesting
        arr = np.asarray(None)
    if arr.dtype.kind not in "iuf" or arr.ndim != len(shape):
        raise InvalidInputError(f"{name} must be a nested list of numbers of shape {list(shape)}"
                                + (" (MoE layers x experts)" if name == "load" else ""), source=source)
    arr = arr.astype(np.float64)
    if arr.shape != shape:
        raise InvalidInputError(f"{name} has shape {list(arr.shape)}, expected {list(shape)}"
                                + (" (MoE layers x experts)" if name == "load" else ""),
                                source=source)
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{name} contains NaN or infinite values", source=source)
    if arr.size and arr.min() < 0:
        raise InvalidInputError(f"{name} contains negative values (min {arr.min():g})", source=source)
    if limit is not None and arr.size and arr.max() > limit:
        raise InvalidInputError(f"{name} holds {arr.max():g}, above the largest count accepted ({limit:g})",
                                source=source)
    return arr


def parse_observation(payload: Any, model: ModelSpec, source: str = "POST /stats") -> Observation:
    """Validate a posted body ``{"load": [[...]], "num_tokens"?, "top1_transitions"?}``."""
    if not isinstance(payload, dict):
        raise InvalidInputError("body must be a JSON object with a 'load' key", source=source)
    unknown = sorted(set(payload) - {"load", "num_tokens", "top1_transitions"})
    if unknown:
        raise InvalidInputError(f"unknown key(s) {', '.join(unknown)}; expected load, num_tokens, "
                                "top1_transitions", source=source)
    if "load" not in payload:
        raise InvalidInputError("body lacks 'load' (a [layers, experts] matrix)", source=source)
    num_layers, e = model.num_moe_layers, model.num_experts
    load = _matrix(payload["load"], (num_layers, e), "load", source, MAX_POSTED_COUNT)
    if not load.any():
        raise InvalidInputError("load is all zero", source=source)
    tokens = payload.get("num_tokens")
    if tokens is not None:
        if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not math.isfinite(tokens) \
                or tokens < 0 or tokens > MAX_POSTED_COUNT:
            raise InvalidInputError(f"num_tokens must be a non-negative number up to {MAX_POSTED_COUNT:g}, "
                                    f"got {tokens!r}", source=source)
        tokens = float(tokens)
    top1 = payload.get("top1_transitions")
    if top1 is not None:
        if num_layers < 2:
            raise InvalidInputError("top1_transitions need at least two MoE layers", source=source)
        top1 = _matrix(top1, (num_layers - 1, e, e), "top1_transitions", source, MAX_POSTED_COUNT)
    return Observation(load=load, source=source, num_tokens=tokens, top1=top1)


def observation_from_stats(stats: RoutingStats, source: str) -> Observation:
    top1 = None if stats.top1_transitions is None else np.asarray(stats.top1_transitions, np.float64)
    return Observation(load=np.asarray(stats.load, np.float64), source=source,
                       num_tokens=float(stats.num_tokens), top1=top1)


def _normalise(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each leading-axis slice divided by its sum; returns (fractions, 1.0 where the slice had load)."""
    axes = tuple(range(1, arr.ndim))
    total = arr.sum(axis=axes)
    has = total > 0
    shape = (-1,) + (1,) * (arr.ndim - 1)
    frac = np.divide(arr, np.where(has, total, 1.0).reshape(shape))
    return np.where(has.reshape(shape), frac, 0.0), has.astype(np.float64)


class Window:
    """Exponentially decayed load (and top-1 transitions) over observations."""

    def __init__(self, num_layers: int, num_experts: int, half_life: float):
        if not half_life > 0 or not math.isfinite(half_life):
            raise InvalidInputError(f"must be a positive number of observations, got {half_life}",
                                    source="--half-life")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.half_life = float(half_life)
        self.decay = 0.5 ** (1.0 / self.half_life)
        self.load = np.zeros((num_layers, num_experts))
        self.load_weight = np.zeros(num_layers)
        self.top1: np.ndarray | None = None
        self.top1_weight: np.ndarray | None = None
        self.tokens = 0.0
        self.count = 0

    def add(self, obs: Observation) -> None:
        if obs.load.shape != self.load.shape:
            raise InvalidInputError(f"load has shape {list(obs.load.shape)}, the window "
                                    f"{list(self.load.shape)}", source=obs.source)
        d = self.decay
        frac, has = _normalise(obs.load)
        self.load = d * self.load + frac
        self.load_weight = d * self.load_weight + has
        if self.top1 is not None:
            self.top1 *= d
            self.top1_weight *= d
        if obs.top1 is not None and self.num_layers > 1:
            if self.top1 is None:
                e = self.num_experts
                self.top1 = np.zeros((self.num_layers - 1, e, e))
                self.top1_weight = np.zeros(self.num_layers - 1)
            t_frac, t_has = _normalise(obs.top1)
            self.top1 += t_frac
            self.top1_weight += t_has
        self.tokens = d * self.tokens + (obs.num_tokens or 0.0)
        self.count += 1

    def fractions(self) -> np.ndarray:
        """The window's share of token-slots per expert, rows summing to 1. Shape: [L, E]."""
        uniform = np.full_like(self.load, 1.0 / self.num_experts)
        w = self.load_weight[:, None]
        return np.where(w > 0, self.load / np.where(w > 0, w, 1.0), uniform)

    def stats(self, model: ModelSpec) -> RoutingStats:
        """The window as statistics of ``NOMINAL_TOKENS`` tokens (load, and top-1 transitions if known)."""
        load = self.fractions() * model.top_k * NOMINAL_TOKENS
        top1 = None
        if self.top1 is not None and self.top1_weight is not None and np.all(self.top1_weight > 0):
            top1 = np.rint(self.top1 / self.top1_weight[:, None, None] * NOMINAL_TOKENS).astype(np.int64)
        return RoutingStats(load=load, num_tokens=NOMINAL_TOKENS, top_k=model.top_k, top1_transitions=top1,
                            model=model)

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, Any] = {"window_load": self.load, "window_load_weight": self.load_weight}
        if self.top1 is not None:
            out["window_top1"] = self.top1
            out["window_top1_weight"] = self.top1_weight
        return out

    def restore(self, arrays: dict[str, Any], tokens: float, count: int, source: str) -> None:
        e, num_layers = self.num_experts, self.num_layers
        self.load = _matrix(arrays["window_load"], (num_layers, e), "window load", source)
        self.load_weight = _matrix(arrays["window_load_weight"], (num_layers,), "window weight", source)
        if arrays.get("window_top1") is not None:
            self.top1 = _matrix(arrays["window_top1"], (num_layers - 1, e, e), "window top1", source)
            self.top1_weight = _matrix(arrays["window_top1_weight"], (num_layers - 1,), "window top1 weight",
                                       source)
        self.tokens, self.count = float(tokens), int(count)


@dataclass
class ServiceState:
    """Everything the service persists."""

    window: Window
    placement: Placement
    placement_method: str
    counters: dict[str, int] = field(default_factory=lambda: {k: 0 for k in COUNTERS})
    seen: dict[str, list[int]] = field(default_factory=dict)
    last_decision: dict[str, Any] | None = None


def _identity(model: ModelSpec, topology: Topology, placement: Placement | None) -> dict[str, Any]:
    return {"model": model.name, "moe_layers": model.num_moe_layers, "experts": model.num_experts,
            "top_k": model.top_k, "gpus": topology.num_gpus, "gpus_per_node": topology.gpus_per_node,
            "slots": None if placement is None else placement.num_slots}


def save_state(path: str | os.PathLike[str], state: ServiceState, model: ModelSpec, topology: Topology) -> None:
    """Write the state atomically: npz when ``path`` ends in ``.npz``, else JSON."""
    meta = {"kind": STATE_KIND, "version": STATE_VERSION,
            "identity": _identity(model, topology, state.placement),
            "half_life": state.window.half_life, "window_tokens": state.window.tokens,
            "window_count": state.window.count, "slots_per_gpu": state.placement.slots_per_gpu,
            "placement_method": state.placement_method, "counters": dict(state.counters),
            "seen": state.seen, "last_decision": state.last_decision}
    arrays: dict[str, Any] = dict(state.window.arrays(), physical_to_logical=state.placement.physical_to_logical)
    if str(path).endswith(".npz"):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        return
    doc = dict(meta, arrays={k: v.tolist() for k, v in arrays.items()})
    atomic_write_text(path, json.dumps(doc, separators=(",", ":")) + "\n")


def _read(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        if path.endswith(".npz"):
            with load_arrays(path) as z:
                arrays = {k: z[k] for k in z.files if k != "meta"}
                meta = json.loads(str(z["meta"])) if "meta" in z.files else None
        else:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            meta = doc if isinstance(doc, dict) else None
            arrays = doc.get("arrays", {}) if isinstance(doc, dict) else {}
    except RecursionError:
        raise InvalidInputError("cannot read the state file (JSON nested too deeply); repair or delete it",
                                source=path) from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(f"cannot read the state file ({type(exc).__name__}: {exc}); repair or "
                                "delete it", source=path) from None
    if not isinstance(meta, dict) or meta.get("kind") != STATE_KIND:
        raise InvalidInputError("not a placer serve state file", source=path)
    if meta.get("version") != STATE_VERSION:
        raise InvalidInputError(f"unsupported state version {meta.get('version')!r}", source=path)
    return meta, arrays


def load_state(path: str | os.PathLike[str], model: ModelSpec, topology: Topology,
               half_life: float) -> ServiceState | None:
    """The state in ``path`` (None when the file does not exist), checked against model and cluster."""
    path = str(path)
    if not Path(path).exists():
        return None
    meta, arrays = _read(path)
    try:
        got = meta["identity"]
        p2l = np.asarray(arrays["physical_to_logical"])
        want = _identity(model, topology, None)
        if not isinstance(got, dict) or any(got.get(k) != v for k, v in want.items() if k != "slots"):
            # Before the placement is built: another model's map would fail with a shape error instead.
            want["slots"] = None
        else:
            placement = Placement(p2l, int(meta["slots_per_gpu"]), model.num_experts)
            want = _identity(model, topology, placement)
        if got != want:
            got = got if isinstance(got, dict) else {}
            raise InvalidInputError(f"the state file was written for {got.get('model')} "
                                    f"({got.get('moe_layers')} MoE layers, E={got.get('experts')}, "
                                    f"top_k={got.get('top_k')}) on {got.get('gpus')} GPUs "
                                    f"with {got.get('slots')} slots per layer, not {want['model']} "
                                    f"({want['moe_layers']} MoE layers, E={want['experts']}, top_k={want['top_k']}) "
                                    f"on {want['gpus']} GPUs; pass another --state", source=path)
        check_placement(placement, model, topology)
        window = Window(model.num_moe_layers, model.num_experts, half_life)
        window.restore(arrays, meta["window_tokens"], meta["window_count"], path)
        counters = {k: int(meta["counters"].get(k, 0)) for k in COUNTERS}
        seen = {str(k): [int(x) for x in v] for k, v in meta["seen"].items()}
        return ServiceState(window, placement, str(meta["placement_method"]), counters, seen,
                            meta.get("last_decision"))
    except InvalidInputError as exc:
        if exc.source == path:
            raise
        raise InvalidInputError(str(exc), source=path) from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidInputError(f"state file is incomplete or corrupt ({type(exc).__name__}: {exc}); repair "
                                "or delete it", source=path) from None
