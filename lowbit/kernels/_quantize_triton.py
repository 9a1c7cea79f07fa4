"""Triton side of the fused quantize kernel (imported lazily: lowbit imports without Triton).

The fp32 steps below mirror lowbit/quant/rounding.py (`_round_float`, `_round_int`, `exp2i`) and
scaling.py (`compute_scale`) operation for operation; see lowbit/kernels/quantize.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels import quantize as kq
from lowbit.kernels._hadamard_triton import _rotate_tile, rotation_constants
from lowbit.kernels._hash_triton import lowbias32
from lowbit.kernels.launch import aligned, launchable, seed_args
from lowbit.kernels.quantize import interpret
from lowbit.quant.formats import ElementFormat

_TWO23: tl.constexpr = tl.constexpr(8388608.0)
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
                SR: tl.constexpr, SMODE: tl.constexpr, HW_FP8: tl.constexpr, TRANSPOSED: tl.constexpr):
    # x: fp32 tile of any rank, eff: its divisors (reciprocals for e8m0) broadcastable to x, idx:
    # the elements' flat indices (x's shape; stochastic rounding) -> int32 codes of x's shape.
    # Callers pass 2-D tiles with [BR, 1] or [1, 1] scales where a group spans whole rows, and
    # [BR, NG, G] tiles only for 1-D groups: on Triton 3.6 a reshape to [BR, 1, BC] next to the
    # tile's own reductions made the layout pass give each thread whole rows (fp8 1x128: 255
    # registers, 30 spills, 0.12 of a copy on the H100; the pair kernel's 0.74 before its FAST form).
    # TRANSPOSED: x came out of tl.trans.
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
        return _encode(_scaled(x, eff, SMODE), ENC, True)
    if ENC == 3:
        y = _scaled(x, eff, SMODE)
        if SR:
            return _e2m1_codes_sr(y, _noise_bits(idx, seed_off))
        return _e2m1_codes(y)
    if KIND_INT and not SR:
        return _int_codes(_scaled(x, eff, SMODE), FMAX, ENC)
    q = _quant_values(x, eff, idx, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF, SR, SMODE)
    return _encode(q, ENC, HW_FP8)


@triton.jit
def _e2m1_codes(y):
    # FP4 E2M1 codes of scaled values y, rounded to nearest even, mostly in integer arithmetic on
    # y's fp32 bits (the fp4 quantizers were ALU-bound; this is _round_float then _encode):
    # - |y| >= 1 (codes 2..7, one mantissa bit): adding 2^21 - 1 plus the kept mantissa bit to the
    #   bits rounds the 22 dropped bits half to even, a carry moving into the exponent as it should;
    #   bits >> 22 is then (exponent + 127) * 2 + mantissa bit, and code = that - 252.
    # - |y| < 1 (codes 0..2, steps of 1/2): 2|y| + 2^23 rounds 2|y| half to even, and the sum's
    #   bits are 2^23's (0x4B000000) plus that integer: no float-to-int conversion (a slow op).
    # |y| saturates at 6 as an integer min on the bits (Inf too); NaN gives code 0, sign dropped.
    b = y.to(tl.int32, bitcast=True)
    ba = b & 0x7FFFFFFF
    bs = tl.minimum(ba, 0x40C00000)  # 6.0
    hi = ((bs + (0x1FFFFF + ((bs >> 22) & 1))) >> 22) - 252
    lo = (bs.to(tl.float32, bitcast=True) * 2.0 + _TWO23).to(tl.int32, bitcast=True) - 0x4B000000
    code = tl.where(bs >= 0x3F800000, hi, lo) | ((b >> 28) & 8)
    return tl.where(ba > 0x7F800000, 0, code)


@triton.jit
def _int_codes(y, FMAX: tl.constexpr, ENC: tl.constexpr):
    # int8 / int4 codes (two's complement, masked to the storage width) of scaled values y rounded
    # to nearest even: _round_int then _encode without their float-to-int conversion (a slow op
    # on sm_90): |y| clamped to FMAX (< 2^22) plus 2^23 rounds half to even, and the sum's bits
    # are 2^23's (0x4B000000) plus the rounded magnitude. NaN gives code 0, as _encode stores it.
    m = (tl.minimum(tl.abs(y), FMAX) + _TWO23).to(tl.int32, bitcast=True) - 0x4B000000
    code = tl.where(y < 0, -m, m)
    code = tl.where(y != y, 0, code)
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
    # - |y| >= 1: floor(v)'s code is (bits >> 22) - 252 as in _e2m1_codes, and v's fraction is
    #   the 22 bits below, so "fraction > u" is the integer test low22 * 4 > k.
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


@triton.jit
def _scaled(x, eff, SMODE: tl.constexpr):
    # x divided by its scale: a multiply by the exact reciprocal for e8m0, else an IEEE division.
    if SMODE == 1 or SMODE == 2:
        y = x * eff
    elif SMODE == 3:
        # An e4m3 block scale that underflowed makes the block zero (+0, as the reference). Written
        # with float factors of the scale's shape rather than a select on the broadcast tile: the
        # select on a broadcast i1 is the form that spilled on Triton 3.6 (see _quant_tile).
        # Elsewhere y * 1 + (-0) == y exactly (-0 kept); in a zero block (x / 1) * 0 + 0 == +0.
        zero = eff == 0
        neg0 = (tl.where(zero, 0, 1) << 31).to(tl.float32, bitcast=True)  # +0 in zero blocks, else -0
        y = tl.div_rn(x, tl.where(zero, 1.0, eff)) * tl.where(zero, 0.0, 1.0) + neg0
    else:  # fp32 scales are never 0 (scaling.compute_scale maps 0 to 1)
        y = tl.div_rn(x, eff)
    return y


@triton.jit
def _quant_values(x, eff, idx, seed_off, KIND_INT: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                  EMAX: tl.constexpr, FMAX: tl.constexpr, HAS_INF: tl.constexpr, SR: tl.constexpr,
                  SMODE: tl.constexpr):
    # The rounded grid values (fp32, x's shape) that _quant_tile encodes.
    y = _scaled(x, eff, SMODE)
    u = y
    if SR:
        u = _noise(idx, seed_off)  # of (index + seed * golden) mod 2^32
    if KIND_INT:
        q = _round_int(y, u, FMAX, SR)
    else:
        q = _round_float(y, u, MBITS, EMIN, EMAX, FMAX, HAS_INF, SR)
    return q


@triton.jit
def _load_tile(x_ptr, rows, cols, R, K, sxr, sxk, TRANS: tl.constexpr, EV: tl.constexpr = ""):
    # [BR, BC] fp32 tile; zeros outside the matrix (they never raise an amax). EV: the load's L2
    # eviction policy ("": the default; long rows' two reads, see _quantize_kernel).
    if TRANS:  # rows are the contiguous axis (X^T of a row-major X): load [BC, BR], coalesced
        m = (cols[:, None] < K) & (rows[None, :] < R)
        p = x_ptr + cols.to(tl.int64)[:, None] * sxk + rows.to(tl.int64)[None, :] * sxr
        return tl.trans(tl.load(p, m, other=0.0, eviction_policy=EV).to(tl.float32))
    else:
        m = (rows[:, None] < R) & (cols[None, :] < K)
        p = x_ptr + rows.to(tl.int64)[:, None] * sxr + cols.to(tl.int64)[None, :] * sxk
        return tl.load(p, m, other=0.0, eviction_policy=EV).to(tl.float32)


@triton.jit
def _abs_bits(x):
    # |x| as int32 bits: integer max orders them like floats and keeps NaN (> Inf) on top, so one
    # integer reduction gives an amax that propagates NaN as the reference's does.
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _store_codes(d_ptr, codes, rows, cols, c0, R, K, sdr, BR: tl.constexpr, BC: tl.constexpr,
                 PACK: tl.constexpr):
    if PACK:  # element 2i in the low nibble
        lo, hi = tl.split(tl.reshape(codes, [BR, BC // 2, 2]))
        pc = c0 // 2 + tl.arange(0, BC // 2)
        m = (rows[:, None] < R) & (pc[None, :] < K // 2)
        tl.store(d_ptr + rows[:, None].to(tl.int64) * sdr + pc[None, :], (lo | (hi << 4)).to(tl.uint8), m)
    else:
        m = (rows[:, None] < R) & (cols[None, :] < K)
        tl.store(d_ptr + rows[:, None].to(tl.int64) * sdr + cols[None, :], codes.to(tl.uint8), m)


@triton.jit
def _load_rotated(x_ptr, rows, cols, R, K, sxr, sxk, sign_off, TRANS: tl.constexpr, BR: tl.constexpr,
                  BC: tl.constexpr, HAD: tl.constexpr, LOG: tl.constexpr, SCALE: tl.constexpr,
                  SIGNS: tl.constexpr, GMODE: tl.constexpr, EV: tl.constexpr = ""):
    # The tile, Hadamard-rotated in blocks of HAD along K when HAD > 1 (_hadamard_triton.py; the
    # shuffle form measured faster next to 1-D groups, the split/join form next to rows).
    x = _load_tile(x_ptr, rows, cols, R, K, sxr, sxk, TRANS, EV)
    return _rotate_tile(x, cols, sign_off, BR, BC, HAD, LOG, SCALE, SIGNS, GMODE == 0)


@triton.jit
def _load_words(x_ptr, rows, hc, R, K, sxr, EV: tl.constexpr = ""):
    # Packed 4-bit codes of a bf16 matrix: each int32 word holds elements 2c (low half) and 2c + 1
    # (high half), which become one byte's two nibbles. Loading words and splitting them into the
    # even and odd columns by shifts (bf16 -> fp32 is exact as a shift) needs no register shuffle
    # to pair the nibbles up (the [BR, BC // 2, 2] split of _store_codes). -> (even, odd, mask).
    wm = (rows[:, None] < R) & (hc[None, :] < K // 2)
    wp = x_ptr.to(tl.pointer_type(tl.int32)) + rows.to(tl.int64)[:, None] * (sxr // 2) + hc[None, :]
    w = tl.load(wp, wm, other=0, eviction_policy=EV)
    return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True), wm


@triton.jit
def _chunk(i, n, REVERSE: tl.constexpr):
    # The i-th of n chunks a long row's second read visits: last first when REVERSE (the chunks
    # read last by the first pass are the likeliest still in L2).
    if REVERSE:
        return n - 1 - i
    else:
        return i


@triton.jit(do_not_specialize=["seed_off", "sign_off"])
def _quantize_kernel(
    x_ptr, d_ptr, s_ptr, ts_ptr, ga_ptr, ta_ptr, R, K, sxr, sxk, sdr, ssr, ssc, seed_off, sign_off,
    MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, FMAX: tl.constexpr,
    HAS_INF: tl.constexpr, KIND_INT: tl.constexpr, ENC: tl.constexpr, PACK: tl.constexpr,
    SMODE: tl.constexpr, GMODE: tl.constexpr, SR: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, G: tl.constexpr, TRANS: tl.constexpr, HW_FP8: tl.constexpr,
    ONE_TILE: tl.constexpr, WORDS: tl.constexpr, REVERSE: tl.constexpr, EV1: tl.constexpr,
    EV2: tl.constexpr, HAD: tl.constexpr, LOG: tl.constexpr, SCALE: tl.constexpr, SIGNS: tl.constexpr,
    SEED_PTR: tl.constexpr = False,
):
    if SEED_PTR:  # the offsets are one-element int64 tensors (lowbit.kernels.launch.seed_args)
        seed_off = tl.load(seed_off)
        sign_off = tl.load(sign_off)
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < R
    t_amax = 1.0
    if SMODE == 3:
        t_amax = tl.load(ta_ptr)  # the data's own amax (NVFP4 tensor scale), not an override
    if GMODE == 1 and not ONE_TILE and WORDS:  # a long row of packed codes read as words (below)
        H: tl.constexpr = BC // 2
        amax = tl.zeros([BR], tl.int32)
        for h0 in range(0, K // 2, H):
            xe, xo, wm = _load_words(x_ptr, rows, h0 + tl.arange(0, H), R, K, sxr, EV1)
            amax = tl.maximum(amax, tl.maximum(tl.max(_abs_bits(xe), axis=1), tl.max(_abs_bits(xo), axis=1)))
        s, eff = _scales(amax.to(tl.float32, bitcast=True), t_amax, FMAX, EMAX, SMODE)
        tl.store(s_ptr + rows * ssr, s, rmask)
        nh = tl.cdiv(K // 2, H)
        for i in range(0, nh):
            hc = _chunk(i, nh, REVERSE) * H + tl.arange(0, H)
            xe, xo, wm = _load_words(x_ptr, rows, hc, R, K, sxr, EV2)
            ie = (rows.to(tl.int64) * K + seed_off).to(tl.uint32)[:, None] + (2 * hc).to(tl.uint32)[None, :]
            ce = _quant_tile(xe, eff[:, None], ie, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF,
                             ENC, SR, SMODE, HW_FP8, False)
            co = _quant_tile(xo, eff[:, None], ie + 1, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF,
                             ENC, SR, SMODE, HW_FP8, False)
            dp = d_ptr + rows.to(tl.int64)[:, None] * sdr + hc[None, :]
            tl.store(dp, (ce | (co << 4)).to(tl.uint8), wm)
    elif GMODE == 1 and not ONE_TILE:  # long row: amax over the row, then quantize (re-read from L2)
        amax = tl.zeros([BR], tl.int32)
        for k0 in range(0, K, BC):
            cols = k0 + tl.arange(0, BC)
            x = _load_rotated(x_ptr, rows, cols, R, K, sxr, sxk, sign_off, TRANS, BR, BC, HAD, LOG, SCALE,
                              SIGNS, GMODE, EV1)
            amax = tl.maximum(amax, tl.max(_abs_bits(x), axis=1))
        amax = amax.to(tl.float32, bitcast=True)
        s, eff = _scales(amax, t_amax, FMAX, EMAX, SMODE)
        tl.store(s_ptr + rows * ssr, s, rmask)
        nch = tl.cdiv(K, BC)
        for i in range(0, nch):
            k0 = _chunk(i, nch, REVERSE) * BC
            cols = k0 + tl.arange(0, BC)
            x = _load_rotated(x_ptr, rows, cols, R, K, sxr, sxk, sign_off, TRANS, BR, BC, HAD, LOG, SCALE,
                              SIGNS, GMODE, EV2)
            idx = rows.to(tl.int64)[:, None] * K + cols[None, :]
            codes = _quant_tile(x, eff[:, None], idx, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF,
                                ENC, SR, SMODE, HW_FP8, TRANS)
            _store_codes(d_ptr, codes, rows, cols, k0, R, K, sdr, BR, BC, PACK)
    elif WORDS:  # packed 1-D groups, or a row in one tile (G == BC then: one group per tile row)
        H: tl.constexpr = BC // 2
        NG: tl.constexpr = BC // G
        hc = pid_c * H + tl.arange(0, H)
        xe, xo, wm = _load_words(x_ptr, rows, hc, R, K, sxr)
        # Element indices for the noise hash, kept as the hash's uint32 key (index + seed offset)
        # mod 2^32 — one 32-bit add per element instead of int64 arithmetic (SR only; unused else).
        ie = (rows.to(tl.int64) * K + seed_off).to(tl.uint32)[:, None] + (2 * hc).to(tl.uint32)[None, :]
        if NG == 1:  # one group per row of the tile: 2-D (see _quant_tile on reshapes)
            amax = tl.maximum(tl.max(_abs_bits(xe), axis=1), tl.max(_abs_bits(xo), axis=1))
            s, eff = _scales(amax.to(tl.float32, bitcast=True), t_amax, FMAX, EMAX, SMODE)
            tl.store(s_ptr + rows * ssr + pid_c * ssc, s, rmask)
            ce = _quant_tile(xe, eff[:, None], ie, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF,
                             ENC, SR, SMODE, HW_FP8, False)
            co = _quant_tile(xo, eff[:, None], ie + 1, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF,
                             ENC, SR, SMODE, HW_FP8, False)
        else:
            GH: tl.constexpr = G // 2
            xe3 = tl.reshape(xe, [BR, NG, GH])
            xo3 = tl.reshape(xo, [BR, NG, GH])
            amax = tl.maximum(tl.max(_abs_bits(xe3), axis=2), tl.max(_abs_bits(xo3), axis=2))
            s, eff = _scales(amax.to(tl.float32, bitcast=True), t_amax, FMAX, EMAX, SMODE)
            gcols = pid_c * NG + tl.arange(0, NG)
            gm = rmask[:, None] & (gcols[None, :] < (K + G - 1) // G)
            tl.store(s_ptr + rows[:, None] * ssr + gcols[None, :] * ssc, s, gm)
            i3 = tl.reshape(ie, [BR, NG, GH])
            ce = tl.reshape(_quant_tile(xe3, eff[:, :, None], i3, seed_off, KIND_INT, MBITS, EMIN, EMAX,
                                        FMAX, HAS_INF, ENC, SR, SMODE, HW_FP8, False), [BR, H])
            co = tl.reshape(_quant_tile(xo3, eff[:, :, None], i3 + 1, seed_off, KIND_INT, MBITS, EMIN,
                                        EMAX, FMAX, HAS_INF, ENC, SR, SMODE, HW_FP8, False), [BR, H])
        tl.store(d_ptr + rows.to(tl.int64)[:, None] * sdr + hc[None, :], (ce | (co << 4)).to(tl.uint8), wm)
    else:
        cols = pid_c * BC + tl.arange(0, BC)
        x = _load_rotated(x_ptr, rows, cols, R, K, sxr, sxk, sign_off, TRANS, BR, BC, HAD, LOG, SCALE, SIGNS,
                          GMODE)
        idx = rows.to(tl.int64)[:, None] * K + cols[None, :]
        if GMODE == 1 or BC == G:  # a row that fits one tile (one read), or one 1-D group per row:
            # 2-D; a row's program has pid_c == 0, so both store their scale at rows * ssr.
            amax = tl.max(_abs_bits(x), axis=1).to(tl.float32, bitcast=True)
            s, eff = _scales(amax, t_amax, FMAX, EMAX, SMODE)
            tl.store(s_ptr + rows * ssr + pid_c * ssc, s, rmask)
            codes = _quant_tile(x, eff[:, None], idx, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX,
                                HAS_INF, ENC, SR, SMODE, HW_FP8, TRANS)
        elif GMODE == 0:  # several 1-D groups of G along K: the tile reshaped once to [BR, NG, G]
            NG: tl.constexpr = BC // G
            x3 = tl.reshape(x, [BR, NG, G])
            amax = tl.max(_abs_bits(x3), axis=2).to(tl.float32, bitcast=True)
            s, eff = _scales(amax, t_amax, FMAX, EMAX, SMODE)
            gcols = pid_c * NG + tl.arange(0, NG)
            gm = rmask[:, None] & (gcols[None, :] < (K + G - 1) // G)
            tl.store(s_ptr + rows[:, None] * ssr + gcols[None, :] * ssc, s, gm)
            codes = tl.reshape(_quant_tile(x3, eff[:, :, None], tl.reshape(idx, [BR, NG, G]), seed_off,
                                           KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, SR, SMODE,
                                           HW_FP8, TRANS), [BR, BC])
        else:
            if GMODE == 2:  # tensor: amax from the pre-pass (or the delayed-scaling history)
                amax = tl.load(ga_ptr) + tl.zeros([1, 1], tl.float32)
            else:  # 2-D tile: this program's whole [BR, BC] tile is one group
                a = tl.max(tl.max(_abs_bits(x), axis=1), axis=0).to(tl.float32, bitcast=True)
                amax = a + tl.zeros([1, 1], tl.float32)
            s, eff = _scales(amax, t_amax, FMAX, EMAX, SMODE)
            if GMODE == 3:
                tl.store(s_ptr + pid_r * ssr + pid_c * ssc + tl.zeros([1, 1], tl.int32), s)
            elif (pid_r == 0) & (pid_c == 0):
                tl.store(s_ptr + tl.zeros([1, 1], tl.int32), s)
            codes = _quant_tile(x, eff, idx, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, SR,
                                SMODE, HW_FP8, TRANS)
        _store_codes(d_ptr, codes, rows, cols, pid_c * BC, R, K, sdr, BR, BC, PACK)
    if SMODE == 3:
        if (pid_r == 0) & (pid_c == 0):
            t = _tensor_scale(t_amax, FMAX) + tl.zeros([1], tl.float32)
            tl.store(ts_ptr + tl.zeros([1], tl.int32), t)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# Tile sizes: elements per program (GPU; the interpreter takes the same shapes, just slower).
TILE_ELEMS = 4096
# Columns per program for unrotated 1-D groups (MX/NV/int groups). H100 sweep (run 101 of
# docs/BENCHMARKS.md, `benchmarks/tile_sweep.py quantize`, device time): 128-512 columns x
# 4096-16384 elements on 4 or 8 warps moved MXFP4 / MXFP4-SR / NVFP4 by at most 0.01 of a copy,
# MXFP8 by +0.02 at most: left at 128.
GROUP_COLS = 128
# Row scaling: rows up to ROW_CHUNK elements are held in registers whole (one read); longer rows
# are read twice in ROW_CHUNK pieces (amax, then quantize; the second read mostly from L2). H100
# sweep (docs/BENCHMARKS.md, run 34): 4096 beat 2048 (and a whole 16384-wide row in one program)
# at 8192 x 14336 (fp8 0.80 of a copy, against 0.58 and 0.72).
ROW_CHUNK = 4096
# Rotated (Hadamard) 1-D-group tiles: columns and elements per program, and warps (0: as
# unrotated). Knobs for sweeps: H100 run 60 tried 16-512 columns, 2048-8192 elements, 4 or 8 warps,
# and none moved the fused kernel beyond +-0.03 of a copy (docs/BENCHMARKS.md, seventh pass).
ROTATED_COLS = 128
ROTATED_ELEMS = 4096
ROTATED_WARPS = 0
# Rotated views not contiguous along K (strided tile loads): rows x columns per program, warps
# (0: as unrotated). H100 sweep (run 86, X^T of 8192 x 4096 and 8192 x 14336, MXFP4 and NVFP4
# with SR): 8 x 512 on 8 warps best or within 5% of it among 4 x 1024 to 128 x 32 on 4 or 8 warps.
STRIDED_TILE = (8, 512)
STRIDED_WARPS = 8
# Long rows' two reads (rows wider than ROW_CHUNK): the second visits the chunks last-first
# (LONG_ROW_REVERSE), and the two reads' L2 eviction policies (LONG_ROW_EVICT: "" for the default,
# or the first read's and the second's, e.g. ("evict_last", "evict_first")).
LONG_ROW_REVERSE = False
LONG_ROW_EVICT = ("", "")
# Packed (fp4/int4) 1-D groups and rows of a bf16 matrix read as int32 words of two elements.
PAIRED_WORDS = True


# Warps of a 2-D tile program (128 x 128 weight blocks: 16384 elements). H100 sweep (run 43 of
# docs/BENCHMARKS.md), device time: 16 warps 0.86-0.91 of a copy on four shapes; 4 and 8 warps
# 0.68-0.83, 32 warps 0.64-0.68.
TILE2D_WARPS = 16


def _warps(gmode: int, br: int, bc: int, enc: int) -> int:
    if gmode == 3 and br * bc > 4096:
        return TILE2D_WARPS
    # fp8 rows, one 4096-wide tile or chunk at a time: 8 warps (runs 34 and 44: 0.97 of a copy at
    # 4096 wide, 0.84 against 0.80 at 14336); int rows and 1-D groups: 4 (no better at 8 or 16).
    return 8 if (gmode == 1 and br == 1 and enc in (0, 1)) or br * bc > 4096 else 4


def launch(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, tscale: torch.Tensor | None,
           g_amax: torch.Tensor | None, t_amax: torch.Tensor | None, fmt: ElementFormat, enc: int,
           packed: bool, smode: int, gmode: int, block, sr: bool, seed_off: int | torch.Tensor,
           hadamard: int = 1, sign_off: int | torch.Tensor | None = None) -> None:
    """Quantize x2 into the given buffers (quantize.py's quantize_2d allocates them). `hadamard`
    > 1 rotates K in blocks of that size first (random signs from `sign_off` when given); the
    caller checks that the tiles below hold whole blocks (K a multiple of it, 2-D tiles' widths)."""
    r, k = x2.shape
    kp, rp = _next_pow2(k), _next_pow2(r)
    # A rotated view not contiguous along K is loaded by plain strided tiles (quantize.py's
    # ROTATED_STRIDED_READ); other such views (X^T, rows contiguous) as [BC, BR] tiles transposed
    # in registers (TRANSPOSED_READ): make BR wide.
    strided = x2.stride(1) != 1 and hadamard > 1 and kq.ROTATED_STRIDED_READ
    trans = x2.stride(1) != 1 and x2.stride(0) == 1 and r > 1 and not strided
    g = int(block) if gmode == 0 else 1
    if gmode == 3:
        br, bc = int(block[0]), int(block[1])
    elif strided:
        bc = max(g, hadamard, min(kp, STRIDED_TILE[1]))
        br = max(1, min(rp, STRIDED_TILE[0] * STRIDED_TILE[1] // bc))
    elif trans:
        br = max(1, min(rp, 64))
        bc = max(g, hadamard, min(kp, TILE_ELEMS // br))
    else:
        chunk = ROW_CHUNK if gmode == 1 else (ROTATED_COLS if hadamard > 1 else GROUP_COLS)
        bc = max(g, 2, hadamard, min(kp, chunk))
        br = max(1, min(rp, (ROTATED_ELEMS if hadamard > 1 else TILE_ELEMS) // bc))
    one_tile = gmode == 1 and bc >= k
    # bf16 words of two elements for packed 1-D groups and rows (see the kernel's _load_words).
    words = (PAIRED_WORDS and packed and hadamard == 1 and gmode in (0, 1) and not trans
             and x2.dtype == torch.bfloat16
             and x2.stride(1) == 1 and x2.stride(0) % 2 == 0 and aligned(x2, 4))
    if words and gmode == 1:
        g = bc  # a row in one tile is the words branch's one group per tile row
    grid = (triton.cdiv(r, br), 1 if gmode == 1 else triton.cdiv(k, bc))
    warps = (strided and STRIDED_WARPS) or (hadamard > 1 and ROTATED_WARPS) or _warps(gmode, br, bc, enc)
    dummy = scale
    (seed_arg, sign_arg), on_device = seed_args(seed_off, sign_off)
    launchable(_quantize_kernel)[grid](
        x2, data, scale, tscale if tscale is not None else dummy,
        g_amax if g_amax is not None else dummy, t_amax if t_amax is not None else dummy,
        r, k, x2.stride(0), x2.stride(1), data.stride(0), scale.stride(0), scale.stride(1),
        seed_arg, sign_arg,
        MBITS=fmt.mbits, EMIN=fmt.emin, EMAX=fmt.emax, FMAX=float(fmt.max), HAS_INF=fmt.has_inf,
        KIND_INT=fmt.kind == "int", ENC=enc, PACK=packed, SMODE=smode, GMODE=gmode, SR=sr,
        BR=br, BC=bc, G=g, TRANS=trans, HW_FP8=not interpret(), ONE_TILE=one_tile, WORDS=words,
        REVERSE=LONG_ROW_REVERSE, EV1=LONG_ROW_EVICT[0], EV2=LONG_ROW_EVICT[1],
        SIGNS=sign_off is not None, SEED_PTR=on_device, **rotation_constants(hadamard), num_warps=warps,
    )
