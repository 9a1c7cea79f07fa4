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


@triton.jit
def _ptr_al(table, row: tl.constexpr, T, t, DT: tl.constexpr, ALIGN: tl.constexpr):
    # _ptr for an operand whose address the host checked to be a multiple of 16 bytes (ALIGN): with
    # the hint on the loaded address the compiler can emit 16-byte vector loads and stores (it
    # cannot see the alignment of an address read from the table).
    # (The hint must sit on the pointer itself: on the loaded integer it does not carry through
    # the cast.)
    p = tl.load(table + row * T + t).to(tl.pointer_type(DT))
    if ALIGN:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _amax_nonneg(ptr, val, mask, RELAXED: tl.constexpr):
    # atomic max of nonnegative fp32 values (v): their bits order as int32, so one relaxed integer
    # max (a fire-and-forget reduction) does; tl.atomic_max on floats emits a compare-and-branch
    # between two atomics, each fenced (acq_rel). The kernel boundary orders the results anyway.
    if RELAXED:
        tl.atomic_max(ptr.to(tl.pointer_type(tl.int32)), val.to(tl.int32, bitcast=True), mask=mask,
                      sem="relaxed")
    else:
        tl.atomic_max(ptr, val, mask=mask)


@triton.jit
def v_rowcol_max_multi(
    ptrs, T, prog_t, prog_a, prog_b, nrows_ptr, ncols_ptr, flat_off, new_ptr, beta2, omb2,
    RB: tl.constexpr, BR: tl.constexpr, S: tl.constexpr, PDT: tl.constexpr, ALIGN: tl.constexpr,
    RELAXED: tl.constexpr, NS: tl.constexpr,
):
    # Pass 1 of the 4-bit rank-1 step: row and column maxima of the new second moment, into the
    # zeroed flat buffer new_ptr (tensor t: its rows at flat_off[t], then its columns). A program
    # covers RB rows × S 128-column segments, BR rows per iteration, and keeps elementwise column
    # maxima in registers (reduced across rows once, at the end): one column atomic per RB rows and
    # one row atomic per S segments (a 1-segment tile per program issued an atomic per 64 elements).
    pid = tl.program_id(0)
    t = tl.load(prog_t + pid)
    nrows, ncols = tl.load(nrows_ptr + t), tl.multiple_of(tl.load(ncols_ptr + t), 128)
    segs = ncols // 128
    g_ptr, vq_ptr = _ptr_al(ptrs, 1, T, t, PDT, ALIGN), _ptr_al(ptrs, 4, T, t, tl.uint8, ALIGN)
    row_old, col_old = _ptr(ptrs, 5, T, t, tl.float32), _ptr(ptrs, 6, T, t, tl.float32)
    row_new = new_ptr + tl.load(flat_off + t)
    col_new = row_new + nrows
    k = tl.arange(0, S * 64)
    j = k % 64
    seg = tl.load(prog_b + pid) * S + k // 64
    ce = seg * 128 + j  # even columns (low nibbles); odd ones are ce + 64
    cmask = seg < segs
    col_e = tl.load(col_old + ce, mask=cmask, other=0)[None, :]
    col_o = tl.load(col_old + ce + 64, mask=cmask, other=0)[None, :]
    acc_e = tl.zeros([BR, S * 64], tl.float32)
    acc_o = tl.zeros([BR, S * 64], tl.float32)
    r0 = tl.load(prog_a + pid) * RB
    for i in tl.range(0, RB, BR, num_stages=NS):
        r = r0 + i + tl.arange(0, BR)
        rmask = r < nrows
        mask = rmask[:, None] & cmask[None, :]
        even = r[:, None] * ncols + ce[None, :]
        boffs = (r[:, None] * segs + seg[None, :]) * 64 + j[None, :]
        vb = tl.load(vq_ptr + boffs, mask=mask, other=0).to(tl.int32)
        row = tl.load(row_old + r, mask=rmask, other=0)[:, None]
        se = tl.minimum(row, col_e)
        so = tl.minimum(row, col_o)
        ge = tl.load(g_ptr + even, mask=mask, other=0).to(tl.float32)
        go = tl.load(g_ptr + even + 64, mask=mask, other=0).to(tl.float32)
        # Same expression as _adam's v (and the reference's), so the maxima are of pass 2's v.
        ve = tl.where(mask, (_v16(vb & 0xF) * se) * beta2 + (ge * ge) * omb2, 0.0)
        vo = tl.where(mask, (_v16(vb >> 4) * so) * beta2 + (go * go) * omb2, 0.0)
        _amax_nonneg(row_new + r, tl.maximum(tl.max(ve, axis=1), tl.max(vo, axis=1)), rmask, RELAXED)
        acc_e = tl.maximum(acc_e, ve)
        acc_o = tl.maximum(acc_o, vo)
    _amax_nonneg(col_new + ce, tl.max(acc_e, axis=0), cmask, RELAXED)
    _amax_nonneg(col_new + ce + 64, tl.max(acc_o, axis=0), cmask, RELAXED)


