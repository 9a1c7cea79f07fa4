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
def _fp8_normal(c, e, MBITS: tl.constexpr, EB: tl.constexpr):
    # fp8 bits of E2M1 code c times 2^e where that is an fp8 normal (or zero): E2M1 magnitude code
    # 2..7 is 2^((m >> 1) - 1) * (1 + (m & 1) / 2), code 1 is 0.5 (2^-1), so the fp8 exponent field
    # is (m >> 1) - 1 + e + EB and the mantissa is m's low bit, at the top of MBITS.
    mag = c & 7
    bits = (((mag >> 1) - 1 + e + EB) << MBITS) + (((mag & 1) * (mag >= 2)) << (MBITS - 1))
    return tl.where(mag == 0, 0, bits) | ((c & 8) << 4)


@triton.jit
def _fp8_any(c, e, MBITS: tl.constexpr, EB: tl.constexpr):
    # The same for any e <= HEADROOM: values below fp8's normals are rounded half to even onto its
    # subnormals. The value is S * 2^(ev - 1 + e) with S in {2, 3} (E2M1's two significant bits).
    mag = c & 7
    ev = tl.where(mag >= 2, (mag >> 1) - 1, -1)
    sig = tl.where(mag >= 2, 2 + (mag & 1), 2)
    field = ev + e + EB  # the fp8 biased exponent, if the value is normal there
    normal = (field << MBITS) | ((sig - 2) << (MBITS - 1))
    # Below the normals: value / smallest subnormal = S * 2^(field + MBITS - 2).
    up = field + MBITS - 2
    sh = tl.minimum(tl.maximum(-up, 0), 8)  # S < 4: a shift of 3 or more leaves 0 either way
    q = sig >> sh
    rem = sig - (q << sh)
    half = (1 << sh) >> 1
    q += ((sh > 0) & ((rem > half) | ((rem == half) & ((q & 1) == 1)))).to(tl.int32)
    sub = tl.where(up >= 0, sig << tl.maximum(up, 0), q)
    bits = tl.where(field >= 1, normal, sub)
    return tl.where(mag == 0, 0, bits) | ((c & 8) << 4)


@triton.jit
def _fold_kernel(d_ptr, s_ptr, top_ptr, out_ptr, R, K, sdr, ssr, ssg, sor, G: tl.constexpr,
                 HEADROOM: tl.constexpr, MBITS: tl.constexpr, EB: tl.constexpr, BR: tl.constexpr,
                 BC: tl.constexpr, FULL: tl.constexpr, CHUNK: tl.constexpr = False, scr=0, scc=0):
    # out[r, k] = fp8 bits of value(code[r, k]) * 2^(log2 scale[r, k // G] - top[r] + HEADROOM),
    # rounded to nearest even where that falls below the fp8 normals; NaN rows 0x7F. Integer
    # operations only, on the packed bytes: each byte's two codes (one group) become one 16-bit
    # word of two fp8 bytes (out_ptr is the fp8 matrix viewed as int16, sor in words).
    # Two launches: FULL=False writes the tiles whose values are all fp8 normals (or zero), FULL=True
    # the others (a group far below its row's largest). One path a compiled kernel keeps the
    # common one at 32 registers (96 with both behind a branch).
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cb = tl.program_id(1) * (BC // 2) + tl.arange(0, BC // 2)
    # One scale a group, its shift broadcast over the group's G / 2 bytes.
    gs = tl.program_id(1) * (BC // G) + tl.arange(0, BC // G)
    mg = (rows[:, None] < R) & (gs[None, :] < tl.cdiv(K, G))
    s = tl.load(s_ptr + rows.to(tl.int64)[:, None] * ssr + gs[None, :] * ssg, mg, other=1.0)
    if CHUNK:  # the tile's BC columns are one chunk: its rows' tops from the scales in hand,
        # and its scales (top_ptr: the chunk scales at r * scr + chunk * scc) written by FULL=False
        top = tl.max(tl.where(s == s, _floor_log2(s), NAN_ROW), axis=1)
        if not FULL:
            row = _exp2i(top - HEADROOM)
            nan_f = (row.to(tl.int32, bitcast=True) * 0 + 0x7FC00000).to(tl.float32, bitcast=True)
            tl.store(top_ptr + rows * scr + tl.program_id(1) * scc, tl.where(top == NAN_ROW, nan_f, row),
                     rows < R)
    else:
        top = tl.load(top_ptr + rows, rows < R, other=0)
    e_g = tl.where(mg, _floor_log2(s) - top[:, None] + HEADROOM, HEADROOM)  # <= HEADROOM
    normal = tl.min(tl.min(e_g, axis=1), axis=0) >= 2 - EB  # every value an fp8 normal (or zero)
    if normal != FULL:
        mb = (rows[:, None] < R) & (cb[None, :] < K // 2)
        byte = tl.load(d_ptr + rows.to(tl.int64)[:, None] * sdr + cb[None, :], mb, other=0).to(tl.int32)
        e = tl.reshape(tl.broadcast_to(e_g[:, :, None], [BR, BC // G, G // 2]), [BR, BC // 2])
        if FULL:
            lo = _fp8_any(byte & 0xF, e, MBITS, EB)
            hi = _fp8_any(byte >> 4, e, MBITS, EB)
        else:
            lo = _fp8_normal(byte & 0xF, e, MBITS, EB)
            hi = _fp8_normal(byte >> 4, e, MBITS, EB)
        word = tl.where(top[:, None] == NAN_ROW, 0x7F7F, lo | (hi << 8))  # element 2i in the low byte
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * sor + cb[None, :], word.to(tl.int16), mb)
