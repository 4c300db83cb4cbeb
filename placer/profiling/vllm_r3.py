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
"""

from __future__ import annotations

import os

import numpy as np

from placer.errors import InvalidInputError
from placer.io.common import fail, make_trace, moe_rows
from placer.io.r3 import read_placement_map, read_routed_experts
from placer.types import ModelSpec, RoutingTrace

STACKS = ("vllm", "sglang")
"""What ``import_r3(stack=...)`` accepts: vLLM ids are logical, SGLang ids physical."""


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
