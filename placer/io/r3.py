"""R3 routed experts (``--enable-return-routed-experts``) as the serving stacks' outputs are saved.

The ``r3-npy`` and ``r3-base64`` input formats (:func:`read_r3_npy`, :func:`read_r3_base64`),
and the saved outputs that :func:`placer.profiling.vllm_r3.import_r3` reads
(:func:`read_routed_experts`), which say whether ids are logical or physical by stack.

The two input formats are streamed: checked in one pass over the file when opened, then read
again chunk by chunk, so memory is bounded by the chunk size (and one base64 line), not the
file. Saved outputs are read piece by piece (:func:`routed_expert_pieces`: row blocks of a
``.npy``, one request per line of text); :func:`read_routed_experts` joins them into the whole file.

Saved outputs read here:

* ``.npy``: one int array ``[tokens, layers, top_k]``;
* ``.jsonl``: one object per request with ``routed_experts`` as a base64 string or a nested list
  ``[tokens][layers][top_k]`` (``request_id`` kept when an integer, else the line index);
* ``.txt`` / ``.b64``: one base64 string per line.

A base64 string is told apart by its bytes: the ``.npy`` magic ``\\x93NUMPY`` means vLLM's form
(any integer dtype, its own shape; read with ``allow_pickle=False``, never unpickled), anything
else SGLang's raw int32 (reshaped with the model, so it needs one). ``layers`` is
``num_hidden_layers`` (dense rows are dropped through the model) or the MoE layer count.
Placements (SGLang only): a placer placement JSON (its model is used), or a JSON object with
``physical_to_logical_map`` (SGLang's ``--init-expert-location`` file; needs a model).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from placer.io.common import (
    MAX_EXPERT_ID,
    check_arrays,
    check_ids,
    check_npy_bytes,
    check_shape,
    fail,
    guard,
    json_ids,
    make_trace,
    moe_rows,
    rechunk,
    require_file,
)
from placer.io.placements import read_placement_json
from placer.resources import human_bytes
from placer.types import ModelSpec, RoutingTrace

NPY_MAGIC = b"\x93NUMPY"
"""First bytes of a ``.npy`` payload: vLLM's base64 form (SGLang's is raw int32)."""


_SCAN_BYTES = 64 << 20
"""Bytes of ids read at a time by the checking pass over a whole file."""


class _NpyRows:
    """An ``.npy`` file read a few rows at a time: its header checked against the file size, the
    rows read with plain file reads (nothing mapped, nothing unpickled). A Fortran-order file,
    whose rows are not contiguous, is memory-mapped instead."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = path
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, self.fortran, dtype = read_header(f)
            self.start = f.tell()
        if dtype.hasobject:
            raise fail(path, "R3 array holds Python objects (placer never unpickles)")
        self.shape, self.dtype = tuple(int(d) for d in shape), dtype
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize
        nbytes = (self.shape[0] if self.shape else 1) * self.row_bytes
        held = os.path.getsize(path) - self.start
        if held < nbytes:
            raise fail(path, f"declares an array of {human_bytes(nbytes)}; the file holds {human_bytes(max(held, 0))} "
                             f"(a truncated or corrupt .npy: its header declares {list(self.shape)} {dtype})")

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[int, int], np.ndarray]]:
        """A function of ``(lo, hi)`` returning rows ``[lo, hi)``, valid inside the block."""
        if self.fortran:
            mapped = np.load(self.path, mmap_mode="r", allow_pickle=False)
            yield lambda lo, hi: np.array(mapped[lo:hi])
            return
        with open(self.path, "rb") as f:
            def rows(lo: int, hi: int) -> np.ndarray:
                f.seek(self.start + lo * self.row_bytes)
                data = f.read((hi - lo) * self.row_bytes)
                if len(data) != (hi - lo) * self.row_bytes:
                    raise fail(self.path, "the .npy file is truncated")
                return np.frombuffer(data, self.dtype).reshape((hi - lo, *self.shape[1:]))
            yield rows


