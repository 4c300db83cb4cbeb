"""Import vLLM and SGLang R3 routed experts from saved outputs into a logical routing trace.

R3 (``--enable-return-routed-experts``) returns per request the routed expert ids
``[num_tokens, num_hidden_layers, top_k]``. The two stacks differ in what the ids ARE:

* **vLLM 0.34.0** (``stack="vllm"``, the default): LOGICAL expert ids. The router captures
  ``topk_ids`` before its EPLB logical->physical remap
  (``vllm/model_executor/layers/fused_moe/router/base_router.py:281-286``), so ids never need
  mapping back, whatever redundant experts or rebalancing the server ran. A placement is
  therefore refused: it would turn correct logical ids into wrong ones. Offline,
  ``CompletionOutput.routed_experts`` is a numpy array (uint8 when the model has <= 256
  experts, else uint16); the OpenAI completion/chat servers put it in
  ``choices[i].routed_experts`` as base64 of its ``.npy`` bytes (``numpy2base64``:
  ``np.save(..., allow_pickle=False)``), shape ``[tokens - 1, num_hidden_layers, top_k]``.
* **SGLang** (``stack="sglang"``): PHYSICAL slot ids (captured after its remap), as base64 of
  raw little-endian int32 in ``meta_info["routed_experts"]``. With redundant experts or a
  non-trivial placement they are mapped back through the placement the server ran with
  (``physical_to_logical [L, P]``); without one they are taken as logical.

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

from placer.errors import InvalidInputError
from placer.io._common import (
    check_npy_bytes,
    fail,
    guard,
    json_ids,
    load_arrays,
    make_trace,
    moe_rows,
    require_file,
)
from placer.types import ModelSpec, RoutingTrace


def read_placement_map(path: str | os.PathLike[str], model: ModelSpec | None) -> tuple[np.ndarray, ModelSpec]:
    """``(physical_to_logical int64 [L_moe, P], model)`` of a placement file."""
    from placer.io.placements import read_placement_json

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


NPY_MAGIC = b"\x93NUMPY"
"""First bytes of a ``.npy`` payload: vLLM's base64 form (SGLang's is raw int32)."""

STACKS = ("vllm", "sglang")
"""What ``import_r3(stack=...)`` accepts: vLLM ids are logical, SGLang ids physical."""


def _decode_b64(path: str | os.PathLike[str], text: str, where: str, model: ModelSpec | None) -> np.ndarray:
    """``int64 [tokens, layers, top_k]`` of one base64 string: vLLM's ``.npy`` or SGLang's raw int32."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise fail(path, f"{where}: not valid base64") from None
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
    width = model.num_hidden_layers * model.top_k
    if len(raw) % (4 * width):
        raise fail(path, f"{where}: {len(raw)} bytes is not a whole number of tokens of {width} int32 ids")
    return np.frombuffer(raw, dtype="<i4").astype(np.int64).reshape(-1, model.num_hidden_layers, model.top_k)


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
                ids = _decode_b64(path, value, f"line {n}", model)
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


def import_r3(path: str | os.PathLike[str], *, model: ModelSpec | None = None,
              placement: str | os.PathLike[str] | None = None, stack: str = "vllm") -> RoutingTrace:
    """The logical routing trace ``[T, L, K]`` of saved R3 outputs of ``stack`` (vllm or sglang).

    ``stack="vllm"``: the ids are logical already; giving ``placement`` is an error (mapping
    logical ids through a physical->logical table would corrupt them). ``stack="sglang"``: with
    ``placement`` each MoE layer's ids are physical slots mapped through its
    ``physical_to_logical``; without it they are taken as logical (true only for a trivial
    placement with no redundant experts).
    """
    if stack not in STACKS:
        raise fail(path, f"unknown R3 stack {stack!r}; expected one of {', '.join(STACKS)}")
    if stack == "vllm" and placement is not None:
        raise fail(placement, "vLLM R3 ids are already logical (captured before its EPLB remap), so no placement "
                              "maps them; drop --placement (give --model for the shape) or, for SGLang R3, "
                              "say the stack is sglang")
    p2l = None
    if placement is not None:
        p2l, model = read_placement_map(placement, model)
    raw, requests = read_routed_experts(path, model)
    raw = moe_rows(path, raw, 1, model, what="R3 layer count")
    if p2l is not None:
        if raw.shape[1] != p2l.shape[0]:
            raise fail(path, f"{raw.shape[1]} MoE layers but the placement has {p2l.shape[0]}")
        if raw.size and (raw.min() < 0 or raw.max() >= p2l.shape[1]):
            bad = int(raw.min()) if raw.min() < 0 else int(raw.max())
            raise fail(path, f"physical expert id {bad} outside the placement's [0, {p2l.shape[1]}) slots")
        raw = p2l[np.arange(raw.shape[1])[None, :, None], raw]
    try:
        return make_trace(path, raw, model, request_ids=requests)
    except InvalidInputError as exc:
        if placement is not None:
            hint = ""
        elif stack == "sglang":
            hint = " (physical ids? give the serving placement with --placement)"
        else:
            hint = " (vLLM R3 ids are logical: is this SGLang's R3? import it as sglang with its placement)"
        raise fail(path, f"{exc.args[0].split(': ', 1)[-1]}{hint}") from None
