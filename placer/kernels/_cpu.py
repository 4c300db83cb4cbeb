"""CPU kernel of unpermute: one pass per token, float32 accumulation, bit-exact with the reference.

# rows_u16   : uint16 [N, H]  bfloat16 bits of the rows (when ``in_bf16``), else unused ([0, 0])
# rows_f32   : float32 [N, H] the rows (when not ``in_bf16``), else unused
# row_map    : int64 [T, K]   row of each (token, k)
# weights    : float32 [T, K]
# out_u16    : uint16 [T, H]  bfloat16 bits of the output (when ``out_bf16``), else unused
# out_f32    : float32 [T, H] the output (when not ``out_bf16``), else unused

Each product is rounded to float32 and added in the order k = 0..K-1 (the reference's order);
bfloat16 loads are exact (the high half of a float32) and stores round to nearest even, as
torch's conversion does (NaN stays NaN).
"""

from __future__ import annotations

import numpy as np

from placer._numba import HAVE_NUMBA, njit

if HAVE_NUMBA:
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _u32_as_f32(typingctx, x):  # pragma: no cover - numba
        """Reinterpret uint32 bits as a float32 (no conversion)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))
        return types.float32(types.uint32), codegen

    @intrinsic
    def _f32_as_u32(typingctx, x):  # pragma: no cover - numba
        """Reinterpret float32 bits as a uint32 (no conversion)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.uint32))
        return types.uint32(types.float32), codegen
else:  # pragma: no cover - exercised only without numba
    def _u32_as_f32(x):  # type: ignore[misc]  # numpy stand-in for the intrinsic (no numba)
        return np.array([x], np.uint32).view(np.float32)[0]

    def _f32_as_u32(x):  # type: ignore[misc]  # numpy stand-in for the intrinsic (no numba)
        return np.array([x], np.float32).view(np.uint32)[0]