def _expert_count(path: str | os.PathLike[str], lo: int | None, hi: int | None, num_layers: int, top_k: int,
                  model: ModelSpec | None) -> int:
    """E of MoE-only ids whose smallest and largest are ``lo``, ``hi`` (None: no tokens), checked as
    :func:`~placer.io.common.make_trace` checks a whole array."""
    if lo is None or hi is None:
        if model is None:
            raise fail(path, "holds no routing data and no model is given to know the expert count")
        e = model.num_experts
    else:
        e = model.num_experts if model is not None else hi + 1
        check_ids(path, np.array([lo, hi]), e, model)
    check_shape(path, model, num_layers, e, top_k)
    if hi is not None and hi > MAX_EXPERT_ID:
        raise fail(path, f"expert id {hi} out of range [0, {MAX_EXPERT_ID + 1}) (placer stores expert ids as int16)")
    return e


def _extent(lo: int | None, hi: int | None, ids: np.ndarray) -> tuple[int | None, int | None]:
    if ids.size == 0:
        return lo, hi
    a, b = int(ids.min()), int(ids.max())
    return (a, b) if lo is None or hi is None else (min(lo, a), max(hi, b))


def read_r3_npy(path: str | os.PathLike[str], model: ModelSpec | None,
                chunk_tokens: int = 65536) -> Callable[[], Iterator[RoutingTrace]]:
    """R3 ``.npy`` int [tokens, num_hidden_layers, top_k]; dense layers dropped via the model.

    A re-iterable stream of chunks of ``chunk_tokens`` tokens read from the file (memory bounded
    by the chunk size, not the file). The ids are checked here in one pass over the file, before
    any chunk; without a model E is the largest id + 1.
    """
    require_file(path)
    with guard(path, "R3 .npy"):
        npy = _NpyRows(path)
        if len(npy.shape) != 3:
            raise fail(path, f"R3 array has shape {list(npy.shape)}, expected [tokens, layers, top_k]")
        if not np.issubdtype(npy.dtype, np.integer):
            raise fail(path, f"R3 array must hold integer ids, got {npy.dtype}")
        tokens, num_layers, top_k = npy.shape
        keep = moe_rows(path, np.arange(num_layers), 0, model)
        step = max(1, _SCAN_BYTES // max(1, npy.row_bytes))
        lo = hi = None
        with npy.reader() as rows:
            for start in range(0, tokens, step):
                lo, hi = _extent(lo, hi, rows(start, min(start + step, tokens))[:, keep])
        e = _expert_count(path, lo, hi, len(keep), top_k, model)

    def chunks() -> Iterator[RoutingTrace]:
        with guard(path, "R3 .npy"), npy.reader() as rows:
            for start in range(0, max(tokens, 1), chunk_tokens):
                ids = rows(start, min(start + chunk_tokens, tokens))[:, keep]
                yield make_trace(path, ids, model, num_experts=e)
    return chunks


def _base64_bytes(path: str | os.PathLike[str], text: str, where: str) -> bytes:
    """The bytes of one base64 string (``where``, e.g. ``"line 3"``, prefixes the error)."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise fail(path, f"{where}: not valid base64") from None


def _int32_ids(path: str | os.PathLike[str], raw: bytes, where: str, model: ModelSpec) -> np.ndarray:
    """SGLang's R3 form, raw little-endian int32, as ids ``int32 [tokens, num_hidden_layers, top_k]``."""
    width = model.num_hidden_layers * model.top_k
    if len(raw) % (4 * width):
        raise fail(path, f"{where}: {len(raw)} bytes is not a whole number of tokens of "
                         f"{model.num_hidden_layers} layers x top-{model.top_k} int32 ids")
    return np.frombuffer(raw, dtype="<i4").reshape(-1, model.num_hidden_layers, model.top_k)


def read_r3_base64(path: str | os.PathLike[str], model: ModelSpec | None,
                   chunk_tokens: int = 65536) -> Callable[[], Iterator[RoutingTrace]]:
    """R3 base64 text: one base64 string of raw little-endian int32 per non-empty line.

    Each line is one request (its line index becomes ``request_ids``), reshaped to
    ``[-1, model.num_hidden_layers, model.top_k]``; the shape is not in the data, so a model
    is required. A re-iterable stream of chunks of ``chunk_tokens`` tokens, read line by line
    (memory bounded by a chunk and one line). Every line is decoded and checked here once,
    before any chunk.
    """
    require_file(path)
    if model is None:
        raise fail(path, "R3 base64 data holds no shape; give the model (--model) to reshape it "
                         "to [tokens, layers, top_k]")
    keep = moe_rows(path, np.arange(model.num_hidden_layers), 0, model)

    def requests() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids int32 [t, L, K], request ids [t])`` of each non-empty line."""
        with open(path, encoding="ascii") as f:
            request = 0
            for n, line in enumerate(f, start=1):
                text = line.strip()
                if not text:
                    continue
                ids = _int32_ids(path, _base64_bytes(path, text, f"line {n}"), f"line {n}", model)[:, keep]
                yield ids, np.full(len(ids), request, dtype=np.int64)
                request += 1

    with guard(path, "R3 base64 text"):
        lines = 0
        lo = hi = None
        for ids, _ in requests():
            lines += 1
            lo, hi = _extent(lo, hi, ids)
        if not lines:
            raise fail(path, "holds no base64 data")
        e = _expert_count(path, lo, hi, len(keep), model.top_k, model)

    def chunks() -> Iterator[RoutingTrace]:
        with guard(path, "R3 base64 text"):
            for ids, request_ids in rechunk(requests(), chunk_tokens):
                yield make_trace(path, ids, model, num_experts=e, request_ids=request_ids)
    return chunks


def read_placement_map(path: str | os.PathLike[str], model: ModelSpec | None) -> tuple[np.ndarray, ModelSpec]:
    """``(physical_to_logical int64 [L_moe, P], model)`` of a placement file."""
    require_file(path)
    with guard(path, "placement JSON"), open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if isinstance(doc, dict) and "schema_version" in doc:
        pf = read_placement_json(path)
        if model is not None and (model.num_moe_layers, model.num_experts) != (pf.model.num_moe_layers,
                                                                               pf.model.num_experts):
            raise fail(path, f"the placement's model {pf.model.name} contradicts --model {model.name}")
        return pf.placement.physical_to_logical.astype(np.int64), model or pf.model
    if not isinstance(doc, dict) or "physical_to_logical_map" not in doc:
        raise fail(path, "expected a placer placement or a JSON object with physical_to_logical_map")
    if model is None:
        raise fail(path, "a bare physical_to_logical_map holds no model shape; give --model")
    with guard(path, "placement JSON"):
        p2l = np.asarray(doc["physical_to_logical_map"], dtype=np.int64)
    if p2l.ndim != 2:
        raise fail(path, f"physical_to_logical_map has shape {list(p2l.shape)}, expected [layers, slots]")
    p2l = moe_rows(path, p2l, 0, model, what="placement row count")
    if p2l.min() < 0 or p2l.max() >= model.num_experts:
        raise fail(path, f"logical id out of range [0, {model.num_experts})")
    return p2l, model


def _decode_routed(path: str | os.PathLike[str], text: str, where: str, model: ModelSpec | None) -> np.ndarray:
    """Ids ``[tokens, layers, top_k]`` of one base64 string: vLLM's ``.npy`` (its integer dtype) or
    SGLang's raw int32."""
    raw = _base64_bytes(path, text, where)
    if raw.startswith(NPY_MAGIC):
        check_npy_bytes(path, raw, where)
        try:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise fail(path, f"{where}: base64 .npy payload unreadable ({' '.join(str(exc).split())})") from None
        if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 3:
            raise fail(path, f"{where}: base64 .npy holds {arr.dtype} {list(arr.shape)}, expected integer "
                             "[tokens, layers, top_k]")
        return arr
    if model is None:
        raise fail(path, "base64 raw-int32 routed experts (SGLang's form) hold no shape; give --model "
                         "(or a placer placement)")
    return _int32_ids(path, raw, where, model)


