"""Triton side of the column quantizer's folded output (imported lazily; see
lowbit/kernels/column_quantize.py): MXFP4 groups of a strided-K operand rotated, quantized and
written as e4m3 values with one fp32 scale per 1 x 128 chunk or 128 x 128 tile, as
lowbit.quant.scale_fold.fold_blocks folds the reference's codes, bit for bit.

A program holds 128 rows by one 128-wide chunk along K: four groups of 32. A first pass over them
finds the chunk's (or tile's) largest group scale; a second rotates and rounds each group as the
column quantizer does it (_column_quantize_triton.py), its E2M1 codes one per byte, and each word
of four codes becomes four e4m3 bytes by integer operations on the whole word: the value of code c
of a group d binades below the block's largest is E2M1(c) · 2^(6 - d) (6: the e4m3 headroom), whose
exponent field and mantissa follow from c's magnitude bits, with no carry between bytes while
every value stays an e4m3 normal (d <= 11). A block with a group further down, among its nonzero
codes, takes the slower per-code path that rounds below the normals to nearest even
(_scale_fold_triton._fp8_any), as the reference's cast does.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._column_quantize_triton import _group_words, _program_rows, _rotated_group, _store_words
from lowbit.kernels._quant_math_triton import _exp2i, _floor_log2, _nan_like, _scales
from lowbit.kernels._scale_fold_triton import _fp8_any

_HEADROOM: tl.constexpr = tl.constexpr(6)  # lowbit.quant.scale_fold.HEADROOM[e4m3]
_NAN_TOP: tl.constexpr = tl.constexpr(128)  # _floor_log2 of a NaN scale: above every finite one
_MAX_SHIFT: tl.constexpr = tl.constexpr(11)  # E2M1's 0.5 at 2^(6 - 11): e4m3's smallest normal


@triton.jit
def _e4m3_word(w, d):
    # Four E2M1 byte codes (sign in bit 3) -> four e4m3 bytes of E2M1(c) · 2^(6 - d), for
    # 0 <= d <= 11. With m = c & 7, the e4m3 byte of magnitude m at d = 0 is 0x60 + 4m for m >= 2
    # (exponent (m >> 1) + 12, mantissa m & 1) and 0x60 for m = 1 (0.5 · 64 = 2^5); d takes 8d off
    # its exponent field. Per byte: nz = (m >= 1), ge2 = (m >= 2), both from bit 3 of m + 7 and
    # m + 6; no byte sum exceeds 0x7C, so no carry reaches the next byte.
    m = w & 0x07070707
    nz = ((m + 0x07070707) >> 3) & 0x01010101
    ge2 = ((m + 0x06060606) >> 3) & 0x01010101
    mag = (m << 2) + nz * (0x5C - 8 * d) + (ge2 << 2)
    return mag | ((w & 0x08080808) << 4)


@triton.jit
def _e4m3_word_rounded(w, d):
    # The same for any d >= 0, byte by byte, values below e4m3's normals rounded to nearest even.
    out = tl.zeros_like(w)
    for j in tl.static_range(4):
        c = (w >> (8 * j)) & 0xF
        out = out | (_fp8_any(c, _HEADROOM - d, 3, 7) << (8 * j))
    return out


@triton.jit(do_not_specialize=["seed_off", "sign_off"])
def _column_fold_kernel(
    x_ptr, d_ptr, s_ptr, R, K, sxk, sdw, ssr, ssc, seed_off, sign_off,
    SMODE: tl.constexpr, SR: tl.constexpr, BR: tl.constexpr, TILE: tl.constexpr,
    HAD: tl.constexpr, LOG: tl.constexpr, SCALE: tl.constexpr, SIGNS: tl.constexpr,
    SEED_PTR: tl.constexpr = False,
):
    # x: R x K, element (r, k) at x_ptr + r + k * sxk, K a multiple of 128. Program (i, j): rows
    # i*BR.., chunk j (K indices 128j..). d_ptr: int32 words of the e4m3 bytes, row stride sdw
    # words. s_ptr: TILE=False, the chunk scales at r * ssr + j * ssc; TILE=True (BR = 128), the
    # tile's scale at i * ssr + j * ssc.
    # Two loops over the chunk's four groups (loops, not unrolled: four unrolled groups compiled
    # for many minutes): the first rotates each group for its scale only, the second rotates it
    # again (its 8 KB re-read from cache) and rounds, now that the block's top scale is known.
    G: tl.constexpr = 32
    seed_off, rows, rmask, signs = _program_rows(seed_off, sign_off, R, BR, HAD, SIGNS, SEED_PTR)
    top = tl.full([BR], -127, tl.int32)
    low = tl.full([BR], 127, tl.int32)  # the lowest scale of a group with a nonzero value
    for gi in range(4):
        _, amax = _rotated_group(x_ptr, rows, rmask, tl.program_id(1) * 128 + gi * G, sxk, signs, G, HAD,
                                 LOG, SCALE, SIGNS)
        s, _ = _scales(amax.to(tl.float32, bitcast=True), 1.0, 6.0, 2, SMODE)
        e = _floor_log2(s)  # a NaN scale gives 128, e8m0's largest 127
        top = tl.maximum(top, e)
        # A group whose amax is not 0 has a nonzero code: its largest value rounds to 4 or more.
        low = tl.where(amax != 0, tl.minimum(low, e), low)
    if TILE:
        top = tl.zeros_like(top) + tl.max(tl.where(rmask, top, -127), axis=0)
        low = tl.zeros_like(low) + tl.min(tl.where(rmask, low, 127), axis=0)
    nan_block = top == _NAN_TOP
    # every live group within _MAX_SHIFT of the top: the word path (NaN blocks take the other)
    fast = tl.max(tl.where(rmask & ((top - low > _MAX_SHIFT) | nan_block), 1, 0), axis=0) == 0
    for gi in range(4):
        k0 = tl.program_id(1) * 128 + gi * G
        v, amax = _rotated_group(x_ptr, rows, rmask, k0, sxk, signs, G, HAD, LOG, SCALE, SIGNS)
        s, eff = _scales(amax.to(tl.float32, bitcast=True), 1.0, 6.0, 2, SMODE)
        key = (rows.to(tl.int64) * K + k0 + seed_off).to(tl.uint32)
        words = _group_words(v, key, eff, seed_off, G, False, False, 1, 0, 2, 6.0, False, 3, SR, SMODE,
                             False, 0)
        d = top - _floor_log2(s)
        w0 = (tl.program_id(1) * 4 + gi) * 8
        if fast:  # (each branch stores: a compiled branch may not change a tuple's type)
            d = tl.minimum(d, _MAX_SHIFT)  # dead groups (all codes 0): any d gives their zeros
            out = ()
            for w in tl.static_range(8):
                out = out + (_e4m3_word(words[w], d),)
            _store_words(d_ptr, out, rows, rmask, sdw, w0, 8)
        else:
            d = tl.maximum(d, 0)
            out = ()
            for w in tl.static_range(8):
                out = out + (tl.where(nan_block, 0x7F7F7F7F, _e4m3_word_rounded(words[w], d)),)
            _store_words(d_ptr, out, rows, rmask, sdw, w0, 8)
    scale = _exp2i(top - _HEADROOM)
    scale = tl.where(nan_block, _nan_like(scale), scale)
    if TILE:
        first = tl.arange(0, BR) == 0
        tl.store(s_ptr + tl.program_id(0) * ssr + tl.program_id(1) * ssc + tl.zeros_like(rows), scale,
                 first)
    else:
        tl.store(s_ptr + rows * ssr + tl.program_id(1) * ssc, scale, rmask)
