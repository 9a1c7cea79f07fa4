"""Triton side of the column quantizer (imported lazily, like every Triton module here): an
operand whose K axis is strided (X^T and dY^T for wgrad, W^T for dgrad: views of row-major
matrices, rows contiguous) rotated along K in Hadamard blocks and quantized in 1-D groups along
K, in one read.

Each thread holds whole groups of its rows: a group's G elements of a row are G separate loads,
one per K index, kept as a tuple of 1-D tensors over the program's rows. A warp's load of one K
index reads consecutive rows (adjacent in memory, coalesced), and the butterfly, the group amax,
the rounding and the packing of a group are then element-wise operations between those tensors:
no register exchange between threads and no shared memory. (The fused kernel's strided tiles,
LOWBIT_ROTATED_STRIDED, rotated across threads and reached ~0.2 of a copy; the rotation kernel
followed by the quantize kernel writes and re-reads the rotated operand in fp32.)

Bit for bit the reference: the rotation repeats lowbit/quant/hadamard.py's stages in its order
(_hadamard_triton.py), the scale and element math is _quant_math_triton.py's, and the noise key of
element (r, k) is r * K + k plus the seed offset, as for the row-major matrix it views.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._hash_triton import lowbias32
from lowbit.kernels._quant_math_triton import (
    _e2m1_magnitude,
    _noise_bits,
    _quant_tile,
    _scaled,
    _scales,
    _tensor_scale,
)


@triton.jit
def _e2m1_unmasked(y, k, SR: tl.constexpr):
    # FP4 E2M1 code of a scaled value y (sign in bit 3), as _quant_math_triton's _e2m1_codes(_sr)
    # give it for every finite y, without their per-element NaN test: a NaN y here only comes from
    # its group's NaN divisor (a NaN or Inf in the group), and the caller clears the whole group's
    # codes with one AND (_group_words). With SR (24-bit noise k, u = k / 2^24), |y| >= 1 takes
    # _e2m1_codes_sr's integer test; below 1, v = 2|y| and the code is floor(v) + (frac(v) > u),
    # which is (v > u) + (v - 1 > u) for v in [0, 2) (v - 1 is exact for v >= 1, negative below).
    b = y.to(tl.int32, bitcast=True)
    ba = b & 0x7FFFFFFF
    if SR:
        bs = tl.minimum(ba, 0x40C00000)  # 6.0
        hi = ((bs >> 22) - 252) + (((bs & 0x3FFFFF) << 2) > k).to(tl.int32)
        v = bs.to(tl.float32, bitcast=True) * 2.0
        u = k.to(tl.float32) * (1.0 / 16777216.0)
        lo = (v > u).to(tl.int32) + ((v - 1.0) > u).to(tl.int32)
        code = tl.where(bs >= 0x3F800000, hi, lo)
    else:
        code = _e2m1_magnitude(ba)
    return code | ((b >> 28) & 8)


@triton.jit
def _group_words(v, key, eff, seed_off, G: tl.constexpr, PACK: tl.constexpr, KIND_INT: tl.constexpr,
                 MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, FMAX: tl.constexpr,
                 HAS_INF: tl.constexpr, ENC: tl.constexpr, SR: tl.constexpr, SMODE: tl.constexpr,
                 HW_FP8: tl.constexpr, DIV: tl.constexpr):
    # A group's codes packed into little-endian int32 words: a tuple of G / 8 (4-bit codes, element
    # 2i in the low nibble of byte i) or G / 4 words (byte codes) of the rows' shape.
    # FP4: codes without a NaN test each, and a group whose divisor is NaN (a NaN or Inf in it, or
    # a NaN tensor scale) or 0 (an NVFP4 block scale that underflowed: y is +0 there) cleared by
    # one AND a word, as the reference stores code 0 for all of them.
    PER: tl.constexpr = 8 if PACK else 4
    keep = tl.where((eff == eff) & (eff != 0.0), -1, 0)
    words = ()
    for w in tl.static_range(G // PER):
        word = tl.zeros_like(key).to(tl.int32)
        for j in tl.static_range(PER):
            # (constexpr names assigned in an unrolled loop would be reassignments: written out)
            if ENC == 3:
                c = _e2m1_unmasked(_scaled(v[w * PER + j], eff, SMODE, DIV),
                                   _noise_bits(key + (w * PER + j), seed_off), SR)
            else:
                c = _quant_tile(v[w * PER + j], eff, key + (w * PER + j), seed_off, KIND_INT, MBITS, EMIN,
                                EMAX, FMAX, HAS_INF, ENC, SR, SMODE, HW_FP8, False, DIV)
            word = word | (c << (j * (4 if PACK else 8)))
        if ENC == 3:
            word = word & keep
        words = words + (word,)
    return words


@triton.jit
def _store_words(d_ptr, words, rows, rmask, sdw, w0, NW: tl.constexpr):
    # A group's NW words into row `rows` of the codes at words w0.., joined in registers four at a
    # time into [BR, 4] tiles (a 16-byte store a row). tl.join(a, b)[..., j] is a for j = 0: the
    # last axis alternates, so each join takes its list's even positions as a, the odd ones as b.
    r64 = rows.to(tl.int64)[:, None] * sdw
    if NW == 1:
        tl.store(d_ptr + r64 + w0 + tl.arange(0, 1)[None, :], words[0][:, None], rmask[:, None])
    elif NW == 2:
        tl.store(d_ptr + r64 + w0 + tl.arange(0, 2)[None, :], tl.join(words[0], words[1]), rmask[:, None])
    else:
        for c in tl.static_range(NW // 4):
            four = tl.join(tl.join(words[4 * c], words[4 * c + 2]),
                           tl.join(words[4 * c + 1], words[4 * c + 3]))
            tl.store(d_ptr + r64 + (w0 + 4 * c) + tl.arange(0, 4)[None, :],
                     tl.reshape(four, [rows.shape[0], 4]), rmask[:, None])


@triton.jit
def _block_signs(sign_off, HAD: tl.constexpr, SIGNS: tl.constexpr):
    # The random sign of each index of a Hadamard block: 1 - 2 * (lowbias32(i + seed * golden) & 1)
    # (groups start at multiples of HAD, so element i of a group has sign i mod HAD); () without.
    signs = ()
    if SIGNS:
        for i in tl.static_range(HAD):
            bit = lowbias32((sign_off + i).to(tl.uint32)) & 1
            signs = signs + (1.0 - 2.0 * bit.to(tl.float32),)
    return signs


@triton.jit
def _program_rows(seed_off, sign_off, R, BR: tl.constexpr, HAD: tl.constexpr, SIGNS: tl.constexpr,
                  SEED_PTR: tl.constexpr):
    # A program's prologue: the seed offset (loaded where SEED_PTR says the offsets are one-element
    # int64 tensors, lowbit.kernels.launch.seed_args), its rows and their mask, and the block signs.
    if SEED_PTR:
        seed_off = tl.load(seed_off)
        sign_off = tl.load(sign_off)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    return seed_off, rows, rows < R, _block_signs(sign_off, HAD, SIGNS)


@triton.jit
def _rotated_group(x_ptr, rows, rmask, k0, sxk, signs, G: tl.constexpr, HAD: tl.constexpr, LOG: tl.constexpr,
                   SCALE: tl.constexpr, SIGNS: tl.constexpr):
    # The group at K index k0 of `rows` (x's element (r, k) at x_ptr + r + k * sxk), rotated: a tuple
    # of G fp32 tensors over the rows, and the group amax as |x| int32 bits (integer max orders them
    # as floats and keeps NaN, above Inf, on top).
    v = ()
    p = x_ptr + rows + k0.to(tl.int64) * sxk
    for i in tl.static_range(G):
        xi = tl.load(p, rmask, other=0.0).to(tl.float32)
        p += sxk  # the next K index: one pointer add, not an index product
        if SIGNS:
            xi = xi * signs[i % HAD]  # a multiply, as the reference's
        v = v + (xi,)
    for s in tl.static_range(LOG):  # stage s pairs i with i + 2^s: (a + b, a - b)
        w = ()
        for i in tl.static_range(G):
            if (i >> s) & 1 == 0:
                w = w + (v[i] + v[i + (1 << s)],)
            else:
                w = w + (v[i - (1 << s)] - v[i],)
        v = w
    if LOG > 0:
        w = ()
        for i in tl.static_range(G):
            w = w + (v[i] * SCALE,)
        v = w
    amax = tl.zeros([rows.shape[0]], tl.int32)
    for i in tl.static_range(G):
        amax = tl.maximum(amax, v[i].to(tl.int32, bitcast=True) & 0x7FFFFFFF)
    return v, amax


@triton.jit(do_not_specialize=["seed_off", "sign_off"])
def _column_groups_kernel(
    x_ptr, d_ptr, s_ptr, ts_ptr, ta_ptr, R, K, sxk, sdw, ssr, ssc, seed_off, sign_off,
    MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, FMAX: tl.constexpr,
    HAS_INF: tl.constexpr, KIND_INT: tl.constexpr, ENC: tl.constexpr, PACK: tl.constexpr,
    SMODE: tl.constexpr, SR: tl.constexpr, BR: tl.constexpr, G: tl.constexpr, NG: tl.constexpr,
    HAD: tl.constexpr, LOG: tl.constexpr, SCALE: tl.constexpr, SIGNS: tl.constexpr,
    HW_FP8: tl.constexpr, DIV: tl.constexpr, AMAX: tl.constexpr, SEED_PTR: tl.constexpr = False,
):
    # x: R x K, element (r, k) at x_ptr + r + k * sxk. Program (i, j): rows i*BR.., groups j*NG..
    # (K a multiple of G, G of HAD). d_ptr: int32 words of the codes, row stride sdw words;
    # s_ptr: the group scales at r * ssr + group * ssc. AMAX: only max |x·R| as integer bits into
    # ta_ptr[0] (NVFP4's tensor amax, before the pass that quantizes).
    seed_off, rows, rmask, signs = _program_rows(seed_off, sign_off, R, BR, HAD, SIGNS, SEED_PTR)
    t_amax = 1.0
    if SMODE == 3 and not AMAX:
        t_amax = tl.load(ta_ptr)  # the rotated data's own amax (NVFP4 tensor scale)
    top = tl.zeros([BR], tl.int32)
    for gi in range(NG):
        grp = tl.program_id(1) * NG + gi
        k0 = grp * G
        v, amax = _rotated_group(x_ptr, rows, rmask, k0, sxk, signs, G, HAD, LOG, SCALE, SIGNS)
        if AMAX:
            top = tl.maximum(top, amax)
        else:
            s, eff = _scales(amax.to(tl.float32, bitcast=True), t_amax, FMAX, EMAX, SMODE)
            tl.store(s_ptr + rows * ssr + grp * ssc, s, rmask)
            # noise keys (index + seed offset) mod 2^32 as uint32: one add an element
            key = (rows.to(tl.int64) * K + k0 + seed_off).to(tl.uint32)
            words = _group_words(v, key, eff, seed_off, G, PACK, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF,
                                 ENC, SR, SMODE, HW_FP8, DIV)
            NW: tl.constexpr = G // (8 if PACK else 4)
            _store_words(d_ptr, words, rows, rmask, sdw, grp * NW, NW)
    if AMAX:
        tl.atomic_max(ta_ptr, tl.max(top, axis=0), sem="relaxed")
    elif SMODE == 3:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            t = _tensor_scale(t_amax, FMAX) + tl.zeros([1], tl.float32)
            tl.store(ts_ptr + tl.zeros([1], tl.int32), t)


# A program's values a group (its rows times G: rows = COLUMN_VALUES / G, a power of two from 32 to
# 512), the groups it visits along K, its warps, and a cap on its registers (0: none). Each thread
# keeps a group's G values of its rows / (32 * warps) rows. H100 (docs/BENCHMARKS.md, thirty-second
# pass), X^T of 16384 x 8192: MXFP4-SR (G = 32) with the kernel of `e90e267` (run 278), 256 rows,
# 2 groups on 4 warps 321.6 us; 128 rows 328.6, 4 groups 330.5, 1 group 358.8, 512 rows on 8 warps
# 392.4, on 4 warps 421.8. With `87ebffc` (runs 279-280): MXFP4-SR 256 rows 284.2 us (283.0 capped
# at 128 registers, 296.0 at 168), 128 rows 276.5 (274.9 capped); NVFP4 (G = 16) at 256 rows
# 398.2 (SR) / 341.4 (nearest) us, at 128 rows 410.5 / 377.7.
COLUMN_VALUES = 4096
COLUMN_GROUPS = 2
COLUMN_WARPS = 4
COLUMN_MAXNREG = 0