def routed_expert_pieces(path: str | os.PathLike[str], model: ModelSpec | None,
                         block_tokens: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Raw R3 ids ``[t, layers, K]`` and request ids ``int64 [t]`` of a saved-output file, piece by
    piece, each in its own integer dtype: blocks of ``block_tokens`` rows of a ``.npy`` (one empty
    block when it holds no token), one request per line of text (every request of the shape of
    the first). Memory is bounded by a block or one line, not the file; errors name ``path`` as
    they are found."""
    require_file(path)
    ext = Path(path).suffix.lower()
    if ext == ".npy":
        with guard(path, "R3 .npy"):
            npy = _NpyRows(path)
            if len(npy.shape) != 3 or not np.issubdtype(npy.dtype, np.integer):
                raise fail(path, f"R3 array must be integer [tokens, layers, top_k], got {npy.dtype} "
                                 f"{list(npy.shape)}")
            tokens = npy.shape[0]
            with npy.reader() as rows:
                for lo in range(0, max(tokens, 1), block_tokens):
                    hi = min(lo + block_tokens, tokens)
                    yield rows(lo, hi), np.zeros(hi - lo, np.int64)
        return
    if ext not in (".jsonl", ".txt", ".b64"):
        raise fail(path, "R3 outputs are read from .npy, .jsonl, .txt or .b64 files")
    first: tuple[int, ...] | None = None
    with guard(path, "R3 outputs"), open(path, encoding="utf-8") as f:
        request = 0
        for n, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            value: Any = text
            rid = request
            if ext == ".jsonl":
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise fail(path, f"line {n}: not valid JSON ({exc.msg})") from None
                if not isinstance(rec, dict) or "routed_experts" not in rec:
                    raise fail(path, f"line {n}: expected an object with 'routed_experts'")
                value = rec["routed_experts"]
                if isinstance(rec.get("request_id"), int) and not isinstance(rec.get("request_id"), bool):
                    rid = rec["request_id"]
            if isinstance(value, str):
                ids = _decode_routed(path, value, f"line {n}", model)
            else:
                ids = json_ids(path, value, f"line {n}: routed_experts", "true" in text or "false" in text)
                if ids.ndim != 3:
                    raise fail(path, f"line {n}: routed_experts has shape {list(ids.shape)}, expected "
                                     "[tokens, layers, top_k]")
            if first is None:
                first = ids.shape[1:]
            elif ids.shape[1:] != first:
                raise fail(path, f"line {n}: shape [*, {ids.shape[1]}, {ids.shape[2]}] differs from the first "
                                 f"request's [*, {first[0]}, {first[1]}]")
            if ids.dtype == np.uint64:  # joined with signed requests it would become float64
                ids = ids.astype(np.int64)
            request += 1
            yield ids, np.full(ids.shape[0], rid, np.int64)
    if first is None:
        raise fail(path, "holds no routed experts")


def read_routed_experts(path: str | os.PathLike[str], model: ModelSpec | None) -> tuple[np.ndarray, np.ndarray]:
    """Raw R3 ids ``int64 [T, layers, K]`` and request ids ``int64 [T]`` of a saved-output file,
    read whole (:func:`routed_expert_pieces` joined; a ``.npy`` is first checked to fit in memory)."""
    if Path(path).suffix.lower() == ".npy":
        require_file(path)
        check_arrays(path)
    parts = list(routed_expert_pieces(path, model, block_tokens=1 << 62))
    if len(parts) == 1:
        ids, requests = parts[0]
    else:
        ids, requests = np.concatenate([ids for ids, _ in parts]), np.concatenate([rid for _, rid in parts])
    return ids.astype(np.int64), requests
