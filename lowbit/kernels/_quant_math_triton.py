"""Element and scale math of the fused quantize kernels, in Triton (imported lazily: lowbit
imports without Triton): group amax -> scale, x / scale -> rounded grid value -> storage code.

The fp32 steps mirror lowbit/quant/rounding.py (`_round_float`, `_round_int`, `exp2i`) and
scaling.py (`compute_scale`) operation for operation; the kernels that use them are in
_quantize_triton.py, _pair_quantize_triton.py and _swiglu_pair_triton.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._hash_triton import lowbias32

_TWO23: tl.constexpr = tl.constexpr(8388608.0)
_ONE_AND_HALF_TWO23: tl.constexpr = tl.constexpr(12582912.0)
# Inf tests are written `|v| > FLT_MAX`, not `== inf`: Inductor, which launches the pair kernel in
# the traced layer (lowbit.kernels.pair_quantize_op), copies module constants into its generated
# source by repr, and repr(inf) is not a Python name there.
_FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _nan_like(x):
    # A quiet NaN of x's shape. (A NaN constexpr global breaks Triton 3.6's cache-key check: nan != nan.)
    return (x.to(tl.int32, bitcast=True) * 0 + 0x7FC00000).to(tl.float32, bitcast=True)


@triton.jit
def _exp2i(k):
    # 2^k exactly for integer k in [-149, 127], from the fp32 bits (k < -126 is subnormal).
    k = k.to(tl.int32)
    normal = ((k + 127) << 23).to(tl.float32, bitcast=True)
    sh = tl.minimum(tl.maximum(k + 149, 0), 31)
    sub = ((k * 0 + 1) << sh).to(tl.float32, bitcast=True)
    return tl.where(k >= -126, normal, sub)


@triton.jit
def _exp2n(k):
    # 2^k for k in the normal range [-126, 127] (element-format exponents): two integer ops.
    return ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _floor_log2(a):
    # floor(log2 a) for a >= 0 from the exponent field (fp32 subnormals and 0 give -127).
    return ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _round_float(y, u, MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
                 FMAX: tl.constexpr, HAS_INF: tl.constexpr, SR: tl.constexpr):
    a = tl.abs(y)
    a = tl.where(a > FMAX, FMAX, a)  # saturate; NaN compares false and stays NaN
    et = tl.minimum(tl.maximum(_floor_log2(a), EMIN), EMAX)
    v = a * _exp2n(MBITS - et)
    if SR:
        fl = tl.floor(v)
        r = fl + ((v - fl) > u).to(tl.float32)
    else:
        r = (v + _TWO23) - _TWO23  # round half to even for 0 <= v < 2^22
    q = r * _exp2n(et - MBITS)
    sign = (y.to(tl.int32, bitcast=True) >> 31) << 31  # copysign(q, y)
    q = (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    if HAS_INF:
        q = tl.where(tl.abs(y) > _FLT_MAX, y, q)
    return q


@triton.jit
def _round_int(y, u, FMAX: tl.constexpr, SR: tl.constexpr):
    v = tl.where(y > FMAX, FMAX, tl.where(y < -FMAX, -FMAX, y))
    if SR:
        fl = tl.floor(v)
        return fl + ((v - fl) > u).to(tl.float32)
    else:
        r = (tl.abs(v) + _TWO23) - _TWO23
        sign = (v.to(tl.int32, bitcast=True) >> 31) << 31
        return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_bits(q, EM: tl.constexpr, EB: tl.constexpr, HAS_INF: tl.constexpr):
    # Byte of an fp32 value that is exactly on the fp8 (EM mantissa bits, bias EB) grid.
    a = tl.abs(q)
    a = tl.where(a <= _FLT_MAX, a, 0.0)  # NaN/Inf get their codes below, not a cast
    et = tl.maximum(_floor_log2(a), 1 - EB)
    sig = (a * _exp2n(EM - et)).to(tl.int32)  # hidden bit included for normals, exact
    bits = ((et + EB - 1) << EM) + sig
    bits = tl.where(q != q, 0x7F, bits)
    if HAS_INF:
        bits = tl.where(tl.abs(q) > _FLT_MAX, 0x7C, bits)
    return bits | (((q.to(tl.int32, bitcast=True) >> 31) & 1) << 7)


@triton.jit
def _encode(q, ENC: tl.constexpr, HW_FP8: tl.constexpr):
    # Storage code (int32 in [0, 255]) of grid values q; see lowbit/quant/qtensor.py `encode`.
    if ENC == 0:
        if HW_FP8:  # the GPU cast rounds to nearest even and saturates (exact for grid values)
            return q.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
        else:  # the interpreter's fp8 cast rounds wrongly: assemble the bits
            return _fp8_bits(q, 3, 7, False)
    elif ENC == 1:
        if HW_FP8:  # as above; Inf is set apart (the satfinite cast clamps it)
            hw = q.to(tl.float8e5).to(tl.uint8, bitcast=True).to(tl.int32)
            inf = 0x7C | (((q.to(tl.int32, bitcast=True) >> 31) & 1) << 7)
            return tl.where(tl.abs(q) > _FLT_MAX, inf, hw)
        else:
            return _fp8_bits(q, 2, 15, True)
    else:
        v = tl.where(q != q, 0.0, q)  # formats without NaN store 0 (the scale is NaN)
        if ENC == 3:
            m = tl.abs(v)
            code = tl.where(m < 2.0, m * 2.0, tl.where(m < 4.0, m + 2.0, m * 0.5 + 4.0)).to(tl.int32)
            return code | (((v.to(tl.int32, bitcast=True) >> 31) & 1) << 3)
        elif ENC == 4:
            return v.to(tl.int32) & 0xF
        else:
            return v.to(tl.int32) & 0xFF


@triton.jit
def _tensor_scale(t_amax, FMAX: tl.constexpr):
    # NVFP4's fp32 tensor scale t = amax_tensor / (448 * max_elem); 0 -> 1, non-finite -> NaN.
    t = tl.div_rn(t_amax, t_amax * 0.0 + 448.0 * FMAX)
    t = tl.where(t == 0, 1.0, t)
    return tl.where(tl.abs(t_amax) <= _FLT_MAX, t, _nan_like(t))


@triton.jit
def _scales(amax, t_amax, FMAX: tl.constexpr, EMAX: tl.constexpr, SMODE: tl.constexpr):
    # (stored scale, effective divisor) from the group amax, as scaling.compute_scale. For e8m0
    # scales the second value is the reciprocal 2^-e instead (a multiply, not a division).
    bad = ~(tl.abs(amax) <= _FLT_MAX)
    fmax = tl.zeros_like(amax) + FMAX
    if SMODE == 0:
        s = tl.div_rn(amax, fmax)
        s = tl.where(s == 0, 1.0, s)
        s = tl.where(bad, _nan_like(s), s)
        eff = s
    elif SMODE == 3:
        t = _tensor_scale(t_amax, FMAX)
        raw = tl.div_rn(tl.div_rn(amax, fmax), tl.zeros_like(amax) + t)
        s = _round_float(raw, raw, 3, -6, 8, 448.0, False, False)
        s = tl.where(bad, _nan_like(s), s)
        eff = s * t
    else:
        e = _floor_log2(amax) - EMAX
        e = tl.where(amax == 0, -127, e)
        e = tl.minimum(tl.maximum(e, -127), 127)
        if SMODE == 2:
            e = tl.where(tl.div_rn(amax, _exp2i(e)) > FMAX, e + 1, e)
            e = tl.minimum(e, 127)
        s = _exp2i(e)
        s = tl.where(bad, _nan_like(s), s)
        eff = tl.where(bad, s, _exp2i(-e))  # the exact reciprocal: x * 2^-e == x / 2^e bit for bit
    return s, eff


@triton.jit
def _quant_tile(x, eff, idx, seed_off, KIND_INT: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                EMAX: tl.constexpr, FMAX: tl.constexpr, HAS_INF: tl.constexpr, ENC: tl.constexpr,
                SR: tl.constexpr, SMODE: tl.constexpr, HW_FP8: tl.constexpr, TRANSPOSED: tl.constexpr,
                DIV: tl.constexpr = 0):
    # x: fp32 tile of any rank, eff: its divisors (reciprocals for e8m0) broadcastable to x, idx:
    # the elements' flat indices (x's shape; stochastic rounding) -> int32 codes of x's shape.
    # Callers pass 2-D tiles with [BR, 1] or [1, 1] scales where a group spans whole rows, and
    # [BR, NG, G] tiles only for 1-D groups: on Triton 3.6 a reshape to [BR, 1, BC] next to the
    # tile's own reductions made the layout pass give each thread whole rows (fp8 1x128: 255
    # registers, 30 spills, 0.12 of a copy on the H100; the pair kernel's 0.74 before its FAST form).
    # TRANSPOSED: x came out of tl.trans. DIV: _div_scale's form of the division (eff one scale
    # per group; 0 for transposed tiles, whose multiplied forms Triton 3.6 miscompiled, below).
    fp8 = (ENC == 0 and MBITS == 3 and EMIN == -6 and EMAX == 8) or ENC == 1
    # Not for a transposed tile with a multiplied (e8m0) scale: on the H100 (Triton 3.6) the cast
    # of tl.trans(x) * s came out with other rows' values in it (run 30, a 64 x 256 pair; run 22
    # likewise), as the cast of transposed grid values did in runs 9 and 11. With the division
    # between tl.trans and the cast, every GPU test and benchmark shape has been bit-exact.
    if HW_FP8 and fp8 and not SR and (SMODE == 0 or not TRANSPOSED):
        # fp8 e4m3/e5m2 elements (not the fp6 formats, which ENC 0 also stores as e4m3 bytes).
        # On the GPU the fp8 cast itself rounds as _round_float does (RNE, subnormals included,
        # `satfinite` saturation to the largest finite value; _encode keeps Inf for e5m2), so the
        # explicit rounding is skipped: it made the kernels ALU-bound (pair quantizer 0.63 -> 0.90
        # of a copy on the H100, run 22 of docs/BENCHMARKS.md). GPU tests check it bit for bit.
        return _encode(_scaled(x, eff, SMODE, DIV), ENC, True)
    if ENC == 3:
        y = _scaled(x, eff, SMODE, DIV)
        if SR:
            return _e2m1_codes_sr(y, _noise_bits(idx, seed_off))
        return _e2m1_codes(y)
    if KIND_INT and not SR:
        return _int_codes(_scaled(x, eff, SMODE, DIV), FMAX, ENC)
    q = _quant_values(x, eff, idx, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF, SR, SMODE, DIV)
    return _encode(q, ENC, HW_FP8)


@triton.jit
def _e2m1_codes(y):
    # FP4 E2M1 codes of scaled values y, rounded to nearest even: _e2m1_magnitude's code of |y|
    # with y's sign as bit 3. NaN gives code 0, sign dropped.
    b = y.to(tl.int32, bitcast=True)
    ba = b & 0x7FFFFFFF
    code = _e2m1_magnitude(ba) | ((b >> 28) & 8)
    return tl.where(ba > 0x7F800000, 0, code)


@triton.jit
def _e2m1_magnitude(ba):
    # E2M1 code (0..7) of the fp32 value with bits ba >= 0, rounded to nearest even, in a few
    # integer and one float op on the bits (the fp4 quantizers were ALU-bound: this is
    # _round_float then _encode). With e = max(exponent, 0), the grid step q is 2^(e-1)
    # throughout (0.5 below 2: the subnormals 0, 0.5 and 1, 1.5; then 1, then 2), so adding
    # M = q * 2^23 rounds the value / q half to even into the sum's low bits:
    # n = bits(value + M) - bits(M), in 0..4. Then the code is n + 2e (n = 4 is a carry into the
    # next binade: 1.75 -> code 4, 2.0). M's bits are those of max(value, 1)'s exponent plus
    # 22 << 23, and 2e is that exponent field >> 22, minus 254. The value saturates at 6 as an
    # integer min on the bits (Inf too; a NaN gives 7: callers clear NaN codes).
    bs = tl.minimum(ba, 0x40C00000)  # 6.0
    eb = tl.maximum(bs, 0x3F800000) & 0x7F800000  # max(value, 1)'s exponent field
    mb = eb + (22 << 23)
    n = (bs.to(tl.float32, bitcast=True) + mb.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True) - mb
    return n + ((eb >> 22) - 254)


@triton.jit
def _int_codes(y, FMAX: tl.constexpr, ENC: tl.constexpr):
    # int8 / int4 codes (two's complement, masked to the storage width) of scaled values y rounded
    # to nearest even: _round_int then _encode without their float-to-int conversion (a slow op
    # on sm_90), in four ops and a NaN test. y clamped to +-FMAX (< 2^22) plus M = 1.5 * 2^23 is
    # rounded to an integer (the sum's ulp is 1; M is even, so the sum's tie goes where y's
    # does), and the sum's bits are M's (0x4B400000) plus round(y) as a signed integer, carries
    # and borrows included: their low byte is round(y)'s two's complement byte, as M's is 0.
    # NaN gives code 0, as _encode stores it (whatever the clamp made of it).
    v = tl.minimum(tl.maximum(y, -FMAX), FMAX)
    code = tl.where(y != y, 0, (v + _ONE_AND_HALF_TWO23).to(tl.int32, bitcast=True))
    if ENC == 4:
        return code & 0xF
    else:
        return code & 0xFF


@triton.jit
def _e2m1_codes_sr(y, k):
    # FP4 E2M1 codes of scaled values y rounded stochastically with 24-bit noise k (u = k / 2^24):
    # _round_float's SR step (floor v, then up when v's fraction exceeds u) then _encode, with v
    # as _round_float forms it (2a below 2, a below 4, a/2 up to 6) and no float-int conversions
    # where the bits give the answer:
    # - |y| >= 1: floor(v)'s code is (bits >> 22) - 252 (bits >> 22: the exponent field and the
    #   kept mantissa bit), and v's fraction is the 22 bits below, so "fraction > u" is the
    #   integer test low22 * 4 > k.
    # - |y| < 1: v = 2a < 2; floor(v) is (a >= 1/2) and the fraction 2a - floor(v) is exact.
    # Codes are consecutive across ranges (code 3 + 1 is 2.0, 5 + 1 is 4.0), so rounding up past
    # a range's top lands where the reference's grid value does. |y| saturates at 6 (Inf too);
    # NaN gives code 0, sign dropped.
    b = y.to(tl.int32, bitcast=True)
    ba = b & 0x7FFFFFFF
    bs = tl.minimum(ba, 0x40C00000)  # 6.0
    hi = ((bs >> 22) - 252) + (((bs & 0x3FFFFF) << 2) > k).to(tl.int32)
    v = bs.to(tl.float32, bitcast=True) * 2.0
    half = v >= 1.0
    u = k.to(tl.float32) * (1.0 / 16777216.0)
    lo = half.to(tl.int32) + ((v - tl.where(half, 1.0, 0.0)) > u).to(tl.int32)
    code = tl.where(bs >= 0x3F800000, hi, lo) | ((b >> 28) & 8)
    return tl.where(ba > 0x7F800000, 0, code)


@triton.jit
def _noise_bits(idx, seed_off):
    # 24-bit stochastic-rounding noise k (u = k / 2^24) from the hash of (index + seed offset)
    # mod 2^32, as lowbit.quant.rounding's. idx: int64 indices, or uint32 keys with the offset in.
    if idx.dtype == tl.uint32:  # already the key (the packed-words branch of _quantize_kernel)
        key = idx
    else:
        key = (idx + seed_off).to(tl.uint32)
    return (lowbias32(key) >> 8).to(tl.int32)


@triton.jit
def _noise(idx, seed_off):
    # The noise as u in [0, 1).
    return _noise_bits(idx, seed_off).to(tl.float32) * (1.0 / 16777216.0)


# The reciprocal form of _div_scale takes divisors from 2^-64 up (as int32 bits; see there).
_DIV_MIN_BITS: tl.constexpr = tl.constexpr((127 - 64) << 23)
_DIV_MIN: tl.constexpr = tl.constexpr(2.0**-64)  # the same bound as a float, for DIV 1's select
# ... and, in its guarded form (DIV 2), quotients up to 2^100 (no overflow of x * r in any step).
_DIV_MAX_QUOTIENT: tl.constexpr = tl.constexpr(2.0**100)


@triton.jit
def _reciprocal(d):
    # 1 / d rounded (IEEE): _div_fast's r, one division per group.
    return tl.div_rn(tl.zeros_like(d) + 1.0, d)


@triton.jit
def _div_fast(x, d, r):
    # _div_scale's reciprocal form, unchecked (see there), with r = _reciprocal(d).
    # y = q + (x - q * d) * r as fma(fma(q, d, -x), -r, q): the residual negated twice, once in
    # each fma's operand (free on the GPU, and -r is one per group), the same bits as
    # fma(fma(-q, d, x), r, q) (round-to-nearest is sign-symmetric) except for a zero x: there the
    # residual is +0 either way (q * d and -x are opposite zeros), and +0 * -r = -0 added to
    # q = x * r leaves q, x's own zero, as IEEE division gives (d > 0); the other form added
    # +0 * r = +0 and turned -0 into +0.
    # Negations multiply by -1.0: Triton 3.6 computes a float's unary minus as 0 - x (compiled and
    # interpreted), which keeps +0 as +0; Triton 3.9, which the CPU tests run, negates. So the
    # earlier fix -(q * d - x) still lost -0's sign on the GPU (run 199). Compiled for sm_90
    # (benchmarks/offline_sass.py) this is FMUL, FFMA, FFMA an element, the negations folded into
    # the FFMAs: one instruction fewer than fma(-q, d, x), whose 0 - q took an FFMA of its own.
    q = x * r
    return tl.fma(tl.fma(q, d, x * -1.0), r * -1.0, q)


@triton.jit
def _div_fast_ok(x, d, r, QUOTIENTS: tl.constexpr):
    # Whether _div_fast gives tl.div_rn's quotients for this tile: divisors from 2^-64 up (d > 0 or
    # NaN: their int32 bits order them), and with QUOTIENTS, |x| max times r = 1/d max at most
    # 2^100 (from their bits; NaN and Inf on top: not ok). A scalar.
    if QUOTIENTS:
        return _div_fast_ok_bits(tl.min(d.to(tl.int32, bitcast=True)),
                                 tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF),
                                 tl.max(r.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True))
    return tl.min(d.to(tl.int32, bitcast=True)) >= _DIV_MIN_BITS


@triton.jit
def _div_fast_ok_bits(d_bits, x_bits, r):
    # _div_fast_ok with QUOTIENTS from its reductions: the least divisor's and the largest |x|'s
    # int32 bits and the largest reciprocal (a caller that has the tile's amax bits already).
    return (d_bits >= _DIV_MIN_BITS) & (x_bits.to(tl.float32, bitcast=True) * r <= _DIV_MAX_QUOTIENT)


@triton.jit
def _div_scale(x, d, DIV: tl.constexpr):
    # x / d rounded as tl.div_rn (IEEE), for d holding one divisor per group (shape broadcastable to
    # x's, not broadcast: its reciprocals are one division per group). DIV 0: tl.div_rn per element.
    # DIV 1, 2 or 3 (_div_fast): r = 1/d rounded, q = x * r, then one correction with the exact
    # residual x - q * d (an fma): q + (x - q * d) * r rounded once is the correctly rounded quotient
    # (Markstein's theorem: r within half an ulp of 1/d, q within one ulp of x/d). Three float ops
    # an element instead of div.rn's ~10, whose reciprocal (MUFU) runs at 1/8 of the FMA rate; the
    # quantizers that divide are ALU-bound. It holds where nothing under- or overflows: with
    # d >= 2^-64 and a quotient |y| >= 2^-20 the residual is exact (the exponents of q and d sum
    # past e_min + p - 1 = -103), and smaller quotients round to a zero code in every format
    # (the least nonzero step, e5m2's, is 2^-16), keeping their sign.
    # DIV 1: the caller's quotients are bounded (the scales came from these values' own amax, so
    # |x| <= d * FMAX), and no branch is needed: a group whose divisor is below 2^-64 divides
    # x * 2^100 by d * 2^100 instead, the same quotient (scaling by a power of two is exact: x
    # and d only grow, d up to 2^36 and x below 2^52), with d * 2^100 >= 2^-49 (d >= 2^-149, the
    # least subnormal) inside the form's range. One multiply an element more; a NaN divisor gives
    # NaN as the division does. In the pair kernels (tiles that go through tl.trans) Triton 3.6
    # compiled this form wrong on the H100 (run 205: rows of wrong codes), so they take DIV 3.
    # DIV 2: the quotients may be any size (an amax given from outside, as delayed scaling's), and
    # where the tile's divisors or largest quotient fall outside (_div_fast_ok) the program takes
    # tl.div_rn (or NaN: d NaN or x non-finite). That branch joins every element's quotient, and
    # those live across it cost registers (56 -> 119 in SwiGLU's forward kernel on Triton 3.6);
    # taking the guard once a tile around the caller's whole quantize-and-store instead came out
    # wrong on the H100 (Triton 3.6, run 202, docs/BENCHMARKS.md twenty-fourth pass).
    # DIV 3: bounded quotients as DIV 1, in DIV 2's branch on the divisors alone (DIV 1's form
    # until run 205).
    # So the result is div_rn's bit for bit wherever |y| >= 2^-20, and below that it has div_rn's
    # sign and stays under 2^-19: the codes are the same. tests/test_kernels_div_scale.py checks it
    # on the CPU against numpy's division; benchmarks/div_scale_check.py on a GPU for every pair of
    # fp32 significands.
    if DIV == 0:
        y = tl.div_rn(x, d)
    elif DIV == 1:
        up = tl.where(d < _DIV_MIN, 2.0**100, 1.0)  # d's shape: one factor per group
        du = d * up
        y = _div_fast(x * up, du, _reciprocal(du))
    else:
        r = _reciprocal(d)
        if _div_fast_ok(x, d, r, DIV == 2):
            y = _div_fast(x, d, r)
        else:
            y = tl.div_rn(x, d)
    return y


@triton.jit
def _scaled(x, eff, SMODE: tl.constexpr, DIV: tl.constexpr = 0):
    # x divided by its scale: a multiply by the exact reciprocal for e8m0, else an IEEE division
    # (DIV: _div_scale's form; eff then holds one scale per group, not broadcast).
    if SMODE == 1 or SMODE == 2:
        y = x * eff
    elif SMODE == 3:
        # An e4m3 block scale that underflowed makes the block zero (+0, as the reference). Written
        # with float factors of the scale's shape rather than a select on the broadcast tile: the
        # select on a broadcast i1 is the form that spilled on Triton 3.6 (see _quant_tile).
        # Elsewhere y * 1 + (-0) == y exactly (-0 kept); in a zero block (x / 1) * 0 + 0 == +0.
        zero = eff == 0
        neg0 = (tl.where(zero, 0, 1) << 31).to(tl.float32, bitcast=True)  # +0 in zero blocks, else -0
        y = _div_scale(x, tl.where(zero, 1.0, eff), DIV) * tl.where(zero, 0.0, 1.0) + neg0
    else:  # fp32 scales are never 0 (scaling.compute_scale maps 0 to 1)
        y = _div_scale(x, eff, DIV)
    return y


@triton.jit
def _quant_values(x, eff, idx, seed_off, KIND_INT: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                  EMAX: tl.constexpr, FMAX: tl.constexpr, HAS_INF: tl.constexpr, SR: tl.constexpr,
                  SMODE: tl.constexpr, DIV: tl.constexpr = 0):
    # The rounded grid values (fp32, x's shape) that _quant_tile encodes.
    y = _scaled(x, eff, SMODE, DIV)
    u = y
    if SR:
        u = _noise(idx, seed_off)  # of (index + seed * golden) mod 2^32
    if KIND_INT:
        q = _round_int(y, u, FMAX, SR)
    else:
        q = _round_float(y, u, MBITS, EMIN, EMAX, FMAX, HAS_INF, SR)
    return q


@triton.jit
def _bf16_rne(v):
    # fp32 v rounded to bf16, to nearest even, on its bits: what the hardware cast and torch's
    # .to(torch.bfloat16) give, without a float downcast (the interpreter's is wrong; Triton 3.6
    # miscompiled casts of transposed tiles, see _quant_tile).
    # A NaN stays a quiet NaN (GPUs write 0x7FFFFFFF, which the rounding add would carry to -0).
    b = v.to(tl.uint32, bitcast=True)
    r = tl.where(v != v, (b >> 16) | 0x40, (b + 0x7FFF + ((b >> 16) & 1)) >> 16)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
