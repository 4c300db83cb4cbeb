"""Readers of routing files other tools write: HD-MoE JSON, Megatron JSONL and plain load
matrices (CSV or npz); R3 routed experts are read by :mod:`placer.io.r3`.

Every per-token format here but one is taken as ``order="sorted"`` (column 0 the top-1
expert): its producer uses a sorted ``torch.topk``. Megatron JSONL written from the training
router's boolean ``routing_map`` lists experts in ascending id order instead; see
:func:`read_megatron_jsonl` for how such a file is told apart and read as ``order="unknown"``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from typing import Any, cast

import numpy as np

from placer.io.common import (
    check_load,
    check_shape,
    fail,
    guard,
    json_ids,
    load_arrays,
    make_trace,
    moe_rows,
    require_file,
)
from placer.stats import load_only_stats
from placer.types import ModelSpec, RoutingStats, RoutingTrace

LOAD_NPZ_KEYS = ("weight", "load")


# --------------------------------------------------------------------------------------------
# HD-MoE JSON
# --------------------------------------------------------------------------------------------


def read_hdmoe_json(path: str | os.PathLike[str], model: ModelSpec | None) -> RoutingTrace:
    """HD-MoE ``{"0": [[e1, e2], ...], "1": ...}``: keys are MoE-layer ordinals 0..L-1.

    Every layer must have the same token count; token i is the same token in every layer.
    E is the model's when given, else max id + 1.
    """
    require_file(path)
    with guard(path, "HD-MoE JSON"), open(path, encoding="utf-8") as f:
        text = f.read()
        data = json.loads(text)
        may_hold_bool = "true" in text or "false" in text
        if not isinstance(data, dict) or not data:
            raise fail(path, "expected a JSON object {layer: [[expert ids] per token]}")
        try:
            layers = sorted((int(k), k) for k in data)
        except ValueError:
            bad = next(k for k in data if not k.strip().lstrip("-").isdigit())
            raise fail(path, f"layer key {bad!r} is not an integer") from None
        ordinals = [n for n, _ in layers]
        if ordinals != list(range(len(ordinals))):
            missing = sorted(set(range(max(ordinals) + 1)) - set(ordinals))
            raise fail(path, f"layer keys must be 0..{len(ordinals) - 1}; "
                             + (f"layer {missing[0]} is missing" if missing else f"got {ordinals[0]}.."))
        per_layer: list[np.ndarray] = []
        for n, key in layers:
            value = data[key]
            if not isinstance(value, list):
                raise fail(path, f"layer {n}: expected a list of expert-id lists")
            arr = json_ids(path, value, f"layer {n}", may_hold_bool)
            if arr.ndim != 2:
                raise fail(path, f"layer {n}: expected [tokens, top_k] ids, got shape {list(arr.shape)}")
            if per_layer and arr.shape[0] != per_layer[0].shape[0]:
                raise fail(path, f"layer {n} has {arr.shape[0]} tokens, layer 0 has {per_layer[0].shape[0]}")
            if per_layer and arr.shape[1] != per_layer[0].shape[1]:
                raise fail(path, f"layer {n} has top-{arr.shape[1]}, layer 0 top-{per_layer[0].shape[1]}")
            per_layer.append(arr)
        ids = np.stack(per_layer, axis=1)
        check_shape(path, model, ids.shape[1], None, ids.shape[2])
        return make_trace(path, ids, model)


# --------------------------------------------------------------------------------------------
# Megatron router trace JSONL
# --------------------------------------------------------------------------------------------


MEGATRON_PROB_KEYS = ("top_probs", "probs")
"""Record keys read as gate probabilities, first found wins: a list shaped like
``top_indices`` ([num_tokens][topk]), entry ``[t][k]`` the gate probability of expert
``top_indices[t][k]``."""

MEGATRON_ASCENDING_NOTE = ("the trace lists experts in ascending id order (Megatron training router); "
                           "top-1 unknown")
"""Why a Megatron trace read as ``order="unknown"`` has no top-1 expert."""


def _ascending_rows(ids: np.ndarray) -> bool:
    """Whether every row of ``ids`` [tokens, K] is strictly ascending (vacuously true for 0 rows)."""
    return bool(np.all(ids[:, 1:] > ids[:, :-1]))


def read_megatron_jsonl(path: str | os.PathLike[str], model: ModelSpec | None) -> RoutingTrace:
    """Megatron ``router_trace_rank{r}.jsonl``: one record per (step, block, layer).

    Records are grouped by (rank, step, block, stage); each group stacks its layers into tokens
    [num_tokens, L, K] and groups follow each other in file order. ``layer`` is the absolute
    decoder-layer index: with a model it must be one of ``model.moe_layer_ids``, without one
    the sorted set of layers seen is the MoE layers. Every group needs every layer, with one
    token count. Records with ``mtp_idx`` (multi-token prediction) are skipped.

    **Expert order.** Megatron's training router (``TopKRouter``) returns a boolean
    ``routing_map`` [tokens, experts]; a trace taken as ``routing_map.nonzero()`` lists each
    token's experts in ascending expert id, not by gate score, so column 0 is not the top-1
    expert. An inference router's trace (``torch.topk`` indices) lists them by score. The rule:

    * top-k 1: ``order="sorted"`` (one expert per token: order cannot be wrong);
    * otherwise, when every row of every record read is strictly ascending, the file is a
      training-router trace: ``order="unknown"`` (loads and co-activation stay exact; the
      top-1 expert and the top-1 inter-layer transitions are unknown);
    * any row that is not ascending proves score order: ``order="sorted"``.

    The one ambiguity: a score-ordered trace whose rows all happen to be ascending is read as
    ``"unknown"`` (top-1 lost, never wrong). A random row is ascending with probability about
    1/K!, so with many tokens this has negligible probability; it can happen with a handful.

    **Gate probabilities.** A record may carry them under ``"top_probs"`` (or ``"probs"``; the
    first of :data:`MEGATRON_PROB_KEYS` present), shaped like ``top_indices``; they become
    ``gate_weights``, and then the top-1 expert is known whatever the id order: the order is
    ``"sorted"`` when every row's probabilities are non-increasing, else ``"unknown"`` with the
    top-1 taken from the probabilities. Either every record read carries them or none does.
    """
    require_file(path)
    groups: dict[tuple[Any, ...], dict[int, tuple[np.ndarray, np.ndarray | None]]] = {}
    ascending = True  # every row of every record read so far strictly ascending
    with_probs: bool | None = None  # whether the records carry probabilities (None: none read yet)
    with guard(path, "Megatron JSONL"), open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise fail(path, f"line {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise fail(path, f"line {n}: expected a JSON object")
            if "mtp_idx" in rec:
                continue
            missing = [k for k in ("step", "layer", "top_indices") if k not in rec]
            if missing:
                raise fail(path, f"line {n}: record lacks {', '.join(missing)}")
            key = (rec.get("rank"), rec["step"], rec.get("block"), rec.get("stage"))
            layer = int(rec["layer"])
            ids = json_ids(path, rec["top_indices"], f"line {n}: top_indices",
                           "true" in line or "false" in line)
            if ids.size == 0:
                ids = ids.reshape(0, int(rec.get("topk", 1)))
            if ids.ndim != 2:
                raise fail(path, f"line {n}: top_indices has shape {list(ids.shape)}, expected [tokens, topk]")
            if "num_tokens" in rec and int(rec["num_tokens"]) != ids.shape[0]:
                raise fail(path, f"line {n}: num_tokens {rec['num_tokens']} but {ids.shape[0]} rows of top_indices")
            if "topk" in rec and int(rec["topk"]) != ids.shape[1]:
                raise fail(path, f"line {n}: topk {rec['topk']} but rows of {ids.shape[1]} ids")
            probs = _megatron_probs(path, n, rec, ids)
            if with_probs is not None and with_probs != (probs is not None):
                raise fail(path, f"line {n}: some records carry gate probabilities "
                                 f"({' or '.join(MEGATRON_PROB_KEYS)}) and others do not")
            with_probs = probs is not None
            ascending = ascending and _ascending_rows(ids)
            group = groups.setdefault(key, {})
            if layer in group:
                raise fail(path, f"line {n}: layer {layer} appears twice in step {rec['step']}")
            group[layer] = (ids, probs)
        if not groups:
            raise fail(path, "holds no router trace records")
        if model is not None:
            seen = sorted({layer for g in groups.values() for layer in g})
            unknown = [x for x in seen if x not in model.moe_layer_ids]
            if unknown:
                raise fail(path, f"layer {unknown[0]} is not a MoE layer of {model.name} "
                                 f"(MoE layers {model.moe_layer_ids[0]}..{model.moe_layer_ids[-1]})")
            layers = list(model.moe_layer_ids)
        else:
            layers = sorted({layer for g in groups.values() for layer in g})
        parts, prob_parts = [], []
        for key, g in groups.items():
            absent = [x for x in layers if x not in g]
            if absent:
                raise fail(path, f"step {key[1]} (rank {key[0]}, block {key[2]}) lacks layer {absent[0]}")
            counts = {g[x][0].shape for x in layers}
            if len(counts) != 1:
                raise fail(path, f"step {key[1]} (rank {key[0]}, block {key[2]}) has different token "
                                 f"counts or top-k across layers: {sorted(counts)}")
            parts.append(np.stack([g[x][0] for x in layers], axis=1))
            if with_probs:
                prob_parts.append(np.stack([cast(np.ndarray, g[x][1]) for x in layers], axis=1))
        if len({p.shape[2] for p in parts}) != 1:
            raise fail(path, "top-k differs between steps")
        ids = np.concatenate(parts)
        top_k, tokens = ids.shape[2], ids.shape[0]
        if with_probs:
            weights = np.concatenate(prob_parts)
            order = "sorted" if bool(np.all(weights[..., 1:] <= weights[..., :-1])) else "unknown"
            return make_trace(path, ids, model, order=order, gate_weights=weights)
        order = "unknown" if top_k > 1 and tokens > 0 and ascending else "sorted"
        return make_trace(path, ids, model, order=order)


def _megatron_probs(path: str | os.PathLike[str], n: int, rec: dict[str, Any],
                    ids: np.ndarray) -> np.ndarray | None:
    """The record's gate probabilities [tokens, K] (see :data:`MEGATRON_PROB_KEYS`), or None."""
    name = next((k for k in MEGATRON_PROB_KEYS if k in rec), None)
    if name is None:
        return None
    try:
        probs = np.asarray(rec[name], dtype=np.float64)
    except (ValueError, TypeError):
        raise fail(path, f"line {n}: {name} is ragged or not numeric") from None
    if probs.size == 0:
        probs = probs.reshape(ids.shape)
    if probs.shape != ids.shape:
        raise fail(path, f"line {n}: {name} has shape {list(probs.shape)}, expected the shape of "
                         f"top_indices {list(ids.shape)}")
    if not np.all(np.isfinite(probs)):
        raise fail(path, f"line {n}: {name} holds NaN or infinite values")
    return probs


