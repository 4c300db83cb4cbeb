"""Routing capture from a running transformers model through forward hooks on its routers.

transformers >= 5 gives every supported MoE family a router module whose
``forward(hidden[T, H]) -> (router_logits[T, E], top_k_weights[T, K], top_k_index[T, K])``
(``T = B * S`` tokens, batch-major). The routers are found generically: instances of the class
the model declares in ``_can_record_outputs["router_logits"]``, plus any module whose class name
ends in ``TopKRouter``/``TopkRouter``; the layer index comes from the module path
(``...layers.N...``).

One :class:`RouterRecorder` hooks every router (recording the outputs as they are, no copy, no
device sync) and the model itself: a pre-hook notes the input ids, the attention mask and whether
the KV cache is empty (prefill) or not (decode); a post-hook turns the forward's records into one
:class:`~placer.types.RoutingTrace` chunk ``[T', L, K]`` of the real tokens (padding dropped;
in decode, inputs equal to the pad id, i.e. finished sequences, dropped too), with ids sorted by
gate weight, and hands it to a sink. This works the same in a plain forward and in
``generate()``, which calls the model once for the prefill and once per decode step.

torch is imported lazily (inside functions); importing this module needs only numpy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from placer.errors import InvalidInputError
from placer.types import PHASE_CODES, ModelSpec, RoutingTrace

ROUTER_SUFFIXES = ("TopKRouter", "TopkRouter")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def router_classes(model: Any) -> tuple[type, ...]:
    """The router class(es) ``type(model)._can_record_outputs["router_logits"]`` declares."""
    declared = getattr(type(model), "_can_record_outputs", None) or {}
    rec = declared.get("router_logits") if isinstance(declared, dict) else None
    target = getattr(rec, "target_class", rec)
    return (target,) if isinstance(target, type) else ()


def find_routers(model: Any) -> list[tuple[int, str, Any]]:
    """``[(layer_index, module_path, router_module)]`` sorted by layer, one router per layer.

    Raises InvalidInputError when the model has no recognisable router or two in one layer.
    """
    declared = router_classes(model)
    found: dict[int, tuple[str, Any]] = {}
    for name, module in model.named_modules():
        cls = type(module)
        if not (isinstance(module, declared) if declared else False) and not cls.__name__.endswith(ROUTER_SUFFIXES):
            continue
        m = _LAYER.search(name)
        if m is None:
            continue
        layer = int(m.group(1))
        if layer in found:
            raise InvalidInputError(f"two router modules in layer {layer} ({found[layer][0]}, {name}); "
                                    "placer cannot tell which one routes this layer", source="--model")
        found[layer] = (name, module)
    if not found:
        raise InvalidInputError(
            f"{type(model).__name__} has no router module placer can hook (transformers >= 5 routers "
            "returning (logits, weights, top_k_index), class names ending in TopKRouter)", source="--model")
    return [(layer, name, module) for layer, (name, module) in sorted(found.items())]


def text_config(model: Any) -> Any:
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _first_attr(obj: Any, names: tuple[str, ...], default: Any = None) -> Any:
    for n in names:
        value = getattr(obj, n, None)
        if value is not None:
            return value
    return default


def model_spec(model: Any, name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a transformers MoE model: MoE layers from its routers, E and
    top-k from the router (else the config), sizes from the config."""
    routers = find_routers(model)
    cfg = text_config(model)
    router = routers[0][2]
    e = _first_attr(router, ("num_experts", "n_routed_experts"))
    if e is None and getattr(router, "weight", None) is not None:
        e = int(router.weight.shape[0])
    e = e or _first_attr(cfg, ("num_local_experts", "num_experts", "n_routed_experts"))
    k = _first_attr(router, ("top_k",)) or _first_attr(cfg, ("num_experts_per_tok", "top_k"))
    if e is None or k is None:
        raise InvalidInputError("cannot tell the expert count or top-k of this model", source="--model")
    groups = int(_first_attr(cfg, ("n_group",), 1) or 1)
    topk_groups = int(_first_attr(cfg, ("topk_group",), 1) or 1)
    if groups < 1 or int(e) % groups or not 1 <= topk_groups <= groups:
        groups, topk_groups = 1, 1
    return ModelSpec(
        name=name, num_hidden_layers=int(cfg.num_hidden_layers), moe_layer_ids=tuple(r[0] for r in routers),
        num_experts=int(e), top_k=int(k), hidden_size=int(getattr(cfg, "hidden_size", 0) or 0),
        expert_ffn_size=int(_first_attr(cfg, ("moe_intermediate_size", "intermediate_size"), 0) or 0),
        num_shared_experts=int(_first_attr(cfg, ("n_shared_experts", "num_shared_experts"), 0) or 0),
        num_groups=groups, topk_groups=topk_groups)