@njit
def _bf16_bits(b):  # pragma: no cover - numba
    """Round float32 bits ``b`` to bfloat16 bits (nearest even; NaN stays NaN), as a uint32."""
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return (b >> np.uint32(16)) | np.uint32(0x40)
    return (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@njit
def counting_sort(flat, num_slots, order, row_map, counts):  # pragma: no cover - numba
    """Stable sort of ``flat`` int64 [R] (values in [0, num_slots)) by counting: fills ``order``
    [R] (the index held by each sorted position), ``row_map`` [R] (its inverse) and ``counts``
    [num_slots]. The same result as a stable argsort, in O(R)."""
    counts[:] = 0
    for i in range(flat.shape[0]):
        counts[flat[i]] += 1
    start = np.empty(num_slots, np.int64)
    total = 0
    for p in range(num_slots):
        start[p] = total
        total += counts[p]
    for i in range(flat.shape[0]):
        r = start[flat[i]]
        start[flat[i]] = r + 1
        order[r] = i
        row_map[i] = r


@njit
def gather_rows(x32, source, out32):  # pragma: no cover - numba
    """``out32[i] = x32[source[i]]``, eight rows at a time so eight copies stream at once (the
    gathers are bound by memory latency: eight streams run about 1.5x faster than one).

    # x32    : uint32 [T, W]  the token rows as 32-bit words
    # source : int64 [R]      the token each output row copies
    # out32  : uint32 [R, W]
    """
    rows = source.shape[0]
    width = x32.shape[1]
    i = 0
    while i + 8 <= rows:
        a0, a1, a2, a3 = x32[source[i]], x32[source[i + 1]], x32[source[i + 2]], x32[source[i + 3]]
        a4, a5, a6, a7 = x32[source[i + 4]], x32[source[i + 5]], x32[source[i + 6]], x32[source[i + 7]]
        o0, o1, o2, o3 = out32[i], out32[i + 1], out32[i + 2], out32[i + 3]
        o4, o5, o6, o7 = out32[i + 4], out32[i + 5], out32[i + 6], out32[i + 7]
        for j in range(width):
            o0[j] = a0[j]
            o1[j] = a1[j]
            o2[j] = a2[j]
            o3[j] = a3[j]
            o4[j] = a4[j]
            o5[j] = a5[j]
            o6[j] = a6[j]
            o7[j] = a7[j]
        i += 8
    while i < rows:
        out32[i, :] = x32[source[i], :]
        i += 1


@njit
def unpermute_bf16_pairs(rows32, row_map, weights, out32, out_f32, out_bf16):  # pragma: no cover
    """bfloat16 rows read two elements per uint32 word (even hidden size): the low half is
    element 2i, the high half element 2i+1; each half is a float32's high half, so the loads
    and the rounding stay in vectorisable 32-bit integer operations. Tokens go two at a time
    (an odd last token is paired with itself), so two rows stream from memory at once: the
    gathers are bound by memory latency, and two streams run about 1.4x faster than one.

    # rows32  : uint32 [N, H/2]  the bfloat16 rows, two per word
    # out32   : uint32 [T, H/2]  bfloat16 output, two per word (when ``out_bf16``)
    # out_f32 : float32 [T, H]   float32 output (when not ``out_bf16``)
    """
    tokens, top_k = row_map.shape
    half = rows32.shape[1]
    lo = np.zeros((2, half), np.float32)
    hi = np.zeros((2, half), np.float32)
    mask = np.uint32(0xFFFF0000)
    shift = np.uint32(16)
    for ta in range(0, tokens, 2):
        tb = min(ta + 1, tokens - 1)
        lo_a, hi_a, lo_b, hi_b = lo[0], hi[0], lo[1], hi[1]
        if top_k == 0:
            lo[:] = 0.0
            hi[:] = 0.0
        for k in range(top_k):
            src_a, src_b = rows32[row_map[ta, k]], rows32[row_map[tb, k]]
            wa, wb = weights[ta, k], weights[tb, k]
            if k == 0:
                for i in range(half):
                    a, b = src_a[i], src_b[i]
                    lo_a[i] = _u32_as_f32(a << shift) * wa
                    hi_a[i] = _u32_as_f32(a & mask) * wa
                    lo_b[i] = _u32_as_f32(b << shift) * wb
                    hi_b[i] = _u32_as_f32(b & mask) * wb
            else:
                for i in range(half):
                    a, b = src_a[i], src_b[i]
                    lo_a[i] += _u32_as_f32(a << shift) * wa
                    hi_a[i] += _u32_as_f32(a & mask) * wa
                    lo_b[i] += _u32_as_f32(b << shift) * wb
                    hi_b[i] += _u32_as_f32(b & mask) * wb
        for j, t in ((0, ta), (1, tb)):
            lo_t, hi_t = lo[j], hi[j]
            if out_bf16:
                dst = out32[t]
                for i in range(half):
                    dst[i] = (_bf16_bits(_f32_as_u32(hi_t[i])) << shift) | _bf16_bits(_f32_as_u32(lo_t[i]))
            else:
                for i in range(half):
                    out_f32[t, 2 * i] = lo_t[i]
                    out_f32[t, 2 * i + 1] = hi_t[i]


@njit
def unpermute_rows(rows_u16, rows_f32, row_map, weights, out_u16, out_f32, in_bf16, out_bf16):  # pragma: no cover
    tokens, top_k = row_map.shape
    hidden = rows_u16.shape[1] if in_bf16 else rows_f32.shape[1]
    ubuf = np.empty(hidden, np.uint32)
    fbuf = ubuf.view(np.float32)
    acc = np.zeros(hidden, np.float32)
    abits = acc.view(np.uint32)
    for t in range(tokens):
        for k in range(top_k):
            r = row_map[t, k]
            wk = weights[t, k]
            if in_bf16:
                src16 = rows_u16[r]
                for h in range(hidden):
                    ubuf[h] = np.uint32(src16[h]) << 16
                src = fbuf
            else:
                src = rows_f32[r]
            if k == 0:
                for h in range(hidden):
                    acc[h] = src[h] * wk
            else:
                for h in range(hidden):
                    acc[h] += src[h] * wk
        if top_k == 0:
            acc[:] = 0.0
        if out_bf16:
            dst = out_u16[t]
            for h in range(hidden):
                b = abits[h]
                if (b & np.uint32(0x7F800000)) == np.uint32(0x7F800000) and (b & np.uint32(0x007FFFFF)) != 0:
                    dst[h] = np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
                else:
                    dst[h] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        else:
            out_f32[t, :] = acc
