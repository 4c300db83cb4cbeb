"""The MoE block the EP runtime serves, its authoritative weights and its single-process reference.

Every MoE layer ``l`` has a router ``router[l]: [E, H]`` and ``E`` SwiGLU experts; expert ``e``
of layer ``l`` is one flat float32 vector ``experts[l, e]: [3 * F * H]`` holding, in order,
``w1: [F, H]`` (gate), ``w3: [F, H]`` (up) and ``w2: [H, F]`` (down)::

    expert(x) = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T

Routing is Mixtral's: logits ``x @ router[l].T`` (computed in float64, so that a rank routing its
own tokens picks the same experts as the reference routing the whole batch), the top-k logits,
and a softmax over those k as the combine weights. A layer adds its output to its input
(``x <- x + moe_l(x)``), so later layers route on what earlier layers computed.

The controller keeps :class:`ExpertWeights` (numpy, in the driver): the authoritative copy from
which any rank can be rebuilt, and the per-expert checksums a migrated expert is verified against.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from placer.errors import InvalidInputError
from placer.types import ModelSpec

__all__ = ["ExpertWeights", "expert_forward", "init_weights", "reference_forward", "route",
           "weight_checksum"]


@dataclass(frozen=True)
class ExpertWeights:
    """Authoritative weights of a model's routed experts and routers (float32, read-only).

    router : float32 [L, E, H]; experts : float32 [L, E, 3 * F * H] (w1, w3, w2 flattened);
    checksums : object [L, E] of str, :func:`weight_checksum` of every expert.
    """

    router: np.ndarray
    experts: np.ndarray
    hidden_size: int
    ffn_size: int
    top_k: int
    checksums: np.ndarray

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.experts.shape[1])

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights as the runtime holds them (float32)."""
        return int(self.experts.shape[2] * 4)


def weight_checksum(flat: np.ndarray) -> str:
    """Checksum of one expert's weights: blake2b-64 of its float32 bytes, hex."""
    return hashlib.blake2b(np.ascontiguousarray(flat, dtype=np.float32).tobytes(),
                           digest_size=8).hexdigest()


def init_weights(model: ModelSpec, *, seed: int = 0) -> ExpertWeights:
    """Seeded random weights with ``model``'s shapes (``hidden_size``, ``expert_ffn_size``).

    Scales keep activations O(1) through the layers: ``w1, w3 ~ N(0, 1/H)``, ``w2 ~ N(0, 1/F)``,
    router ``~ N(0, 1/H)``. Raises InvalidInputError when the model's sizes are unknown.
    """
    if not model.sizes_known:
        raise InvalidInputError(f"model {model.name} has unknown hidden or expert FFN size",
                                source="model")
    h, f = model.hidden_size, model.expert_ffn_size
    num_layers, e = model.num_moe_layers, model.num_experts
    rng = np.random.default_rng(seed)
    router = (rng.standard_normal((num_layers, e, h)) / np.sqrt(h)).astype(np.float32)
    w13 = (rng.standard_normal((num_layers, e, 2 * f * h)) / np.sqrt(h)).astype(np.float32)
    w2 = (rng.standard_normal((num_layers, e, h * f)) / np.sqrt(f)).astype(np.float32)
    experts = np.concatenate([w13, w2], axis=2)
    sums = np.array([[weight_checksum(experts[i, j]) for j in range(e)] for i in range(num_layers)],
                    dtype=object)
    for a in (router, experts):
        a.flags.writeable = False
    return ExpertWeights(router, experts, h, f, model.top_k, sums)


def rms_norm(x, eps: float = 1e-6):
    """Pre-norm of every MoE layer (RMS, no weight), so deep stacks of random experts stay finite:
    ``x / sqrt(mean(x^2) + eps)`` per token, float32 ``[T, H]``."""
    import torch  # deferred: torch is an optional extra (runtime)

    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


def route(x, router, top_k: int):
    """Top-k experts and combine weights of every token.

    ``x``: float32 tensor [T, H]; ``router``: float32 tensor [E, H]. Returns (int64 [T, K] ids,
    float32 [T, K] weights: softmax over the k largest logits, computed in float64).
    """
    import torch  # deferred: torch is an optional extra (runtime)

    logits = x.double() @ router.double().T
    top, ids = torch.topk(logits, top_k, dim=1)
    return ids, torch.softmax(top, dim=1).float()


def expert_forward(x, flat, hidden_size: int, ffn_size: int):
    """SwiGLU of one expert on rows ``x: [N, H]`` with flat weights ``[3 * F * H]``. -> [N, H]."""
    import torch  # deferred: torch is an optional extra (runtime)

    fh = ffn_size * hidden_size
    w1 = flat[:fh].view(ffn_size, hidden_size)
    w3 = flat[fh:2 * fh].view(ffn_size, hidden_size)
    w2 = flat[2 * fh:].view(hidden_size, ffn_size)
    return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def reference_forward(weights: ExpertWeights, x):
    """Single-process forward of all MoE layers on ``x: [T, H]`` (float32 tensor). -> [T, H].

    Each layer: RMS-normalise (:func:`rms_norm`), route, permute by logical expert, one SwiGLU
    per expert, unpermute (the fixed-order float32 combine of :func:`placer.kernels.unpermute`),
    add to the layer's input.
    """
    import torch  # deferred: torch is an optional extra (runtime)

    from placer.kernels.ops import permute, unpermute  # deferred: ops imports torch (runtime extra)

    x = x.float()
    identity = torch.arange(weights.num_experts)
    for layer in range(weights.num_layers):
        router = torch.from_numpy(weights.router[layer].copy())
        h = rms_norm(x)
        ids, w = route(h, router, weights.top_k)
        p = permute(h, ids, identity, weights.num_experts, backend="torch")
        out = torch.empty_like(p.rows)
        start = 0
        for e, n in enumerate(p.slot_counts.tolist()):
            if n:
                flat = torch.from_numpy(weights.experts[layer, e].copy())
                out[start:start + n] = expert_forward(p.rows[start:start + n], flat,
                                                      weights.hidden_size, weights.ffn_size)
            start += n
        x = x + unpermute(out, p.row_map, w, backend="torch")
    return x