class RouterRecorder:
    """Hooks on every router of ``model`` and on ``model`` itself; one chunk per forward.

    Parameters
    ----------
    model : a transformers MoE model (``model_spec(model)`` gives ``spec``).
    spec : its ModelSpec (L MoE layers, E, K).
    sink : called with each forward's RoutingTrace [T', L, K] of real tokens (ids int16 sorted by
        gate weight, ``gate_weights`` float32, ``phase`` int8, ``request_ids`` int64 when
        ``request_ids`` is set).
    pad_token_id : decode inputs equal to it are dropped (finished sequences); None keeps all.

    Use as a context manager; ``request_ids`` (int64 [B]) names the rows of the next batch.
    """

    def __init__(self, model: Any, spec: ModelSpec, sink: Callable[[RoutingTrace], None], *,
                 pad_token_id: int | None = None):
        self.model, self.spec, self.sink, self.pad_token_id = model, spec, sink, pad_token_id
        self.routers = find_routers(model)
        self._ordinal = {id(module): i for i, (_, _, module) in enumerate(self.routers)}
        self._records: list[Any] = [None] * len(self.routers)
        self._inputs: dict[str, Any] = {}
        self._handles: list[Any] = []
        self.request_ids: np.ndarray | None = None
        self.forwards = 0

    def __enter__(self) -> RouterRecorder:
        for _, _, module in self.routers:
            self._handles.append(module.register_forward_hook(self._router_hook))
        self._handles.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._post_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _router_hook(self, module: Any, args: Any, out: Any) -> None:
        # Keep references only: the tensors are consumed once the whole forward has run.
        self._records[self._ordinal[id(module)]] = out

    def _pre_hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # "cache" in transformers 5.2x
        seen = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            seen = int(cache.get_seq_length())
        self._inputs = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask"),
                        "decode": seen > 0}
        self._records = [None] * len(self.routers)

    def _post_hook(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        self.forwards += 1
        self.sink(self._chunk())

    def _chunk(self) -> RoutingTrace:
        import torch  # deferred: optional extra (placer[profile]); the recorder runs inside a torch model

        spec = self.spec
        missing = [self.routers[i][1] for i, r in enumerate(self._records) if r is None]
        if missing:
            raise InvalidInputError(f"router {missing[0]} did not run in this forward", source="--model")
        bad = next((r for r in self._records if not (isinstance(r, tuple) and len(r) >= 3)), None)
        if bad is not None:
            raise InvalidInputError(f"router {type(self.routers[0][2]).__name__} returns {type(bad).__name__}, "
                                    "not (logits, weights, top_k_index)", source="--model")
        with torch.no_grad():
            index = torch.stack([r[2].reshape(-1, spec.top_k) for r in self._records], dim=1)  # [T, L, K]
            weight = torch.stack([r[1].reshape(-1, spec.top_k).float() for r in self._records], dim=1)
            order = torch.argsort(weight, dim=-1, descending=True, stable=True)
            index = torch.gather(index, -1, order)
            weight = torch.gather(weight, -1, order)
            ids_in, mask = self._inputs.get("input_ids"), self._inputs.get("attention_mask")
            t = index.shape[0]
            batch, seq = (ids_in.shape[0], ids_in.shape[-1]) if ids_in is not None else (1, t)
            if batch * seq != t:
                raise InvalidInputError(f"router saw {t} tokens for a [{batch}, {seq}] batch", source="--model")
            keep = torch.ones(batch, seq, dtype=torch.bool, device=index.device)
            if mask is not None and mask.dim() == 2:
                keep &= mask[:, -seq:].to(device=index.device).bool()
            decode = bool(self._inputs.get("decode"))
            if decode and self.pad_token_id is not None and ids_in is not None:
                keep &= ids_in.to(index.device) != self.pad_token_id
            keep = keep.reshape(-1)
            rows = torch.arange(batch, device=index.device).repeat_interleave(seq)[keep]
            ids_np = index[keep].cpu().numpy().astype(np.int16)
            w_np = weight[keep].cpu().numpy().astype(np.float32)
            rows_np = rows.cpu().numpy()
        self._records = [None] * len(self.routers)
        req = (self.request_ids[rows_np].astype(np.int64) if self.request_ids is not None
               else rows_np.astype(np.int64))
        phase = np.full(len(ids_np), PHASE_CODES["decode" if decode else "prefill"], np.int8)
        return RoutingTrace(ids_np, spec.num_experts, "sorted", gate_weights=w_np, request_ids=req,
                            phase=phase, model=spec)