# --------------------------------------------------------------------------------------------
# Load matrices
# --------------------------------------------------------------------------------------------


def _load_stats(path: str | os.PathLike[str], load: np.ndarray, model: ModelSpec | None) -> RoutingStats:
    load = check_load(path, load)
    if not np.any(load):
        raise fail(path, "load matrix is all zeros (no routing): pass a trace or statistics, "
                         "or make one with `placer synth`")
    load = moe_rows(path, load, 0, model)
    check_shape(path, model, load.shape[0], load.shape[1], None)
    # Without a model top-k is unknown: the counts are taken per token-slot (top_k 1).
    return load_only_stats(load, model.top_k if model is not None else 1, model=model)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


_EXPERT_COLUMN = re.compile(r"^\s*expert[\s_-]*(\d+)\s*$", re.IGNORECASE)
_LAYER_COLUMNS = ("layer", "layer_id", "layer_idx", "layer_index")


def _labelled_load(path: str | os.PathLike[str], header: list[str],
                   rows: list[list[str]]) -> tuple[np.ndarray, str] | None:
    """The load matrix of a CSV with a header naming its columns, and a note saying how it was read.

    Load columns: the ``Expert_<n>`` columns (in expert order) when there are any, else every
    all-numeric column. A ``Layer`` column gives each row's layer: rows of one layer are summed,
    layers in ascending order. Other columns (labels such as a language) are ignored. None when
    the header is plain (every column numeric, no layer column): the rows are the matrix.
    """
    width = len(header)
    for n, r in enumerate(rows, start=2):
        if len(r) != width:
            raise fail(path, f"row {n} has {len(r)} values, the header has {width} columns")
    names = [h.strip() for h in header]
    layer_col = next((i for i, h in enumerate(names) if h.lower() in _LAYER_COLUMNS), None)
    numeric = [i for i in range(width) if i != layer_col and all(_is_number(r[i]) for r in rows)]
    experts = {int(m.group(1)): i for i, h in enumerate(names) if (m := _EXPERT_COLUMN.match(h))}
    if experts:
        missing = sorted(set(range(len(experts))) - set(experts))
        if missing or len(experts) != sum(1 for h in names if _EXPERT_COLUMN.match(h)):
            raise fail(path, f"expert columns must be Expert_0..Expert_{len(experts) - 1} once each"
                             + (f"; Expert_{missing[0]} is missing" if missing else "; one appears twice"))
        cols = [experts[e] for e in range(len(experts))]
        for i in cols:
            bad = next((n for n, r in enumerate(rows, start=2) if not _is_number(r[i])), None)
            if bad is not None:
                raise fail(path, f"row {bad}, column {names[i]}: non-numeric value {rows[bad - 2][i]!r}")
        used = f"columns {names[cols[0]]}..{names[cols[-1]]}" if len(cols) > 1 else f"column {names[cols[0]]}"
    else:
        cols = numeric
        if layer_col is None and len(cols) == width:
            return None
        if not cols:
            raise fail(path, "holds no numeric load columns")
        used = f"the numeric columns {', '.join(names[i] for i in cols)}"
    values = np.asarray([[float(r[i]) for i in cols] for r in rows], dtype=np.float64)
    ignored = [names[i] for i in range(width) if i not in cols and i != layer_col]
    note = f"load from {used} ({len(cols)} experts)"
    if layer_col is not None:
        layers = []
        for n, r in enumerate(rows, start=2):
            cell = r[layer_col].strip()
            if not (_is_number(cell) and float(cell).is_integer() and float(cell) >= 0):
                raise fail(path, f"row {n}, column {names[layer_col]}: {cell!r} is not a layer number")
            layers.append(int(float(cell)))
        order = sorted(set(layers))
        index = np.searchsorted(np.asarray(order), np.asarray(layers))
        summed = np.zeros((len(order), len(cols)), dtype=np.float64)
        np.add.at(summed, index, values)
        values = summed
        if len(order) < len(rows):
            note += f", {len(rows)} rows summed per {names[layer_col]} into {len(order)} layers"
        else:
            note += f", rows ordered by {names[layer_col]}"
    if ignored:
        note += f"; ignored columns: {', '.join(ignored)}"
    return values, note


