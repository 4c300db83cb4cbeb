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

The saved outputs and their forms are read by :mod:`placer.io.r3` (see there).
:func:`import_r3` returns the whole trace; :func:`stream_r3` yields it chunk by chunk (memory
bounded by one chunk, not the file). Both map and check each piece with the same code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from placer.errors import InvalidInputError
from placer.io.common import fail, make_trace, moe_rows, rechunk
from placer.io.r3 import read_placement_map, read_routed_experts, routed_expert_pieces
from placer.io.routing import chunk_tokens_for
from placer.types import ModelSpec, RoutingTrace

STACKS = ("vllm", "sglang")
"""What ``import_r3(stack=...)`` accepts: vLLM ids are logical, SGLang ids physical."""

CHUNK_MB = 512.0
"""MiB of routing one chunk of :func:`stream_r3` takes (:func:`placer.io.routing.chunk_tokens_for`)."""

DEFAULT_CHUNK_TOKENS = 65536
"""Tokens per chunk of :func:`stream_r3` when no model gives the shape."""


def _resolve(path: str | os.PathLike[str], model: ModelSpec | None, placement: str | os.PathLike[str] | None,
             stack: str) -> tuple[np.ndarray | None, ModelSpec | None]:
    """``(physical_to_logical [L_moe, P] or None, model)``: the stack and placement checked, the
    placement read (its model fills in a missing ``model``)."""
    if stack not in STACKS:
        raise fail(path, f"unknown R3 stack {stack!r}; expected one of {', '.join(STACKS)}")
    if stack == "vllm" and placement is not None:
        raise fail(placement, "vLLM R3 ids are already logical (captured before its EPLB remap), so no placement "
                              "maps them; drop --placement (give --model for the shape) or, for SGLang R3, "
                              "say the stack is sglang")
    if placement is None:
        return None, model
    return read_placement_map(placement, model)


def _logical(path: str | os.PathLike[str], raw: np.ndarray, p2l: np.ndarray | None,
             model: ModelSpec | None) -> np.ndarray:
    """MoE-only logical ids of raw R3 ids ``[t, layers, K]`` (the whole file or one chunk): dense
    rows dropped through the model, physical slots mapped through ``p2l`` when given."""
    raw = moe_rows(path, raw, 1, model, what="R3 layer count")
    if p2l is None:
        return raw
    if raw.shape[1] != p2l.shape[0]:
        raise fail(path, f"{raw.shape[1]} MoE layers but the placement has {p2l.shape[0]}")
    if raw.size and (raw.min() < 0 or raw.max() >= p2l.shape[1]):
        bad = int(raw.min()) if raw.min() < 0 else int(raw.max())
        raise fail(path, f"physical expert id {bad} outside the placement's [0, {p2l.shape[1]}) slots")
    return p2l[np.arange(raw.shape[1])[None, :, None], raw]


def _trace(path: str | os.PathLike[str], ids: np.ndarray, model: ModelSpec | None, requests: np.ndarray, *,
           num_experts: int | None, mapped: bool, stack: str) -> RoutingTrace:
    """The checked trace of logical ids (the whole file or one chunk); a bad id's error says what
    the ids may really be (``mapped``: they went through a placement)."""
    try:
        return make_trace(path, ids, model, num_experts=num_experts, request_ids=requests)
    except InvalidInputError as exc:
        if mapped:
            hint = ""
        elif stack == "sglang":
            hint = " (physical ids? give the serving placement with --placement)"
        else:
            hint = " (vLLM R3 ids are logical: is this SGLang's R3? import it as sglang with its placement)"
        raise fail(path, f"{exc.args[0].split(': ', 1)[-1]}{hint}") from None


def import_r3(path: str | os.PathLike[str], *, model: ModelSpec | None = None,
              placement: str | os.PathLike[str] | None = None, stack: str = "vllm") -> RoutingTrace:
    """The logical routing trace ``[T, L, K]`` of saved R3 outputs of ``stack`` (vllm or sglang),
    read whole (:func:`stream_r3` reads it chunk by chunk).

    ``stack="vllm"``: the ids are logical already; giving ``placement`` is an error (mapping
    logical ids through a physical->logical table would corrupt them). ``stack="sglang"``: with
    ``placement`` each MoE layer's ids are physical slots mapped through its
    ``physical_to_logical``; without it they are taken as logical (true only for a trivial
    placement with no redundant experts).
    """
    p2l, model = _resolve(path, model, placement, stack)
    raw, requests = read_routed_experts(path, model)
    return _trace(path, _logical(path, raw, p2l, model), model, requests, num_experts=None,
                  mapped=p2l is not None, stack=stack)


def stream_r3(path: str | os.PathLike[str], *, model: ModelSpec | None = None,
              placement: str | os.PathLike[str] | None = None, stack: str = "vllm",
              chunk_tokens: int | None = None) -> Iterator[RoutingTrace]:
    """:func:`import_r3`'s trace as chunks of ``chunk_tokens`` tokens (default: :data:`CHUNK_MB`
    MiB of the model's routing, else :data:`DEFAULT_CHUNK_TOKENS`), the last one shorter; at least
    one chunk (empty when the file holds no token). Joined, the chunks are :func:`import_r3`'s
    trace. Memory is bounded by one chunk (and one request line of text), not the file.

    Every chunk is mapped and checked as the whole file is; bad data is an error naming ``path``
    when its chunk is reached. Without a model (nor a placement giving one) E is the largest id
    + 1: the file is read once more, first, to find it.
    """
    p2l, model = _resolve(path, model, placement, stack)
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for(model, CHUNK_MB) if model is not None else DEFAULT_CHUNK_TOKENS
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    num_experts = None
    if model is None:  # no placement either (it would give the model): ids are taken as they are
        hi = None
        for raw, _ in routed_expert_pieces(path, model, chunk_tokens):
            if raw.size:
                hi = int(raw.max()) if hi is None else max(hi, int(raw.max()))
        num_experts = None if hi is None else hi + 1  # None: no token, make_trace says so
    shape: tuple[int, ...] | None = None

    def pieces() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        nonlocal shape
        for raw, requests in routed_expert_pieces(path, model, chunk_tokens):
            shape = raw.shape[1:]
            yield raw, requests

    done = False
    for raw, requests in rechunk(pieces(), chunk_tokens):
        done = True
        yield _trace(path, _logical(path, raw, p2l, model), model, requests, num_experts=num_experts,
                     mapped=p2l is not None, stack=stack)
    if not done:  # every piece empty: one empty chunk of their shape, as the whole file gives
        assert shape is not None
        raw = np.zeros((0, *shape), np.int64)
        yield _trace(path, _logical(path, raw, p2l, model), model, np.zeros(0, np.int64),
                     num_experts=num_experts, mapped=p2l is not None, stack=stack)
