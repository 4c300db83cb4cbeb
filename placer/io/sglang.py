"""Readers of SGLang's expert-distribution recorder dumps (.pt) and its legacy CSV.

``.pt`` files are loaded only with ``torch.load(path, weights_only=True)`` (tensors and plain
containers; nothing else is unpickled), first on the meta device (:func:`load_pt_meta`: the
structure without the tensor bytes, which tells the kind of dump), then on the CPU for the
count dumps. A ``per_token`` dump is never loaded whole: its ids are read from the file a window
of tokens at a time (:class:`_PtData`). torch is imported lazily.

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
  ``topk_ids_of_layer`` key is what tells it from a per_pass dump. Streamed in chunks.
* ``sglang-csv``: legacy ``layer_id,expert_id,count`` rows (one file per rank).

``layers`` is the model's ``num_hidden_layers`` (dense layers included): rows are cut to
``model.moe_layer_ids``; a row count equal to the MoE layer count is kept as is.
"""

from __future__ import annotations

import csv
import os
import sys
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np

from placer.io.common import (
    MAX_EXPERT_ID,
    check_load,
    check_memory,
    check_shape,
    fail,
    guard,
    int_array,
    load_torch,
    make_trace,
    moe_rows,
    rechunk,
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


def load_pt_meta(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True, map_location="meta")``: the dump's structure, its
    tensors on the meta device (shapes only; their bytes stay in the file). Cheap at any size."""
    return load_torch(path, map_location="meta")


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


def _p2l(path: str | os.PathLike[str], value: Any, model: ModelSpec | None) -> tuple[np.ndarray, int]:
    """The map ``last_physical_to_logical_map`` [layers, P] checked, and E."""
    p2l = int_array(path, value, "last_physical_to_logical_map", 2)
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
        p2l, e = _p2l(path, obj["last_physical_to_logical_map"], model)
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


class _PtData:
    """The bytes of the tensors of a ``.pt`` file loaded on the meta device, read from the file.

    ``torch.load(map_location="meta")`` unpickles the structure only; each meta tensor's storage
    then records where its bytes start in the (uncompressed) zip (``_checkpoint_offset``), so a
    window of a tensor is read with plain file reads, never the whole tensor. Values that are not
    meta tensors (the whole-file fallback, plain lists) are converted as they are.
    """

    def __init__(self, path: str | os.PathLike[str], f: Any):
        self.path, self.f = path, f
        self.order: Literal["<", ">"] | None = None  # read with the first meta tensor

    def whole(self, value: Any, what: str) -> np.ndarray:
        """All of ``value`` as a numpy array."""
        if not _is_meta(value):
            return to_numpy(self.path, value, what)
        return self._block(value, what, value.storage_offset(), tuple(value.shape), tuple(value.stride()))

    def window(self, value: Any, lo: int, hi: int, what: str) -> np.ndarray:
        """``value[:, lo:hi]`` of a 3-D tensor or array: one read per row of the first axis."""
        if not _is_meta(value):
            return to_numpy(self.path, value[:, lo:hi], what)
        s0, s1, s2 = value.stride()
        rows = [self._block(value, what, value.storage_offset() + i * s0 + lo * s1, (hi - lo, value.shape[2]),
                            (s1, s2)) for i in range(value.shape[0])]
        return np.stack(rows) if rows else np.empty((0, hi - lo, value.shape[2]), np.int64)

    def _block(self, t: Any, what: str, first: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
        if self.order is None:
            self.order = "<" if _byteorder(self.path) == "little" else ">"
        try:
            dtype = np.dtype(str(t.dtype).removeprefix("torch.")).newbyteorder(self.order)
        except TypeError:
            raise fail(self.path, f"{what} has dtype {t.dtype}, which numpy cannot read") from None
        if any(n == 0 for n in shape):
            return np.empty(shape, dtype)
        span = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        storage = t.untyped_storage()
        if first < 0 or (first + span) * dtype.itemsize > storage.nbytes():
            raise fail(self.path, f"{what} lies outside its storage")
        self.f.seek(storage._checkpoint_offset + first * dtype.itemsize)
        data = self.f.read(span * dtype.itemsize)
        if len(data) != span * dtype.itemsize:
            raise fail(self.path, f"{what}: the file is truncated")
        flat = np.frombuffer(data, dtype)
        return np.lib.stride_tricks.as_strided(flat, shape, tuple(s * dtype.itemsize for s in strides),
                                               writeable=False)


def _is_meta(value: Any) -> bool:
    return bool(getattr(value, "is_meta", False))


def _byteorder(path: str | os.PathLike[str]) -> str:
    """The byte order torch recorded in the archive (``<archive>/byteorder``), else this machine's."""
    with zipfile.ZipFile(path) as zf:
        name = next((n for n in zf.namelist() if n.endswith("/byteorder")), None)
        return zf.read(name).decode("ascii").strip() if name is not None else sys.byteorder


def _offsets_known(obj: dict[str, Any]) -> bool:
    """Whether every meta tensor of the records and the map knows where its bytes are in the file."""
    values: list[Any] = [obj.get("last_physical_to_logical_map")]
    for r in obj.get("records", []):
        if isinstance(r, dict):
            values += [r.get("topk_ids_of_layer"), r.get("forward_mode")]
    return all(getattr(v.untyped_storage(), "_checkpoint_offset", None) is not None
               for v in values if _is_meta(v))


_SCAN_BYTES = 64 << 20
"""Bytes of ids read at a time by the checking pass over a whole dump."""


def read_sglang_per_token(path: str | os.PathLike[str], obj: dict[str, Any], model: ModelSpec | None,
                          chunk_tokens: int = 65536) -> Callable[[], Iterator[RoutingTrace]]:
    """Per-token trace of a ``per_token`` dump (logical ids, order "sorted"), as a re-iterable
    stream of chunks of ``chunk_tokens`` tokens.

    ``obj`` is the dump loaded by :func:`load_pt_meta` (tensors on the meta device): the ids are
    read from the file a window of tokens at a time, so memory is bounded by the chunk size, not
    the dump. A file whose tensors do not say where their bytes are (torch's legacy non-zip
    format) is loaded whole instead. The whole dump is checked once here, before any chunk.

    Dense layers are dropped through ``model.moe_layer_ids``; without a model, layers whose ids
    are -1 for every token are taken as dense and dropped. Tokens with -1 at every MoE layer
    (padding) are dropped. The real top-k is the number of leading non -1 columns and must be
    the same everywhere. ``phase`` comes from ``forward_mode`` (see ``_FORWARD_MODE_PHASE``).
    """
    with guard(path, "SGLang per_token dump"):
        if not _offsets_known(obj):
            obj = load_torch(path)
        with open(path, "rb") as f:
            data = _PtData(path, f)
            p2l, e = _p2l(path, data.whole(obj["last_physical_to_logical_map"], "last_physical_to_logical_map"),
                          model)
            records = _records(path, obj, data, p2l.shape[0])
            keep, k = _check_per_token(path, records, data, p2l.shape[1], model)
    # [L, P] logical ids, int16 when they fit (the ids placer keeps), else make_trace reports them
    layer_maps = p2l[keep].astype(np.int16 if e - 1 <= MAX_EXPERT_ID else np.int64)
    rows = np.arange(len(keep))[None, :, None]

    def pieces(data: _PtData) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i, (ids, tokens, code) in enumerate(records):
            for lo in range(0, tokens, chunk_tokens):
                hi = min(lo + chunk_tokens, tokens)
                what = f"record {i} topk_ids_of_layer"
                phys = _int_ids(path, data.window(ids, lo, hi, what), what).transpose(1, 0, 2)[:, keep]  # [t, L, 8]
                phys = phys[(phys >= 0).any(axis=(1, 2))][:, :, :k]
                yield layer_maps[rows, phys], np.full(len(phys), code, np.int8)

    def chunks() -> Iterator[RoutingTrace]:
        with guard(path, "SGLang per_token dump"), open(path, "rb") as f:
            for logical, phase in rechunk(pieces(_PtData(path, f)), chunk_tokens):
                yield make_trace(path, logical, model, num_experts=e, phase=phase)
    return chunks


def _int_ids(path: str | os.PathLike[str], ids: np.ndarray, what: str) -> np.ndarray:
    """Integer ids as they are (no int64 copy); other dtypes through :func:`int_array`'s checks."""
    return ids if np.issubdtype(ids.dtype, np.integer) else int_array(path, ids, what, 3)


def _records(path: str | os.PathLike[str], obj: dict[str, Any], data: _PtData,
             num_layers: int) -> list[tuple[Any, int, int]]:
    """``(topk_ids_of_layer, tokens, phase code)`` of each record, checked from the shapes alone."""
    records = []
    for i, r in enumerate(obj["records"]):
        if not isinstance(r, dict):
            raise fail(path, "records must be a list of dicts")
        what = f"record {i} topk_ids_of_layer"
        ids = r["topk_ids_of_layer"]
        if not hasattr(ids, "shape"):  # a plain list: in memory already
            ids = int_array(path, ids, what, 3)
        if len(ids.shape) != 3:
            raise fail(path, f"{what} has shape {list(ids.shape)}, expected 3-D")
        if ids.shape[0] != num_layers:
            raise fail(path, f"record {i} has {ids.shape[0]} layers, the map {num_layers}")
        mode = r.get("forward_mode")
        code = -1 if mode is None else _FORWARD_MODE_PHASE.get(int(data.whole(mode, f"record {i} forward_mode")), -1)
        records.append((ids, int(ids.shape[1]), code))
    if not records:
        raise fail(path, "per_token dump has no records")
    return records


def _check_per_token(path: str | os.PathLike[str], records: list[tuple[Any, int, int]], data: _PtData,
                     num_physical: int, model: ModelSpec | None) -> tuple[np.ndarray, int]:
    """One pass over every id of the dump: ``(MoE layers kept, top-k)``, or the error.

    Checks, in this order: physical ids in ``[-1, P)``; the kept layers (the model's MoE layers,
    else those with any id); one top-k (leading non -1 columns) for every kept token and layer.
    """
    num_layers = records[0][0].shape[0]
    keep = moe_rows(path, np.arange(num_layers), 0, model) if model is not None else np.arange(num_layers)
    lo, hi = 0, -1
    any_id = np.zeros(len(keep), bool)  # the layer holds an id somewhere
    fewest = np.full(len(keep), np.iinfo(np.int64).max)  # non -1 ids of a real token, fewest
    most = np.zeros(len(keep), np.int64)
    leading = np.ones(len(keep), bool)  # the non -1 ids are always the leading columns
    real_tokens = 0
    for i, (ids, tokens, _) in enumerate(records):
        step = max(1, _SCAN_BYTES // max(1, 8 * num_layers * ids.shape[2]))
        for start in range(0, tokens, step):
            what = f"record {i} topk_ids_of_layer"
            phys = _int_ids(path, data.window(ids, start, min(start + step, tokens), what), what)
            if phys.size:
                lo, hi = min(lo, int(phys.min())), max(hi, int(phys.max()))
            valid = phys[keep] >= 0  # [L, t, 8]
            any_id |= valid.any(axis=(1, 2))
            real = valid.any(axis=(0, 2))
            count = valid[:, real].sum(axis=2)  # [L, t']
            if count.size:
                real_tokens += int(real.sum())
                fewest = np.minimum(fewest, count.min(axis=1))
                most = np.maximum(most, count.max(axis=1))
                leading &= (np.cumprod(valid[:, real], axis=2).sum(axis=2) == count).all(axis=1)
    if lo < -1 or hi >= num_physical:
        raise fail(path, f"physical expert id {lo if lo < -1 else hi} outside [0, {num_physical})")
    if model is None:
        keep, fewest, most, leading = keep[any_id], fewest[any_id], most[any_id], leading[any_id]
        if keep.size == 0:
            raise fail(path, "per_token dump holds no expert ids (all -1)")
    k = int(most.max()) if real_tokens else 0
    if real_tokens and (int(fewest.min()) != k or not leading.all()):
        raise fail(path, "the number of non -1 expert ids differs between tokens or layers "
                         f"({int(fewest.min())} to {k}); cannot tell top-k")
    if k == 0:
        raise fail(path, "per_token dump holds no expert ids")
    return keep, k


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
