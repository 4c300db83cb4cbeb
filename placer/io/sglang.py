"""Readers of SGLang's expert-distribution recorder dumps (.pt) and its legacy CSV.

``.pt`` files are loaded only with ``torch.load(path, weights_only=True, map_location="cpu")``
(tensors and plain containers; nothing else is unpickled). torch is imported lazily.

* ``sglang-stat``: ``{"logical_count": int [steps, layers, E] | [layers, E], ...}``, already
  summed over ranks; summed over steps here. Counts only.
* ``sglang-per-pass``: one file per rank, ``{"records": [{"forward_pass_id", "rank",
  "gatherer_key", "global_physical_count": [layers, P]}], "last_physical_to_logical_map":
  [layers, P]}``. Physical counts are scatter-added onto logical ids. Counts only; rank files
  are merged by the caller (:func:`~placer.stats.merge_stats`).
* ``sglang-per-token``: records with ``topk_ids_of_layer`` int [layers, tokens, 8] of PHYSICAL
  ids, -1 in unused columns, mapped to logical ids through ``last_physical_to_logical_map``.
  As written by SGLang 0.5.23 (``_DetailSinglePassGatherer.collect`` + ``_DetailAccumulator``)
  each record also holds ``input_ids``, ``positions``, ``extend_seq_lens``, ``forward_mode``,
  ``misc_objects`` and ``global_physical_count`` [layers, P] (the same ids counted); the
  ``topk_ids_of_layer`` key is what tells it from a per_pass dump.
* ``sglang-csv``: legacy ``layer_id,expert_id,count`` rows (one file per rank).

``layers`` is the model's ``num_hidden_layers`` (dense layers included): rows are cut to
``model.moe_layer_ids``; a row count equal to the MoE layer count is kept as is.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import numpy as np

from placer.io.common import (
    check_load,
    check_memory,
    check_shape,
    fail,
    guard,
    int_array,
    make_trace,
    moe_rows,
    require_file,
    to_numpy,
)
from placer.stats import load_only_stats
from placer.types import ModelSpec, RoutingStats, RoutingTrace

PT_FORMATS = ("sglang-stat", "sglang-per-pass", "sglang-per-token")

# SGLang's ForwardMode is an IntEnum built with auto(): EXTEND = 1, DECODE = 2, MIXED = 3,
# IDLE = 4, then speculative-decoding modes (python/sglang/srt/model_executor/forward_batch_info.py
# in current versions). EXTEND is prefill; MIXED batches hold both, so they and every other
# mode are marked unknown (-1). Older releases may number them differently.
_FORWARD_MODE_PHASE = {1: 0, 2: 1}


def pt_kind(path: str | os.PathLike[str], obj: Any) -> str | None:
    """Which SGLang dump a loaded ``.pt`` object is, or None."""
    if not isinstance(obj, dict):
        return None
    if "logical_count" in obj:
        return "sglang-stat"
    records = obj.get("records")
    if isinstance(records, list) and "last_physical_to_logical_map" in obj:
        first = next((r for r in records if isinstance(r, dict)), None)
        # per_token records hold global_physical_count too (SGLang 0.5.23's
        # _DetailSinglePassGatherer.collect), so the per-token key decides first.
        if first is not None and "topk_ids_of_layer" in first:
            return "sglang-per-token"
        if first is None or "global_physical_count" in first:
            return "sglang-per-pass"
    return None


def _stats(path: str | os.PathLike[str], load: np.ndarray, model: ModelSpec | None) -> RoutingStats:
    load = check_load(path, moe_rows(path, load, 0, model))
    check_shape(path, model, load.shape[0], load.shape[1], None)
    # top-k is unknown without a model: counts are then taken per token-slot (top_k 1).
    return load_only_stats(load, model.top_k if model is not None else 1, model=model)


def read_sglang_stat(path: str | os.PathLike[str], obj: dict[str, Any], model: ModelSpec | None) -> RoutingStats:
    """Counts of a ``stat`` dump. ``logical_count`` int [steps, layers, E] or [layers, E]."""
    with guard(path, "SGLang stat dump"):
        count = to_numpy(path, obj["logical_count"], "logical_count")
        if count.ndim == 3:
            count = count.astype(np.int64).sum(axis=0)
        elif count.ndim != 2:
            raise fail(path, f"logical_count has shape {list(count.shape)}, expected [steps, layers, E] "
                             "or [layers, E]")
        return _stats(path, count, model)


def _p2l(path: str | os.PathLike[str], obj: dict[str, Any], model: ModelSpec | None) -> tuple[np.ndarray, int]:
    p2l = int_array(path, obj["last_physical_to_logical_map"], "last_physical_to_logical_map", 2)
    if p2l.size == 0:
        raise fail(path, "last_physical_to_logical_map is empty")
    e = model.num_experts if model is not None else int(p2l.max()) + 1
    if p2l.min() < 0 or p2l.max() >= e:
        bad = int(p2l.min()) if p2l.min() < 0 else int(p2l.max())
        raise fail(path, f"last_physical_to_logical_map holds logical id {bad} outside [0, {e})")
    _check_load_size(path, p2l.shape[0], e, model)
    return p2l, e


_LOAD_COPIES = 4
"""Copies of a [layers, E] load matrix alive at once while it is read and checked."""


def _check_load_size(path: str | os.PathLike[str], num_rows: int, e: int, model: ModelSpec | None) -> None:
    """Refuse a load matrix sized by a huge expert id (no model) before it is allocated."""
    if model is None:
        check_memory(path, _LOAD_COPIES * 8.0 * num_rows * e,
                     f"expert id {e - 1} means a [{num_rows}, {e}] load matrix: reading it needs about")


def read_sglang_per_pass(path: str | os.PathLike[str], obj: dict[str, Any], model: ModelSpec | None) -> RoutingStats:
    """Logical counts of a ``per_pass`` dump (one rank's file).

    Only records with ``gatherer_key == "primary"`` are summed when any has that key (other
    gatherers may see the same tokens again); otherwise all records.
    """
    with guard(path, "SGLang per_pass dump"):
        p2l, e = _p2l(path, obj, model)
        records = [r for r in obj["records"] if isinstance(r, dict)]
        if len(records) != len(obj["records"]):
            raise fail(path, "records must be a list of dicts")
        if any(r.get("gatherer_key") == "primary" for r in records):
            records = [r for r in records if r.get("gatherer_key") == "primary"]
        physical = np.zeros(p2l.shape, dtype=np.int64)
        for i, r in enumerate(records):
            c = int_array(path, r["global_physical_count"], f"record {i} global_physical_count", 2)
            if c.shape != p2l.shape:
                raise fail(path, f"record {i} global_physical_count has shape {list(c.shape)}, the map "
                                 f"{list(p2l.shape)}")
            physical += c
        if physical.size and physical.min() < 0:
            raise fail(path, "global_physical_count has negative counts")
        num_layers = p2l.shape[0]
        load = np.zeros((num_layers, e), dtype=np.int64)
        np.add.at(load, (np.repeat(np.arange(num_layers), p2l.shape[1]), p2l.ravel()), physical.ravel())
        return _stats(path, load, model)


def read_sglang_per_token(path: str | os.PathLike[str], obj: dict[str, Any], model: ModelSpec | None) -> RoutingTrace:
    """Per-token trace of a ``per_token`` dump (logical ids, order "sorted").

    Dense layers are dropped through ``model.moe_layer_ids``; without a model, layers whose ids
    are -1 for every token are taken as dense and dropped. Tokens with -1 at every MoE layer
    (padding) are dropped. The real top-k is the number of leading non -1 columns and must be
    the same everywhere. ``phase`` comes from ``forward_mode`` (see ``_FORWARD_MODE_PHASE``).
    """
    with guard(path, "SGLang per_token dump"):
        p2l, e = _p2l(path, obj, model)
        parts, phases = [], []
        for i, r in enumerate(obj["records"]):
            if not isinstance(r, dict):
                raise fail(path, "records must be a list of dicts")
            ids = int_array(path, r["topk_ids_of_layer"], f"record {i} topk_ids_of_layer", 3)
            if ids.shape[0] != p2l.shape[0]:
                raise fail(path, f"record {i} has {ids.shape[0]} layers, the map {p2l.shape[0]}")
            parts.append(ids.transpose(1, 0, 2))  # [tokens, layers, 8]
            mode = r.get("forward_mode")
            code = _FORWARD_MODE_PHASE.get(int(mode), -1) if mode is not None else -1
            phases.append(np.full(ids.shape[1], code, dtype=np.int8))
        if not parts:
            raise fail(path, "per_token dump has no records")
        phys = np.concatenate(parts)
        phase = np.concatenate(phases)
        if phys.size and (phys.min() < -1 or phys.max() >= p2l.shape[1]):
            bad = int(phys.min()) if phys.min() < -1 else int(phys.max())
            raise fail(path, f"physical expert id {bad} outside [0, {p2l.shape[1]})")
        if model is not None:
            keep_layers = moe_rows(path, np.arange(phys.shape[1]), 0, model)
        else:
            keep_layers = np.flatnonzero((phys >= 0).any(axis=(0, 2)))
            if keep_layers.size == 0:
                raise fail(path, "per_token dump holds no expert ids (all -1)")
        phys = phys[:, keep_layers]
        layer_maps = p2l[keep_layers]  # [L, P]
        valid = phys >= 0
        tokens = valid.any(axis=(1, 2))
        phys, valid, phase = phys[tokens], valid[tokens], phase[tokens]
        per_row = valid.sum(axis=2)
        k = int(per_row.max()) if per_row.size else 0
        if per_row.size and (per_row.min() != k or not valid[:, :, :k].all()):
            raise fail(path, "the number of non -1 expert ids differs between tokens or layers "
                             f"({int(per_row.min())} to {k}); cannot tell top-k")
        if k == 0:
            raise fail(path, "per_token dump holds no expert ids")
        phys = phys[:, :, :k]
        logical = layer_maps[np.arange(len(keep_layers))[None, :, None], phys]
        return make_trace(path, logical, model, num_experts=e, phase=phase)


def read_sglang_csv(path: str | os.PathLike[str], model: ModelSpec | None) -> RoutingStats:
    """Counts of a legacy ``layer_id,expert_id,count`` CSV.

    ``layer_id`` is the absolute hidden-layer index: with a model the matrix has
    ``num_hidden_layers`` rows, cut to the MoE layers (dense rows must hold no counts).
    Without a model rows run 0..max layer id. Repeated (layer, expert) rows are summed.
    """
    require_file(path)
    with guard(path, "SGLang CSV"), open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
        rows = [r for r in rows if any(c.strip() for c in r)]
        if not rows or [c.strip() for c in rows[0]] != ["layer_id", "expert_id", "count"]:
            raise fail(path, "expected the header 'layer_id,expert_id,count'")
        data = []
        for n, r in enumerate(rows[1:], start=2):
            if len(r) != 3:
                raise fail(path, f"line {n}: expected 3 values, got {len(r)}")
            try:
                layer, expert, count = int(r[0]), int(r[1]), float(r[2])
            except ValueError:
                raise fail(path, f"line {n}: non-numeric value in {','.join(r)!r}") from None
            if not np.isfinite(count) or count < 0:
                raise fail(path, f"line {n}: count must be a non-negative number, got {r[2].strip()}")
            if layer < 0 or expert < 0:
                raise fail(path, f"line {n}: negative layer or expert id")
            data.append((layer, expert, count))
        if not data:
            raise fail(path, "holds no counts")
        arr = np.asarray(data, dtype=np.float64)
        layers, experts, counts = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2]
        e = model.num_experts if model is not None else int(experts.max()) + 1
        if experts.max() >= e:
            raise fail(path, f"expert id {int(experts.max())} out of range [0, {e})"
                             + (f" for {model.name}" if model is not None else ""))
        num_rows = int(layers.max()) + 1
        _check_load_size(path, num_rows, e, model)
        if model is not None:
            if num_rows > model.num_hidden_layers:
                raise fail(path, f"layer id {num_rows - 1} out of range for {model.name} "
                                 f"({model.num_hidden_layers} hidden layers)")
            num_rows = model.num_hidden_layers
        load = np.zeros((num_rows, e), dtype=np.float64)
        np.add.at(load, (layers, experts), counts)
        if model is not None:
            dense = np.setdiff1d(np.arange(num_rows), np.asarray(model.moe_layer_ids))
            if dense.size and load[dense].any():
                raise fail(path, f"dense layer {int(dense[load[dense].any(axis=1)][0])} of {model.name} has counts")
        return _stats(path, load, model)
