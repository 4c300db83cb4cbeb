"""Token permutation kernels for expert-parallel MoE (kernel -> checked wrapper -> op).

- :mod:`placer.kernels.reference`: NumPy reference (the definition), :func:`slot_map` (the
  logical-to-slot map of placer's dispatch rule) and :func:`split_sizes`.
- :mod:`placer.kernels.ops`: the torch ops :func:`permute` and :func:`unpermute` (checked
  host wrappers; torch backend for CPU and CUDA, Triton backend for CUDA).
- :mod:`placer.kernels._triton`: the Triton kernels.

torch and triton are imported on first use of the ops, never by ``import placer.kernels``.
"""

from __future__ import annotations

from placer.errors import MissingDependencyError
from placer.kernels.reference import (
    permute_reference,
    slot_map,
    split_sizes,
    unpermute_reference,
)

_TORCH_OPS = ("Permuted", "permute", "unpermute", "route", "row_map_of")

__all__ = ["permute_reference", "slot_map", "split_sizes", "unpermute_reference", *_TORCH_OPS]


def __getattr__(name: str):
    if name in _TORCH_OPS:
        try:
            from placer.kernels import ops as _ops  # deferred: ops imports torch (runtime extra)
        except ImportError as exc:
            if getattr(exc, "name", None) != "torch":
                raise
            raise MissingDependencyError("torch", "runtime", f"placer.kernels.{name}") from None
        return getattr(_ops, name)
    raise AttributeError(f"module 'placer.kernels' has no attribute {name!r}")