@triton.jit
def rank1_swap_multi(
    ptrs, T, prog_t, prog_a, nrows_ptr, ncols_ptr, flat_off, new_ptr, old_ptr, inv_ptr,
    BLOCK: tl.constexpr,
):
    # Between the passes, for every row and column maximum at once: the state takes the new
    # maximum (so no copy is needed after pass 2), the old one moves to old_ptr (pass 2 dequantizes
    # v with it) and inv_ptr gets 1 / new with 0 → 1 (qmaps.safe_scale): pass 2 then multiplies.
    pid = tl.program_id(0)
    t = tl.load(prog_t + pid)
    nrows, ncols = tl.load(nrows_ptr + t), tl.load(ncols_ptr + t)
    row_st, col_st = _ptr(ptrs, 5, T, t, tl.float32), _ptr(ptrs, 6, T, t, tl.float32)
    i = tl.load(prog_a + pid) * BLOCK + tl.arange(0, BLOCK)
    flat = tl.load(flat_off + t) + i
    is_row = i < nrows
    rm = is_row
    cm = (i >= nrows) & (i < nrows + ncols)
    mask = rm | cm
    old = tl.where(is_row, tl.load(row_st + i, mask=rm, other=0),
                   tl.load(col_st + (i - nrows), mask=cm, other=0))
    new = tl.load(new_ptr + flat, mask=mask, other=0)
    tl.store(row_st + i, new, mask=rm)
    tl.store(col_st + (i - nrows), new, mask=cm)
    tl.store(old_ptr + flat, old, mask=mask)
    tl.store(inv_ptr + flat, _inv(new), mask=mask)


