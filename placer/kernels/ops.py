"""The permute/unpermute ops on torch tensors: checked host wrappers over two backends.

- ``torch``: plain torch ops (index_select; a fixed-order multiply-add over k), on CPU or CUDA.
- ``triton``: the kernels of :mod:`placer.kernels._triton`, on CUDA, or on CPU tensors under
  ``TRITON_INTERPRET=1`` (tests only: the interpreter is slow).

``backend="auto"`` picks ``triton`` for CUDA tensors when triton is installed, else ``torch``.
The row map (which row each (token, k) copy goes to) is computed with torch on the tensors'
device by a stable sort, so it is the same on every backend. Semantics are those of
:mod:`placer.kernels.reference`. An expert-parallel step on one rank is::

    smap = torch.as_tensor(slot_map(placement, topology, layer, rank=rank, table=table))
    p = permute(x, topk_ids, smap, placement.num_slots)
    send = split_sizes(p.slot_counts, placement.slots_per_gpu).tolist()  # rows per rank
    ...all_to_all(p.rows, send) -> expert compute -> all_to_all back into `rows`...
    y = unpermute(rows, p.row_map, topk_weights)
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch

from placer.errors import InvalidInputError, MissingDependencyError
from placer.kernels import _cpu

BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = (torch.int16, torch.int32, torch.int64, torch.uint8)
# Tokens per step of the CPU unpermute: keeps the float32 accumulator in cache.
_CPU_CHUNK = 128


class Permuted(NamedTuple):
    """Result of :func:`permute`.

    rows : (T * K, H), dtype of x: rows sorted by slot, stable by (token, k).
    row_map : int64 (T, K): row of copy k of token t.
    slot_counts : int64 (P,): rows per slot; rows of slot p follow those of slots < p.
    """

    rows: torch.Tensor
    row_map: torch.Tensor
    slot_counts: torch.Tensor


def _bad(message: str, source: str) -> InvalidInputError:
    return InvalidInputError(message, source=source)


def _check_tensor(name: str, t, ndim: int, dtypes: tuple, source: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise _bad(f"{name} must be a torch.Tensor, got {type(t).__name__}", source)
    if t.ndim != ndim:
        raise _bad(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}", source)
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise _bad(f"{name} has dtype {t.dtype}; expected one of {names}", source)


def _check_range(name: str, t: torch.Tensor, high: int, source: str) -> None:
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= high:
            raise _bad(f"{name} must lie in [0, {high}), found values in [{lo}, {hi}]", source)


def _check_device(device: torch.device, source: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise _bad(f"{name} is on {t.device}, expected {device}", source)


def _check_out(out, shape: tuple, dtype: torch.dtype, device: torch.device,
               source: str) -> torch.Tensor:
    """The caller's output buffer after checks, or a new one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor):
        raise _bad(f"out must be a torch.Tensor, got {type(out).__name__}", source)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise _bad(f"out must be {shape} {dtype} on {device}, got {tuple(out.shape)} "
                   f"{out.dtype} on {out.device}", source)
    if not out.is_contiguous():
        raise _bad("out must be contiguous", source)
    return out


def _use_triton(backend: str, device: torch.device, source: str) -> bool:
    if backend not in BACKENDS:
        raise _bad(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}", source)
    if backend == "torch":
        return False
    try:
        import triton  # noqa: F401  # deferred: triton, an optional extra
    except ImportError:
        if backend == "triton":
            raise MissingDependencyError("triton", "kernels", "backend='triton'") from None
        return False
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "auto":
        return device.type == "cuda" and not interpret
    if device.type != "cuda" and not interpret:
        raise _bad(f"backend 'triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 "
                   "set before triton is imported", source)
    return True


def route(topk_ids: torch.Tensor, slot_map: torch.Tensor) -> torch.Tensor:
    """Slot of every (token, k): int64 (T, K), from int (T, K) ids and an (E,) or (T, E) map."""
    ids = topk_ids.long()
    smap = slot_map.long()
    return smap[ids] if smap.ndim == 1 else torch.gather(smap, 1, ids)


