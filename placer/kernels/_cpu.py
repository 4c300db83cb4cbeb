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

from placer._numba import njit


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
