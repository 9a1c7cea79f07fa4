"""Triton side of the fused low-bit AdamW steps (imported lazily: lowbit imports without Triton).

Device helpers (nearest-code search, BF16 rounding, the AdamW update) and the multi-tensor kernels;
the host side that plans and launches them, and what each fp32 operation mirrors, is described in
lowbit/kernels/optim_adamw_lowbit.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._hash_triton import lowbias32
from lowbit.optim import qmaps

LUT_K: tl.constexpr = tl.constexpr(qmaps.LUT_MANT_BITS)
LUT_BASE: tl.constexpr = tl.constexpr((127 + qmaps.LUT_MIN_EXP) << qmaps.LUT_MANT_BITS)
LUT_N: tl.constexpr = tl.constexpr(qmaps.LUT_OCTAVES << qmaps.LUT_MANT_BITS)


@triton.jit
def _code(x, lut_ptr, pmid_ptr, Z: tl.constexpr):
    # Index of the nearest map value = count of midpoints below x (see qmaps.search_lut).
    a = tl.abs(x)
    key = (a.to(tl.int32, bitcast=True) >> (23 - LUT_K)) - LUT_BASE
    key = tl.minimum(tl.maximum(key, 0), LUT_N - 1)
    lo = tl.load(lut_ptr + key).to(tl.int32)
    mv = tl.load(pmid_ptr + lo)
    if Z > 0:
        neg = x < 0
        cnt = lo + tl.where(neg, mv <= a, mv < a).to(tl.int32)
        return tl.where(neg, Z - cnt, Z + cnt)
    else:
        return lo + (mv < a).to(tl.int32)


@triton.jit
def _code16(x, mid_ptr):
    # 4-bit maps: count of the 15 midpoints below x by register compares (uniform scalar loads; no
    # per-element gathers), equal to the reference's searchsorted.
    code = tl.zeros(x.shape, tl.int32)
    for k in tl.static_range(15):
        code += (tl.load(mid_ptr + k) < x).to(tl.int32)
    return code


@triton.jit
def _mids_sym(mid_ptr):
    # The 7 positive midpoints of the symmetric 4-bit first-moment map (see _code16_sym), loaded
    # once per program: inside a loop that stores, the compiler would reload them every iteration.
    return (tl.load(mid_ptr + 7), tl.load(mid_ptr + 8), tl.load(mid_ptr + 9), tl.load(mid_ptr + 10),
            tl.load(mid_ptr + 11), tl.load(mid_ptr + 12), tl.load(mid_ptr + 13))


@triton.jit
def _code16_sym(x, mids):
    # Nearest code of x in [-1, 1] for a map whose 15 midpoints are ±mp_0..6 and 1 (the host checks
    # this: qmaps.dynamic_map(4, True)): #{mid < x} = 7 + #{mp < |x|} for x >= 0 and 7 - #{mp <= |x|}
    # for x < 0, where mp <= a ⟺ mp < nextup(a) (bits + 1). 7 compares instead of _code16's 15,
    # same result (equal to the reference's searchsorted).
    a = tl.abs(x)
    neg = x < 0
    b = (a.to(tl.int32, bitcast=True) + neg.to(tl.int32)).to(tl.float32, bitcast=True)
    c = (mids[0] < b).to(tl.int32)
    c += (mids[1] < b).to(tl.int32)
    c += (mids[2] < b).to(tl.int32)
    c += (mids[3] < b).to(tl.int32)
    c += (mids[4] < b).to(tl.int32)
    c += (mids[5] < b).to(tl.int32)
    c += (mids[6] < b).to(tl.int32)
    return tl.where(neg, 7 - c, 7 + c)


# First-moment code by one table gather (_code16_lut): the key is the top 10 bits of a nonnegative
# fp32 (exponent and first mantissa bit), clamped to [M_LUT_BASE, M_LUT_BASE + M_LUT_N - 1]; the
# host builds the table (optim_adamw_lowbit.m_code_lut) and checks that each key's interval holds
# at most one midpoint.
M_LUT_BASE: tl.constexpr = tl.constexpr(238)  # 2**-8 = 0.0039: below the smallest midpoint, 0.005
M_LUT_N: tl.constexpr = tl.constexpr(17)  # up to [1, 1.5): b <= nextup(1)


@triton.jit
def _code16_lut(x, lut_ptr):
    # _code16_sym's count #{mp < b} (b = |x|, or its next float for x < 0) as lo + (mp < b), where
    # the int64 entry of b's key holds lo = #{mp below the key's interval} (high word) and the bits
    # of the one midpoint inside it (low word; +inf if none). Nonnegative floats compare as their
    # bits, so the compare is on integers. About 10 instructions instead of 7 float compares' ~22.
    a = tl.abs(x)
    neg = x < 0
    b = a.to(tl.int32, bitcast=True) + neg.to(tl.int32)
    key = tl.minimum(tl.maximum(b >> 22, M_LUT_BASE), M_LUT_BASE + M_LUT_N - 1) - M_LUT_BASE
    e = tl.load(lut_ptr + key)
    c = (e >> 32).to(tl.int32) + (b > e.to(tl.int32)).to(tl.int32)
    return tl.where(neg, 7 - c, 7 + c)


@triton.jit
def _v16(code):
    # Value of the zero-free linear 4-bit map (qmaps.linear_map_nozero(4)): (code + 1) / 16, exact in
    # fp32 and equal to the table entry, without a per-element gather.
    return (code + 1).to(tl.float32) * 0.0625


@triton.jit
def _code16_sr(x, tab_ptr, offs, seed_mix, ND: tl.constexpr):
    # First moment, stochastic rounding (qmaps.stochastic_code): lo = index of the largest of the ND
    # distinct map values <= x (count of values 1..ND-1 <= x), hi = lo + 1 (clamped); round up when
    # u · 2**-24 · (hi - lo value) < x - lo value, u = top 24 bits of lowbias32(index + seed mix).
    lo = tl.zeros(x.shape, tl.int32)
    for k in tl.static_range(1, ND):
        lo += (tl.load(tab_ptr + k) <= x).to(tl.int32)
    hi = tl.minimum(lo + 1, ND - 1)
    vlo = tl.load(tab_ptr + lo)
    vhi = tl.load(tab_ptr + hi)
    u = (lowbias32(offs.to(tl.uint32) + seed_mix.to(tl.uint32)) >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return tl.where(u * (vhi - vlo) < x - vlo, hi, lo)


@triton.jit
def _code_m(x, mtab, mids, mlut, offs, mseed_mix, M_SR: tl.constexpr, ND: tl.constexpr, MLUT: tl.constexpr):
    if M_SR:
        return _code16_sr(x, mtab, offs, mseed_mix, ND)
    elif MLUT:
        return _code16_lut(x, mlut)
    else:
        return _code16_sym(x, mids)


@triton.jit
def _code_linear16_up(x):
    # Second moment, rounded up (qmaps.up_code): the code of the smallest value (j + 1) / 16 >= x is
    # the count of map values below x, #{j : j + 1 < 16 x} = ceil(16 x - 1) clamped to [0, 15].
    # 16 x is exact; 16 x - 1 is exact for 16 x >= 1, and below that any result in [-1, 0] gives 0.
    # x comes from _unit (<= 1), so the count is at most 15 without a clamp.
    return tl.maximum(tl.ceil(x * 16.0 - 1.0), 0.0).to(tl.int32)


@triton.jit
def _inv(scale):
    # 1 / scale with 0 → 1, like qmaps.safe_scale; one IEEE division per block, not per element.
    return tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), tl.where(scale > 0, scale, 1.0))


@triton.jit
def _unit(x, inv):
    return tl.minimum(tl.maximum(x * inv, -1.0), 1.0)


@triton.jit
def _round_bf16(x, offs, seed_mix, STOCHASTIC: tl.constexpr):
    # fp32 → fp32 holding a BF16 value; the later cast to bf16 is then exact.
    u = x.to(tl.uint32, bitcast=True)
    if STOCHASTIC:
        noise = lowbias32(offs.to(tl.uint32) + seed_mix.to(tl.uint32)) & 0xFFFF
        r = (u + noise) & 0xFFFF0000
    else:
        r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    finite = tl.abs(x) < float("inf")
    return tl.where(finite, r.to(tl.float32, bitcast=True), x)


@triton.jit
def _store_param(
    p_ptr, comp_ptr, offs, mask, old, new, seed_mix, P_BF16: tl.constexpr, ROUNDING: tl.constexpr
):
    if P_BF16:
        if ROUNDING == 2:
            c = tl.load(comp_ptr + offs, mask=mask, other=0).to(tl.float32)
            y = (new - old) + c
            s = old + y
            r = _round_bf16(s, offs, seed_mix, False)
            tl.store(comp_ptr + offs, _round_bf16(s - r, offs, seed_mix, False).to(tl.bfloat16), mask=mask)
        else:
            r = _round_bf16(new, offs, seed_mix, ROUNDING == 1)
        tl.store(p_ptr + offs, r.to(tl.bfloat16), mask=mask)
    else:
        tl.store(p_ptr + offs, new, mask=mask)


@triton.jit
def _adam(p, g, m, v, beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay):
    m = m * beta1 + g * omb1
    v = v * beta2 + (g * g) * omb2
    denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps  # correctly rounded, like the reference's
    new_p = p * decay - tl.div_rn(m, denom) * step_size
    return new_p, m, v


# Correctly rounded sqrt and division without the per-element slow-path branches. These are the
# fast paths that sqrt.rn.f32 and div.rn.f32 compile to on sm_80/sm_90 (MUFU.RSQ / MUFU.RCP, then
# the same fused multiply-adds), valid, i.e. equal to the IEEE result, when the operands are in the
# range checked by the caller (sqrt: x in [2**-101, max]; division: |a| and b in [2**-60, 2**64),
# well inside the fast range, where no intermediate overflows or underflows). The compiled IEEE ops
# test that range per element and branch (4-5 instructions each, and the branches serialize the
# elements); _adam_fast's callers test a whole tile once and recompute it with the IEEE ops when
# anything is out of range. ASM = 0 (the interpreter) uses the IEEE ops themselves.
_SQRT_FAST_PTX: tl.constexpr = tl.constexpr("""{
.reg .f32 r, s, h, e;
rsqrt.approx.ftz.f32 r, $1;
mul.ftz.f32 s, $1, r;
mul.ftz.f32 h, r, 0f3F000000;
neg.f32 e, s;
fma.rn.f32 e, e, s, $1;
fma.rn.f32 $0, e, h, s;
}""")
_DIV_FAST_PTX: tl.constexpr = tl.constexpr("""{
.reg .f32 r, t, q, e, nb;
rcp.approx.ftz.f32 r, $2;
neg.f32 nb, $2;
fma.rn.f32 t, nb, r, 0f3F800000;
fma.rn.f32 r, r, t, r;
fma.rn.f32 q, $1, r, 0f00000000;
fma.rn.f32 e, nb, q, $1;
fma.rn.f32 $0, r, e, q;
}""")
FAST_V_MIN: tl.constexpr = tl.constexpr(2.0**-100)  # v >= this: sqrt's fast range (and a normal result)
FAST_V_MAX: tl.constexpr = tl.constexpr(2.0**100)  # row maxima <= this: denominators < 2**64
FAST_M_MIN: tl.constexpr = tl.constexpr(2.0**-60)
FAST_M_MAX: tl.constexpr = tl.constexpr(2.0**64)


@triton.jit
def _sqrt_fast(x, ASM: tl.constexpr):
    if ASM:
        return tl.inline_asm_elementwise(_SQRT_FAST_PTX, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div_fast(a, b, ASM: tl.constexpr):
    if ASM:
        return tl.inline_asm_elementwise(_DIV_FAST_PTX, "=r,r,r", [a, b], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.div_rn(a, b)


@triton.jit
def _adam_fast(p, g, m, v, beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay, ASM: tl.constexpr):
    # _adam with the fast sqrt and division: equal to it where the caller's range test passes.
    m = m * beta1 + g * omb1
    v = v * beta2 + (g * g) * omb2
    denom = _sqrt_fast(v, ASM) * inv_bc2_sqrt + eps
    new_p = p * decay - _div_fast(m, denom, ASM) * step_size
    return new_p, m, v


@triton.jit
def _update_halves(pe, po, ge, go, mb, vb, ms, vse, vso, mtab, beta1, omb1, beta2, omb2, step_size,
                   inv_bc2_sqrt, eps, decay, FAST: tl.constexpr, ASM: tl.constexpr):
    # Both nibble halves of a 4-bit tile (codes mb, vb: low nibble = first half): dequantize the first
    # moment (map value × block scale ms) and the second ((code + 1) / 16 × scale vse / vso), then
    # the AdamW update (_adam, or _adam_fast when FAST). Shared by the block-wise and rank-1 kernels.
    m_e, v_e = tl.load(mtab + (mb & 0xF)) * ms, _v16(vb & 0xF) * vse
    m_o, v_o = tl.load(mtab + (mb >> 4)) * ms, _v16(vb >> 4) * vso
    if FAST:
        new_pe, me, ve = _adam_fast(pe, ge, m_e, v_e, beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps,
                                    decay, ASM)
        new_po, mo, vo = _adam_fast(po, go, m_o, v_o, beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps,
                                    decay, ASM)
    else:
        new_pe, me, ve = _adam(pe, ge, m_e, v_e, beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps,
                               decay)
        new_po, mo, vo = _adam(po, go, m_o, v_o, beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps,
                               decay)
    return new_pe, me, ve, new_po, mo, vo


@triton.jit
def _codes_halves(me, mo, ve, vo, m_inv, v_inv_e, v_inv_o, mtab, mids, mlut, even, odd, mseed_mix,
                  M_SR: tl.constexpr, ND: tl.constexpr, MLUT: tl.constexpr):
    # The 4-bit codes of both halves: first moment by _code_m, second rounded up (_code_linear16_up).
    mqe = _code_m(_unit(me, m_inv), mtab, mids, mlut, even, mseed_mix, M_SR, ND, MLUT)
    mqo = _code_m(_unit(mo, m_inv), mtab, mids, mlut, odd, mseed_mix, M_SR, ND, MLUT)
    vqe = _code_linear16_up(_unit(ve, v_inv_e))
    vqo = _code_linear16_up(_unit(vo, v_inv_o))
    return mqe, mqo, vqe, vqo


@triton.jit
def _pack(lo, hi):
    # One byte per pair of codes: the first half's in the low nibble (qmaps.pack_nibbles).
    return (lo | (hi << 4)).to(tl.uint8)


# ---------------------------------------------------------------------------------------------
# Multi-tensor kernels: one launch covers every tensor of a kind. Program i works on tensor
# prog_t[i] at block/row prog_a[i] (and column segment prog_b[i]); the tensors' addresses come from
# an int64 table (one row per operand), like torch's multi_tensor_apply. A step of a 1B-parameter
# model then costs a handful of launches instead of a few hundred, which dominated the step time.


@triton.jit
def _ptr(table, row: tl.constexpr, T, t, DT: tl.constexpr):
    return tl.load(table + row * T + t).to(tl.pointer_type(DT))


@triton.jit
def adamw32_multi(
    ptrs, T, prog_t, prog_a, numels, seeds,
    beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay,
    BLOCK: tl.constexpr, PDT: tl.constexpr, P_BF16: tl.constexpr, ROUNDING: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(prog_t + pid)
    n = tl.load(numels + t)
    seed_mix = tl.load(seeds + t)
    p_ptr, g_ptr = _ptr(ptrs, 0, T, t, PDT), _ptr(ptrs, 1, T, t, PDT)
    m_ptr, v_ptr = _ptr(ptrs, 2, T, t, tl.float32), _ptr(ptrs, 3, T, t, tl.float32)
    comp_ptr = _ptr(ptrs, 4, T, t, tl.bfloat16)
    offs = tl.load(prog_a + pid) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0)
    v = tl.load(v_ptr + offs, mask=mask, other=0)
    new_p, m, v = _adam(p, g, m, v, beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    _store_param(p_ptr, comp_ptr, offs, mask, p, new_p, seed_mix, P_BF16, ROUNDING)


@triton.jit
def adamw8bit_multi(
    ptrs, T, prog_t, prog_a, numels, seeds, mtab, mlut, mpmid, vtab, vlut, vpmid,
    beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay,
    BPP: tl.constexpr, MZ: tl.constexpr, PDT: tl.constexpr, P_BF16: tl.constexpr, ROUNDING: tl.constexpr,
):
    # Both moments block-wise (256) with the dynamic map; program = BPP blocks of one tensor.
    pid = tl.program_id(0)
    t = tl.load(prog_t + pid)
    n = tl.load(numels + t)
    seed_mix = tl.load(seeds + t)
    p_ptr, g_ptr = _ptr(ptrs, 0, T, t, PDT), _ptr(ptrs, 1, T, t, PDT)
    mq_ptr, mabs_ptr = _ptr(ptrs, 2, T, t, tl.uint8), _ptr(ptrs, 3, T, t, tl.float32)
    vq_ptr, vabs_ptr = _ptr(ptrs, 4, T, t, tl.uint8), _ptr(ptrs, 5, T, t, tl.float32)
    comp_ptr = _ptr(ptrs, 6, T, t, tl.bfloat16)
    rows = tl.load(prog_a + pid) * BPP + tl.arange(0, BPP)
    offs = rows[:, None] * 256 + tl.arange(0, 256)[None, :]
    mask = offs < n
    rmask = rows * 256 < n
    p = tl.load(p_ptr + offs, mask=mask, other=0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(tl.float32)
    mc = tl.load(mq_ptr + offs, mask=mask, other=0).to(tl.int32)
    vc = tl.load(vq_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(mtab + mc) * tl.load(mabs_ptr + rows, mask=rmask, other=0)[:, None]
    v = tl.load(vtab + vc) * tl.load(vabs_ptr + rows, mask=rmask, other=0)[:, None]
    new_p, m, v = _adam(p, g, m, v, beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay)

    m_abs = tl.max(tl.where(mask, tl.abs(m), 0.0), axis=1)
    v_abs = tl.max(tl.where(mask, v, 0.0), axis=1)
    mq = _code(_unit(m, _inv(m_abs)[:, None]), mlut, mpmid, MZ)
    vq = _code(_unit(v, _inv(v_abs)[:, None]), vlut, vpmid, 0)
    tl.store(mq_ptr + offs, mq.to(tl.uint8), mask=mask)
    tl.store(vq_ptr + offs, vq.to(tl.uint8), mask=mask)
    tl.store(mabs_ptr + rows, m_abs, mask=rmask)
    tl.store(vabs_ptr + rows, v_abs, mask=rmask)
    _store_param(p_ptr, comp_ptr, offs, mask, p, new_p, seed_mix, P_BF16, ROUNDING)


@triton.jit
def adamw4bit_flat_multi(
    ptrs, T, prog_t, prog_a, numels, seeds, mseeds, mtab, mmid, mlut,
    beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay,
    BPP: tl.constexpr, PDT: tl.constexpr, P_BF16: tl.constexpr, ROUNDING: tl.constexpr,
    M_SR: tl.constexpr, ND: tl.constexpr, MLUT: tl.constexpr,
):
    # Both moments block-wise (128), for 1-D tensors. Byte j of block b holds elements 128b + j
    # (low nibble) and 128b + 64 + j (high nibble): see qmaps.pack_nibbles.
    pid = tl.program_id(0)
    t = tl.load(prog_t + pid)
    n = tl.load(numels + t)
    seed_mix = tl.load(seeds + t)
    p_ptr, g_ptr = _ptr(ptrs, 0, T, t, PDT), _ptr(ptrs, 1, T, t, PDT)
    mq_ptr, mabs_ptr = _ptr(ptrs, 2, T, t, tl.uint8), _ptr(ptrs, 3, T, t, tl.float32)
    vq_ptr, vabs_ptr = _ptr(ptrs, 4, T, t, tl.uint8), _ptr(ptrs, 5, T, t, tl.float32)
    comp_ptr = _ptr(ptrs, 6, T, t, tl.bfloat16)
    rows = tl.load(prog_a + pid) * BPP + tl.arange(0, BPP)
    j = tl.arange(0, 64)[None, :]
    boffs = rows[:, None] * 64 + j
    even = rows[:, None] * 128 + j  # low nibbles: the first half of the block
    odd = even + 64  # high nibbles: the second half
    emask, omask = even < n, odd < n
    rmask = rows * 128 < n
    bmask = rmask[:, None] & (j >= 0)
    mb = tl.load(mq_ptr + boffs, mask=bmask, other=0).to(tl.int32)
    vb = tl.load(vq_ptr + boffs, mask=bmask, other=0).to(tl.int32)
    ms = tl.load(mabs_ptr + rows, mask=rmask, other=0)[:, None]
    vs = tl.load(vabs_ptr + rows, mask=rmask, other=0)[:, None]
    pe = tl.load(p_ptr + even, mask=emask, other=0).to(tl.float32)
    po = tl.load(p_ptr + odd, mask=omask, other=0).to(tl.float32)
    ge = tl.load(g_ptr + even, mask=emask, other=0).to(tl.float32)
    go = tl.load(g_ptr + odd, mask=omask, other=0).to(tl.float32)
    new_pe, me, ve, new_po, mo, vo = _update_halves(
        pe, po, ge, go, mb, vb, ms, vs, vs, mtab,
        beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay, False, False)
    me, mo = tl.where(emask, me, 0.0), tl.where(omask, mo, 0.0)
    ve, vo = tl.where(emask, ve, 0.0), tl.where(omask, vo, 0.0)
    m_abs = tl.maximum(tl.max(tl.abs(me), axis=1), tl.max(tl.abs(mo), axis=1))
    v_abs = tl.maximum(tl.max(ve, axis=1), tl.max(vo, axis=1))
    m_inv = _inv(m_abs)[:, None]
    v_inv = _inv(v_abs)[:, None]
    mseed_mix = tl.load(mseeds + t)
    mids = _mids_sym(mmid)
    mqe, mqo, vqe, vqo = _codes_halves(me, mo, ve, vo, m_inv, v_inv, v_inv, mtab, mids, mlut, even, odd,
                                       mseed_mix, M_SR, ND, MLUT)
    # padding: code 0
    mqe, mqo = tl.where(emask, mqe, 0), tl.where(omask, mqo, 0)
    vqe, vqo = tl.where(emask, vqe, 0), tl.where(omask, vqo, 0)
    tl.store(mq_ptr + boffs, _pack(mqe, mqo), mask=bmask)
    tl.store(vq_ptr + boffs, _pack(vqe, vqo), mask=bmask)
    tl.store(mabs_ptr + rows, m_abs, mask=rmask)
    tl.store(vabs_ptr + rows, v_abs, mask=rmask)
    _store_param(p_ptr, comp_ptr, even, emask, pe, new_pe, seed_mix, P_BF16, ROUNDING)
    _store_param(p_ptr, comp_ptr, odd, omask, po, new_po, seed_mix, P_BF16, ROUNDING)
