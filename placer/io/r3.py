"""R3 routed experts (``--enable-return-routed-experts``) as the serving stacks' outputs are saved.

The ``r3-npy`` and ``r3-base64`` input formats (:func:`read_r3_npy`, :func:`read_r3_base64`),
and the saved outputs that :func:`placer.profiling.vllm_r3.import_r3` reads
(:func:`read_routed_experts`), which say whether ids are logical or physical by stack.

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
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from placer.io.common import (
    check_npy_bytes,
    fail,
    guard,
    json_ids,
    load_arrays,
    make_trace,
    moe_rows,
    require_file,
)
from placer.io.placements import read_placement_json
from placer.types import ModelSpec, RoutingTrace

NPY_MAGIC = b"\x93NUMPY"
"""First bytes of a ``.npy`` payload: vLLM's base64 form (SGLang's is raw int32)."""


def _r3_trace(path: str | os.PathLike[str], ids: np.ndarray, model: ModelSpec | None,
              request_ids: np.ndarray | None = None) -> RoutingTrace:
    ids = moe_rows(path, ids, 1, model)
    return make_trace(path, ids, model, request_ids=request_ids)


def read_r3_npy(path: str | os.PathLike[str], model: ModelSpec | None) -> RoutingTrace:
    """R3 ``.npy`` int [tokens, num_hidden_layers, top_k]; dense layers dropped via the model."""
    require_file(path)
    with guard(path, "R3 .npy"):
        arr = load_arrays(path, mmap_mode="r")
        if arr.ndim != 3:
            raise fail(path, f"R3 array has shape {list(arr.shape)}, expected [tokens, layers, top_k]")
        if not np.issubdtype(arr.dtype, np.integer):
            raise fail(path, f"R3 array must hold integer ids, got {arr.dtype}")
        return _r3_trace(path, np.asarray(arr, dtype=np.int64), model)


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


def read_r3_base64(path: str | os.PathLike[str], model: ModelSpec | None) -> RoutingTrace:
    """R3 base64 text: one base64 string of raw little-endian int32 per non-empty line.

    Each line is one request (its line index becomes ``request_ids``), reshaped to
    ``[-1, model.num_hidden_layers, model.top_k]``; the shape is not in the data, so a model
    is required.
    """
    require_file(path)
    if model is None:
        raise fail(path, "R3 base64 data holds no shape; give the model (--model) to reshape it "
                         "to [tokens, layers, top_k]")
    with guard(path, "R3 base64 text"), open(path, encoding="ascii") as f:
        parts, requests = [], []
        for n, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            ids = _int32_ids(path, _base64_bytes(path, text, f"line {n}"), f"line {n}", model)
            parts.append(ids)
            requests.append(np.full(ids.shape[0], len(parts) - 1, dtype=np.int64))
        if not parts:
            raise fail(path, "holds no base64 data")
        return _r3_trace(path, np.concatenate(parts).astype(np.int64), model, np.concatenate(requests))


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
    """``int64 [tokens, layers, top_k]`` of one base64 string: vLLM's ``.npy`` or SGLang's raw int32."""
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
        return arr.astype(np.int64)
    if model is None:
        raise fail(path, "base64 raw-int32 routed experts (SGLang's form) hold no shape; give --model "
                         "(or a placer placement)")
    return _int32_ids(path, raw, where, model).astype(np.int64)


def read_routed_experts(path: str | os.PathLike[str], model: ModelSpec | None) -> tuple[np.ndarray, np.ndarray]:
    """Raw R3 ids ``int64 [T, layers, K]`` and request ids ``int64 [T]`` of a saved-output file."""
    require_file(path)
    ext = Path(path).suffix.lower()
    if ext == ".npy":
        with guard(path, "R3 .npy"):
            arr = load_arrays(path)
        if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer):
            raise fail(path, f"R3 array must be integer [tokens, layers, top_k], got {arr.dtype} {list(arr.shape)}")
        return arr.astype(np.int64), np.zeros(arr.shape[0], np.int64)
    if ext not in (".jsonl", ".txt", ".b64"):
        raise fail(path, "R3 outputs are read from .npy, .jsonl, .txt or .b64 files")
    parts: list[np.ndarray] = []
    requests: list[np.ndarray] = []
    with guard(path, "R3 outputs"), open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            value: Any = text
            rid = len(parts)
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
            if parts and ids.shape[1:] != parts[0].shape[1:]:
                raise fail(path, f"line {n}: shape [*, {ids.shape[1]}, {ids.shape[2]}] differs from the first "
                                 f"request's [*, {parts[0].shape[1]}, {parts[0].shape[2]}]")
            parts.append(ids)
            requests.append(np.full(ids.shape[0], rid, np.int64))
    if not parts:
        raise fail(path, "holds no routed experts")
    return np.concatenate(parts), np.concatenate(requests)