def row_map_of(slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """(row_map (T, K), order (T*K,), slot_counts (P,)), all int64, from slots int64 (T, K).

    ``order[r]`` is the flat (t, k) index held by row ``r`` (a stable sort by slot).
    """
    flat = slots.reshape(-1)
    if flat.device.type == "cpu":  # a counting sort: slots are few, the rows many
        flat = flat.contiguous()
        order, row_map = torch.empty_like(flat), torch.empty_like(flat)
        counts = torch.empty(num_slots, dtype=torch.int64)
        _cpu.counting_sort(flat.numpy(), num_slots, order.numpy(), row_map.numpy(), counts.numpy())
        return row_map.view(slots.shape), order, counts
    order = torch.sort(flat, stable=True).indices
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.bincount(flat, minlength=num_slots)
    return row_map.view(slots.shape), order, counts


def permute(x: torch.Tensor, topk_ids: torch.Tensor, slot_map: torch.Tensor, num_slots: int,
            *, backend: str = "auto", out: torch.Tensor | None = None) -> Permuted:
    """Copy each token to K rows sorted by the physical slot of its top-k logical experts.

    Parameters
    ----------
    x : torch.Tensor, shape (T, H), float16 / bfloat16 / float32.
    topk_ids : torch.Tensor, shape (T, K), integer, logical expert ids in ``[0, E)``.
    slot_map : torch.Tensor, shape (E,) or (T, E), integer, slots in ``[0, num_slots)``; from
        :func:`placer.kernels.slot_map` (placer's dispatch rule).
    num_slots : int, P (slots per layer over all ranks).
    backend : ``"auto"``, ``"torch"`` or ``"triton"``.
    out : torch.Tensor, shape (T*K, H), dtype and device of x, contiguous, optional: a buffer
        to write the rows into (reuse it across steps to avoid allocating).

    Returns
    -------
    Permuted(rows (T*K, H), row_map int64 (T, K), slot_counts int64 (P,)), on x's device.

    Raises
    ------
    InvalidInputError (a ValueError) for a wrong type, shape, dtype, device or id range.
    """
    src = "permute"
    _check_tensor("x", x, 2, FLOAT_DTYPES, src)
    _check_tensor("topk_ids", topk_ids, 2, INT_DTYPES, src)
    if not isinstance(slot_map, torch.Tensor) or slot_map.ndim not in (1, 2):
        raise _bad(f"slot_map must be a 1-D (E,) or 2-D (T, E) tensor, got "
                   f"{getattr(slot_map, 'shape', type(slot_map).__name__)}", src)
    _check_tensor("slot_map", slot_map, slot_map.ndim, INT_DTYPES, src)
    if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
        raise _bad(f"num_slots must be a positive int, got {num_slots!r}", src)
    tokens = x.shape[0]
    if topk_ids.shape[0] != tokens:
        raise _bad(f"topk_ids has {topk_ids.shape[0]} tokens, x has {tokens}", src)
    if slot_map.ndim == 2 and slot_map.shape[0] != tokens:
        raise _bad(f"a per-token slot_map needs {tokens} rows, got {slot_map.shape[0]}", src)
    _check_device(x.device, src, topk_ids=topk_ids, slot_map=slot_map)
    num_experts = slot_map.shape[-1]
    _check_range("topk_ids", topk_ids, num_experts, src)
    _check_range("slot_map", slot_map, num_slots, src)
    use_triton = _use_triton(backend, x.device, src)
    num_rows = tokens * topk_ids.shape[1]
    out = _check_out(out, (num_rows, x.shape[1]), x.dtype, x.device, src)

    row_map, order, counts = row_map_of(route(topk_ids, slot_map), num_slots)
    x = x.contiguous()
    if use_triton:
        from placer.kernels._triton import permute_rows  # deferred: triton, an optional extra

        rows = permute_rows(x, row_map, out)
    else:
        source = order // max(topk_ids.shape[1], 1)
        if x.device.type == "cpu" and x.numel() and num_rows and (x.shape[1] * x.element_size()) % 4 == 0:
            words = x.shape[1] * x.element_size() // 4
            _cpu.gather_rows(x.view(torch.uint8).numpy().view(np.uint32).reshape(tokens, words), source.numpy(),
                        out.view(torch.uint8).numpy().view(np.uint32).reshape(num_rows, words))
            rows = out
        else:
            rows = torch.index_select(x, 0, source, out=out)
    return Permuted(rows, row_map, counts)


def unpermute(rows: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor, *,
              out_dtype: torch.dtype | None = None, backend: str = "auto",
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Combine each token's K rows: ``out[t] = sum_k weights[t, k] * rows[row_map[t, k]]``.

    Accumulates in float32 in the order k = 0..K-1, without atomics (deterministic).

    Parameters
    ----------
    rows : torch.Tensor, shape (N, H), float16 / bfloat16 / float32.
    row_map : torch.Tensor, shape (T, K), integer, rows in ``[0, N)`` (from :func:`permute`).
    weights : torch.Tensor, shape (T, K), floating (computed in float32).
    out_dtype : output dtype (default: ``rows.dtype``).
    backend : ``"auto"``, ``"torch"`` or ``"triton"``.
    out : torch.Tensor, shape (T, H), ``out_dtype``, rows' device, contiguous, optional buffer.

    Returns
    -------
    torch.Tensor, shape (T, H), ``out_dtype``, on rows' device.
    """
    src = "unpermute"
    _check_tensor("rows", rows, 2, FLOAT_DTYPES, src)
    _check_tensor("row_map", row_map, 2, INT_DTYPES, src)
    _check_tensor("weights", weights, 2, FLOAT_DTYPES, src)
    out_dtype = rows.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise _bad(f"out_dtype {out_dtype} is not a supported float dtype", src)
    if tuple(weights.shape) != tuple(row_map.shape):
        raise _bad(f"weights has shape {tuple(weights.shape)}, row_map "
                   f"{tuple(row_map.shape)}; they must match (T, K)", src)
    _check_device(rows.device, src, row_map=row_map, weights=weights)
    _check_range("row_map", row_map, rows.shape[0], src)
    use_triton = _use_triton(backend, rows.device, src)
    out = _check_out(out, (row_map.shape[0], rows.shape[1]), out_dtype, rows.device, src)

    rows = rows.contiguous()
    row_map = row_map.long().contiguous()
    weights = weights.float().contiguous()
    if use_triton:
        from placer.kernels._triton import unpermute_rows  # deferred: triton, an optional extra

        return unpermute_rows(rows, row_map, weights, out)
    if rows.device.type == "cpu" and rows.dtype in _CPU_DTYPES and out.dtype in _CPU_DTYPES:
        return _unpermute_cpu(rows, row_map, weights, out)
    return _unpermute_torch(rows, row_map, weights, out)


_CPU_DTYPES = (torch.bfloat16, torch.float32)


def _unpermute_cpu(rows: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
    """CPU bfloat16/float32 backend of :func:`unpermute`: one numba pass per token (``_cpu.py``),
    bit-exact with the torch backend."""
    none16, none32 = np.zeros((0, 0), np.uint16), np.zeros((0, 0), np.float32)
    in_bf16, out_bf16 = rows.dtype == torch.bfloat16, out.dtype == torch.bfloat16
    if in_bf16 and rows.shape[1] % 2 == 0 and rows.shape[1] > 0:
        rows32 = rows.view(torch.int16).numpy().view(np.uint32)
        out32 = out.view(torch.int16).numpy().view(np.uint32) if out_bf16 else np.zeros((0, 0), np.uint32)
        _cpu.unpermute_bf16_pairs(rows32, row_map.numpy(), weights.numpy(), out32,
                             none32 if out_bf16 else out.numpy(), out_bf16)
        return out
    rows_np = rows.view(torch.int16).numpy().view(np.uint16) if in_bf16 else rows.numpy()
    out_np = out.view(torch.int16).numpy().view(np.uint16) if out_bf16 else out.numpy()
    _cpu.unpermute_rows(rows_np if in_bf16 else none16, none32 if in_bf16 else rows_np, row_map.numpy(),
                   weights.numpy(), out_np if out_bf16 else none16, none32 if out_bf16 else out_np,
                   in_bf16, out_bf16)
    return out


def _unpermute_torch(rows: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
    """Torch backend of :func:`unpermute`; in token chunks on CPU (cache-sized temporaries)."""
    tokens, top_k = row_map.shape
    hidden = rows.shape[1]
    if top_k == 0:
        return out.zero_()
    chunk = _CPU_CHUNK if rows.device.type == "cpu" else max(tokens, 1)
    map_t, w_t = row_map.t().contiguous(), weights.t().contiguous()  # (K, T)
    acc = torch.empty((min(chunk, tokens), hidden), dtype=torch.float32, device=rows.device)
    tmp = torch.empty_like(acc)
    gathered = torch.empty((acc.shape[0], hidden), dtype=rows.dtype, device=rows.device)
    for start in range(0, tokens, chunk):
        stop = min(tokens, start + chunk)
        n = stop - start
        a, g, f = acc[:n], gathered[:n], tmp[:n]
        for k in range(top_k):
            torch.index_select(rows, 0, map_t[k, start:stop], out=g)
            w = w_t[k, start:stop, None]
            if k == 0:
                torch.mul(g, w, out=a)
            else:
                torch.mul(g, w, out=f)  # product rounded to float32, then added: the reference
                a.add_(f)
        out[start:stop].copy_(a)
    return out
