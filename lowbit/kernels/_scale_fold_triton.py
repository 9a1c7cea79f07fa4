"""Triton side of the group-scale fold (imported lazily; see lowbit/kernels/scale_fold.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._quant_math_triton import _exp2i, _floor_log2

NAN_ROW: tl.constexpr = tl.constexpr(1 << 20)  # a row's top exponent when one of its scales is NaN


@triton.jit
def _row_top_kernel(s_ptr, top_ptr, row_ptr, R, NG, ssr, ssg, HEADROOM: tl.constexpr, BR: tl.constexpr,
                    BG: tl.constexpr):
    # top[r] = floor(log2(max_g scale[r, g])) (NAN_ROW if a scale is NaN); row[r] = 2^(top - HEADROOM).
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = rows < R
    best = tl.zeros([BR], dtype=tl.float32)
    nan = tl.zeros([BR], dtype=tl.int32)
    for g0 in range(0, NG, BG):
        gs = g0 + tl.arange(0, BG)
        s = tl.load(s_ptr + rows.to(tl.int64)[:, None] * ssr + gs[None, :] * ssg,
                    rm[:, None] & (gs[None, :] < NG), other=0.0)
        nan = tl.maximum(nan, tl.max((s != s).to(tl.int32), 1))
        best = tl.maximum(best, tl.max(tl.where(s == s, s, 0.0), 1))
    top = _floor_log2(best)  # scales are powers of two down to 2^-127 (fp32's exponent field 0)
    row = _exp2i(top - HEADROOM)
    nan_f = (best.to(tl.int32, bitcast=True) * 0 + 0x7FC00000).to(tl.float32, bitcast=True)
    tl.store(top_ptr + rows, tl.where(nan > 0, NAN_ROW, top), rm)
    tl.store(row_ptr + rows, tl.where(nan > 0, nan_f, row), rm)


@triton.jit
def _fold_kernel(d_ptr, s_ptr, top_ptr, out_ptr, R, K, sdr, ssr, ssg, sor, G: tl.constexpr,
                 HEADROOM: tl.constexpr, MBITS: tl.constexpr, EB: tl.constexpr, BR: tl.constexpr,
                 BC: tl.constexpr):
    # out[r, k] = fp8 bits of value(code[r, k]) * 2^(log2 scale[r, k // G] - top[r] + HEADROOM),
    # rounded to nearest even where that falls below the fp8 normals; NaN rows 0x7F. Integer
    # operations only: the value is S * 2^(ev - 1 + e), S in {2, 3} (E2M1's two significant bits).
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (rows[:, None] < R) & (cols[None, :] < K)
    cb = tl.program_id(1) * (BC // 2) + tl.arange(0, BC // 2)
    byte = tl.load(d_ptr + rows.to(tl.int64)[:, None] * sdr + cb[None, :],
                   (rows[:, None] < R) & (cb[None, :] < K // 2), other=0).to(tl.int32)
    c = tl.reshape(tl.join(byte & 0xF, byte >> 4), [BR, BC])  # element 2i was the low nibble
    # One scale a group, its shift broadcast over the group's G elements.
    gs = tl.program_id(1) * (BC // G) + tl.arange(0, BC // G)
    s = tl.load(s_ptr + rows.to(tl.int64)[:, None] * ssr + gs[None, :] * ssg,
                (rows[:, None] < R) & (gs[None, :] < tl.cdiv(K, G)), other=1.0)
    top = tl.load(top_ptr + rows, rows < R, other=0)
    e_g = _floor_log2(s) - top[:, None] + HEADROOM  # the group's shift: <= HEADROOM
    e = tl.reshape(tl.broadcast_to(e_g[:, :, None], [BR, BC // G, G]), [BR, BC])
    mag = c & 7  # E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6
    ev = tl.where(mag >= 2, (mag >> 1) - 1, -1)  # exponent; 0.5 is 2 * 2^-2
    sig = tl.where(mag >= 2, 2 + (mag & 1), 2)  # significand S in halves
    field = ev + e + EB  # the fp8 biased exponent, if the value is normal there
    normal = (field << MBITS) | ((sig - 2) << (MBITS - 1))
    # Below the normals: value / smallest subnormal = S * 2^(field + MBITS - 2), rounded half to even.
    up = field + MBITS - 2
    sh = tl.minimum(tl.maximum(-up, 0), 8)  # S < 4: a shift of 3 or more leaves 0 either way
    q = sig >> sh
    rem = sig - (q << sh)
    half = (1 << sh) >> 1
    q += ((sh > 0) & ((rem > half) | ((rem == half) & ((q & 1) == 1)))).to(tl.int32)
    sub = tl.where(up >= 0, sig << tl.maximum(up, 0), q)
    bits = tl.where(field >= 1, normal, sub)
    bits = tl.where(mag == 0, 0, bits) | ((c & 8) << 4)
    bits = tl.where(top[:, None] == NAN_ROW, 0x7F, bits)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * sor + cols[None, :], bits.to(tl.uint8), m)