def read_load_csv(path: str | os.PathLike[str], model: ModelSpec | None) -> RoutingStats:
    """A load matrix [L, E] as CSV: numeric rows, optionally under one non-numeric header row.

    NaN, negative, non-numeric and ragged rows are errors. Rows equal to the model's hidden
    layer count are cut to its MoE layers. A header may label the columns: then the
    ``Expert_<n>`` columns (else the numeric ones) are the load, a ``Layer`` column sums rows
    per layer, and label columns are ignored; one note line on stderr says which were used.
    """
    require_file(path)
    with guard(path, "load CSV"), open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
        if rows and not all(_is_number(c) for c in rows[0]):
            if len(rows) > 1:
                labelled = _labelled_load(path, rows[0], rows[1:])
                if labelled is not None:
                    values, note = labelled
                    sys.stderr.write(f"placer: note: {path}: {note}\n")
                    return _load_stats(path, values, model)
            rows = rows[1:]
        if not rows:
            raise fail(path, "holds no numeric rows")
        width = len(rows[0])
        numbers: list[list[float]] = []
        for n, r in enumerate(rows, start=1):
            if len(r) != width:
                raise fail(path, f"row {n} has {len(r)} values, row 1 has {width} (ragged matrix)")
            try:
                numbers.append([float(c) for c in r])
            except ValueError:
                raise fail(path, f"row {n}: non-numeric value") from None
        return _load_stats(path, np.asarray(numbers, dtype=np.float64), model)


def load_npz_key(path: str | os.PathLike[str], names: list[str]) -> str | None:
    """The array of a load npz: ``weight``, ``load`` or the only array; None when ambiguous."""
    for key in LOAD_NPZ_KEYS:
        if key in names:
            return key
    return names[0] if len(names) == 1 else None


def read_load_npz(path: str | os.PathLike[str], model: ModelSpec | None) -> RoutingStats:
    """A load matrix [L, E] in an npz (key ``weight`` or ``load`` or the only array)."""
    require_file(path)
    with guard(path, "load npz"), load_arrays(path) as z:
        key = load_npz_key(path, list(z.files))
        if key is None:
            raise fail(path, f"npz holds arrays {sorted(z.files)}; expected one load matrix "
                             "(key 'weight' or 'load' or a single array)")
        return _load_stats(path, z[key], model)