@triton.jit
def adamw4bit_rank1_multi(
    ptrs, T, prog_t, prog_a, prog_b, nrows_ptr, ncols_ptr, flat_off, old_ptr, inv_ptr, seeds, mseeds,
    mtab, mmid, mlut, beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay,
    BR: tl.constexpr, L: tl.constexpr, PDT: tl.constexpr, P_BF16: tl.constexpr, ROUNDING: tl.constexpr,
    M_SR: tl.constexpr, ND: tl.constexpr, ALIGN: tl.constexpr, MLUT: tl.constexpr, FAST: tl.constexpr,
    ASM: tl.constexpr, EVICT: tl.constexpr, NS: tl.constexpr,
):
    # Pass 2: matrices with ncols % 128 == 0, so each tile row segment is one first-moment block.
    # A program covers BR rows × L consecutive 128-column segments, one segment per iteration: the
    # prologue (table lookups, row scales, midpoints), a chain of dependent loads, is paid once per
    # L tiles. The old row/column maxima (for dequantizing v) and the reciprocals of the new ones
    # come from the flat buffers rank1_swap_multi filled (tensor t at flat_off[t]: rows, columns).
    # FAST: square roots and divisions by _adam_fast, the tile recomputed with the IEEE ops when any
    # operand is outside their fast range (see _sqrt_fast). EVICT: the eviction policy of the loads of
    # parameters and gradients ("" or "evict_first": they are streamed once). NS: software pipeline
    # stages of the segment loop (1: none; >= 2: the next segment's loads are issued, as asynchronous
    # copies, before this one is computed, at about twice the registers).
    pid = tl.program_id(0)
    t = tl.load(prog_t + pid)
    nrows, ncols = tl.load(nrows_ptr + t), tl.multiple_of(tl.load(ncols_ptr + t), 128)
    segs = ncols // 128
    seed_mix = tl.load(seeds + t)
    mseed_mix = tl.load(mseeds + t)
    p_ptr, g_ptr = _ptr_al(ptrs, 0, T, t, PDT, ALIGN), _ptr_al(ptrs, 1, T, t, PDT, ALIGN)
    mq_ptr = _ptr_al(ptrs, 2, T, t, tl.uint8, ALIGN)
    mabs_ptr = _ptr(ptrs, 3, T, t, tl.float32)
    vq_ptr = _ptr_al(ptrs, 4, T, t, tl.uint8, ALIGN)
    comp_ptr = _ptr_al(ptrs, 7, T, t, tl.bfloat16, ALIGN)
    base = tl.load(flat_off + t)
    col_old, col_inv = old_ptr + base + nrows, inv_ptr + base + nrows
    mids = _mids_sym(mmid)
    r = tl.load(prog_a + pid) * BR + tl.arange(0, BR)
    rmask = r < nrows
    row = tl.load(old_ptr + base + r, mask=rmask, other=0)[:, None]
    inv_row1 = tl.load(inv_ptr + base + r, mask=rmask, other=1.0)
    inv_row = inv_row1[:, None]
    j = tl.arange(0, 64)
    for i in tl.range(L, num_stages=NS):
        seg = tl.load(prog_b + pid) * L + i
        ce = seg * 128 + j
        # Rows of this tile that exist, none when the segment is past the row's end (as a row
        # bound: a [BR, 1] mask keeps the 16-byte vectors along the columns).
        bmask = r < nrows * (seg < segs).to(tl.int32)
        mask = bmask[:, None]
        even = r[:, None] * ncols + ce[None, :]
        odd = even + 64
        mblk = r * segs + seg
        boffs = mblk[:, None] * 64 + j[None, :]
        mb = tl.load(mq_ptr + boffs, mask=mask, other=0).to(tl.int32)
        vb = tl.load(vq_ptr + boffs, mask=mask, other=0).to(tl.int32)
        ms = tl.load(mabs_ptr + mblk, mask=bmask, other=0)[:, None]
        vse = tl.minimum(row, tl.load(col_old + ce, mask=ce < ncols, other=0)[None, :])
        vso = tl.minimum(row, tl.load(col_old + ce + 64, mask=ce < ncols, other=0)[None, :])
        pe = tl.load(p_ptr + even, mask=mask, other=0, eviction_policy=EVICT).to(tl.float32)
        po = tl.load(p_ptr + odd, mask=mask, other=0, eviction_policy=EVICT).to(tl.float32)
        ge = tl.load(g_ptr + even, mask=mask, other=0, eviction_policy=EVICT).to(tl.float32)
        go = tl.load(g_ptr + odd, mask=mask, other=0, eviction_policy=EVICT).to(tl.float32)
        new_pe, me, ve, new_po, mo, vo = _update_halves(
            pe, po, ge, go, mb, vb, ms, vse, vso, mtab,
            beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay, FAST, ASM)
        m_abs = tl.maximum(tl.max(tl.where(mask, tl.abs(me), 0.0), axis=1),
                           tl.max(tl.where(mask, tl.abs(mo), 0.0), axis=1))
        if FAST:
            # The fast ops' range (see _sqrt_fast), per row of the tile: v >= 2**-100, v <= the new
            # row maximum <= 2**100 (so sqrt(v) * inv_bc2_sqrt + eps < 2**64: the host checks
            # inv_bc2_sqrt and eps), 2**-60 <= |m| < 2**64. Otherwise redo the tile's updates.
            vmin = tl.min(tl.minimum(ve, vo), axis=1)
            mmin = tl.min(tl.minimum(tl.abs(me), tl.abs(mo)), axis=1)
            bad = bmask & ((vmin < FAST_V_MIN) | (inv_row1 < 1.0 / FAST_V_MAX) | (mmin < FAST_M_MIN)
                           | (m_abs >= FAST_M_MAX))
            if tl.max(bad.to(tl.int32), axis=0) > 0:
                new_pe = pe * decay - tl.div_rn(me, tl.sqrt_rn(ve) * inv_bc2_sqrt + eps) * step_size
                new_po = po * decay - tl.div_rn(mo, tl.sqrt_rn(vo) * inv_bc2_sqrt + eps) * step_size
        m_inv = _inv(m_abs)[:, None]
        # 1 / min(row, col) = max(1 / row, 1 / col) exactly (rounding is monotone); a zero scale
        # means the whole row or column of v is 0, which codes the same under any finite factor.
        inv_e = tl.maximum(inv_row, tl.load(col_inv + ce, mask=ce < ncols, other=1.0)[None, :])
        inv_o = tl.maximum(inv_row, tl.load(col_inv + ce + 64, mask=ce < ncols, other=1.0)[None, :])
        mqe, mqo, vqe, vqo = _codes_halves(me, mo, ve, vo, m_inv, inv_e, inv_o, mtab, mids, mlut, even, odd,
                                           mseed_mix, M_SR, ND, MLUT)
        tl.store(mq_ptr + boffs, _pack(mqe, mqo), mask=mask)
        tl.store(vq_ptr + boffs, _pack(vqe, vqo), mask=mask)
        tl.store(mabs_ptr + mblk, m_abs, mask=bmask)
        _store_param(p_ptr, comp_ptr, even, mask, pe, new_pe, seed_mix, P_BF16, ROUNDING)
        _store_param(p_ptr, comp_ptr, odd, mask, po, new_po, seed_mix, P_BF16, ROUNDING)
