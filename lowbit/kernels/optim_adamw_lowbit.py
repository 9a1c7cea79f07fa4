"""Fused Triton steps for 8-bit and 4-bit AdamW: dequantize → update → requantize in registers.

One pass reads param, grad and the quantized moments and writes param and moments back: 16 B/param
for fp32 params at 8 bits (fused fp32 AdamW moves 28). The 4-bit second moment is rank-1 normalized
by the row/column maxima of the *new* moment, which are only known after the update, so the 4-bit
step on matrices adds a first pass that recomputes v and takes the maxima with atomics (+4.5 B/param).

Every fp32 operation mirrors lowbit/optim/adamw.py (`adamw_math`, qmaps quantizers) in the same
order with IEEE division and square root, so under TRITON_INTERPRET=1 the kernels reproduce the
reference bit for bit. BF16 params are rounded in integer arithmetic (nearest-even, stochastic with
the lowbias32 hash of (element index, seed), or Kahan-compensated) so the final cast is exact.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from lowbit.optim import qmaps
from lowbit.optim.rounding import GOLDEN32, MASK32

ROUNDING_CODE = {"nearest": 0, "stochastic": 1, "kahan": 2}


@triton.jit
def _search(x, mid_ptr, LOG2: tl.constexpr):
    # Branch-free binary search: the count of midpoints below x = index of the nearest map value.
    idx = tl.zeros(x.shape, tl.int32)
    for s in tl.static_range(LOG2):
        cand = idx + (1 << (LOG2 - 1 - s))
        mv = tl.load(mid_ptr + cand - 1)
        idx = tl.where(mv < x, cand, idx)
    return idx


@triton.jit
def _hash(x):
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _round_bf16(x, offs, seed_mix, STOCHASTIC: tl.constexpr):
    # fp32 → fp32 holding a BF16 value; the later cast to bf16 is then exact.
    u = x.to(tl.uint32, bitcast=True)
    if STOCHASTIC:
        noise = _hash(offs.to(tl.uint32) + seed_mix.to(tl.uint32)) & 0xFFFF
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


@triton.jit
def _adamw8bit_kernel(
    p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, mtab, mmid, vtab, vmid, comp_ptr,
    n, beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay, seed_mix,
    QB: tl.constexpr, BPP: tl.constexpr, P_BF16: tl.constexpr, ROUNDING: tl.constexpr,
):
    rows = tl.program_id(0) * BPP + tl.arange(0, BPP)
    offs = rows[:, None] * QB + tl.arange(0, QB)[None, :]
    mask = offs < n
    rmask = rows * QB < n
    p = tl.load(p_ptr + offs, mask=mask, other=0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(tl.float32)
    mc = tl.load(mq_ptr + offs, mask=mask, other=0).to(tl.int32)
    vc = tl.load(vq_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(mtab + mc) * tl.load(mabs_ptr + rows, mask=rmask, other=0)[:, None]
    v = tl.load(vtab + vc) * tl.load(vabs_ptr + rows, mask=rmask, other=0)[:, None]
    new_p, m, v = _adam(p, g, m, v, beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay)

    m_abs = tl.max(tl.where(mask, tl.abs(m), 0.0), axis=1)
    v_abs = tl.max(tl.where(mask, v, 0.0), axis=1)
    mq = _search(tl.div_rn(m, tl.where(m_abs > 0, m_abs, 1.0)[:, None]), mmid, 8)
    vq = _search(tl.div_rn(v, tl.where(v_abs > 0, v_abs, 1.0)[:, None]), vmid, 8)
    tl.store(mq_ptr + offs, mq.to(tl.uint8), mask=mask)
    tl.store(vq_ptr + offs, vq.to(tl.uint8), mask=mask)
    tl.store(mabs_ptr + rows, m_abs, mask=rmask)
    tl.store(vabs_ptr + rows, v_abs, mask=rmask)
    _store_param(p_ptr, comp_ptr, offs, mask, p, new_p, seed_mix, P_BF16, ROUNDING)


@triton.jit
def _v_scale(offs, mask, vabs_ptr, row_ptr, col_ptr, ncols, QB: tl.constexpr, RANK1: tl.constexpr):
    if RANK1:
        r = tl.load(row_ptr + offs // ncols, mask=mask, other=0)
        c = tl.load(col_ptr + offs % ncols, mask=mask, other=0)
        return tl.minimum(r, c)
    else:
        return tl.load(vabs_ptr + offs // QB, mask=mask, other=0)


@triton.jit
def _nibble(packed_ptr, offs, mask):
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    return (byte >> ((offs % 2) * 4)) & 0xF


@triton.jit
def _v_rowcol_max_kernel(
    g_ptr, vq_ptr, vtab, row_old, col_old, row_new, col_new, nrows, ncols, beta2, omb2,
    BR: tl.constexpr, BC: tl.constexpr,
):
    # Pass 1 of the 4-bit rank-1 step: the new second moment's row and column maxima.
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (r[:, None] < nrows) & (c[None, :] < ncols)
    offs = r[:, None] * ncols + c[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(tl.float32)
    row = tl.load(row_old + r, mask=r < nrows, other=0)
    col = tl.load(col_old + c, mask=c < ncols, other=0)
    scale = tl.minimum(row[:, None], col[None, :])
    v = tl.load(vtab + _nibble(vq_ptr, offs, mask)) * scale
    v = v * beta2 + (g * g) * omb2
    v = tl.where(mask, v, 0.0)
    tl.atomic_max(row_new + r, tl.max(v, axis=1), mask=r < nrows)
    tl.atomic_max(col_new + c, tl.max(v, axis=0), mask=c < ncols)


@triton.jit
def _adamw4bit_half(
    p_ptr, g_ptr, offs, mask, m_scale, mq_ptr, mtab, vq_ptr, vtab, vabs_ptr, row_ptr, col_ptr, ncols,
    beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay, QB: tl.constexpr, RANK1: tl.constexpr,
):
    p = tl.load(p_ptr + offs, mask=mask, other=0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(tl.float32)
    m = tl.load(mtab + _nibble(mq_ptr, offs, mask)) * m_scale
    v_scale = _v_scale(offs, mask, vabs_ptr, row_ptr, col_ptr, ncols, QB, RANK1)
    v = tl.load(vtab + _nibble(vq_ptr, offs, mask)) * v_scale
    new_p, m, v = _adam(p, g, m, v, beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay)
    return p, new_p, m, v


@triton.jit
def _adamw4bit_kernel(
    p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, row_old, col_old, row_new, col_new,
    mtab, mmid, vtab, vmid, comp_ptr, n, ncols,
    beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay, seed_mix,
    QB: tl.constexpr, BPP: tl.constexpr, RANK1: tl.constexpr, P_BF16: tl.constexpr, ROUNDING: tl.constexpr,
):
    HALF: tl.constexpr = QB // 2
    rows = tl.program_id(0) * BPP + tl.arange(0, BPP)
    boffs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]  # byte index: elements 2b and 2b+1
    rmask = rows * QB < n
    bmask = boffs * 2 < n
    even, odd = boffs * 2, boffs * 2 + 1
    emask, omask = even < n, odd < n
    m_scale = tl.load(mabs_ptr + rows, mask=rmask, other=0)[:, None]
    pe, new_pe, me, ve = _adamw4bit_half(
        p_ptr, g_ptr, even, emask, m_scale, mq_ptr, mtab, vq_ptr, vtab, vabs_ptr, row_old, col_old, ncols,
        beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay, QB, RANK1)
    po, new_po, mo, vo = _adamw4bit_half(
        p_ptr, g_ptr, odd, omask, m_scale, mq_ptr, mtab, vq_ptr, vtab, vabs_ptr, row_old, col_old, ncols,
        beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay, QB, RANK1)
    me, mo = tl.where(emask, me, 0.0), tl.where(omask, mo, 0.0)
    ve, vo = tl.where(emask, ve, 0.0), tl.where(omask, vo, 0.0)

    m_abs = tl.maximum(tl.max(tl.abs(me), axis=1), tl.max(tl.abs(mo), axis=1))
    m_safe = tl.where(m_abs > 0, m_abs, 1.0)[:, None]
    mqe = _search(tl.div_rn(me, m_safe), mmid, 4)
    mqo = _search(tl.div_rn(mo, m_safe), mmid, 4)
    if RANK1:
        se = _v_scale(even, emask, vabs_ptr, row_new, col_new, ncols, QB, RANK1)
        so = _v_scale(odd, omask, vabs_ptr, row_new, col_new, ncols, QB, RANK1)
    else:
        v_abs = tl.maximum(tl.max(ve, axis=1), tl.max(vo, axis=1))
        tl.store(vabs_ptr + rows, v_abs, mask=rmask)
        se = v_abs[:, None]
        so = v_abs[:, None]
    vqe = _search(tl.div_rn(ve, tl.where(se > 0, se, 1.0)), vmid, 4)
    vqo = _search(tl.div_rn(vo, tl.where(so > 0, so, 1.0)), vmid, 4)
    # Codes of padding elements are 0, as the reference's packing pads with 0.
    mqo, vqo = tl.where(omask, mqo, 0), tl.where(omask, vqo, 0)
    tl.store(mq_ptr + boffs, (mqe | (mqo << 4)).to(tl.uint8), mask=bmask)
    tl.store(vq_ptr + boffs, (vqe | (vqo << 4)).to(tl.uint8), mask=bmask)
    tl.store(mabs_ptr + rows, m_abs, mask=rmask)
    _store_param(p_ptr, comp_ptr, even, emask, pe, new_pe, seed_mix, P_BF16, ROUNDING)
    _store_param(p_ptr, comp_ptr, odd, omask, po, new_po, seed_mix, P_BF16, ROUNDING)


def fused_adamw_step_(opt: Any, p: torch.Tensor, grad: torch.Tensor, st: dict, s: dict, seed: int) -> None:
    """One fused step of LowBitAdamW (8 or 4 state bits) on parameter `p`, state `st`, in place."""
    if not p.is_contiguous():
        raise ValueError("fused low-bit AdamW needs contiguous parameters")
    g = grad.contiguous()
    n = p.numel()
    bf16 = p.dtype == torch.bfloat16
    rounding = ROUNDING_CODE[opt.bf16_rounding] if bf16 else 0
    comp = st.get("kahan_comp", p)
    seed_mix = (seed * GOLDEN32) & MASK32
    args = (s["beta1"], s["omb1"], s["beta2"], s["omb2"], s["step_size"], s["inv_bc2_sqrt"], s["eps"],
            s["decay"], seed_mix)
    if opt.state_bits == 8:
        mtab, mmid = qmaps.table_on(qmaps.dynamic_map(8, True), p.device)
        vtab, vmid = qmaps.table_on(qmaps.dynamic_map(8, False), p.device)
        bpp = 4
        grid = (triton.cdiv(triton.cdiv(n, 256), bpp),)
        _adamw8bit_kernel[grid](
            p, g, st["exp_avg_codes"], st["exp_avg_absmax"], st["exp_avg_sq_codes"], st["exp_avg_sq_absmax"],
            mtab, mmid, vtab, vmid, comp, n, *args, QB=256, BPP=bpp, P_BF16=bf16, ROUNDING=rounding,
            num_warps=4,
        )
        return
    mtab, mmid = qmaps.table_on(qmaps.dynamic_map(4, True), p.device)
    vtab, vmid = qmaps.table_on(qmaps.linear_map_nozero(4), p.device)
    rank1 = opt._uses_rank1(p)
    if rank1:
        row_old, col_old = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
        nrows, ncols = row_old.numel(), col_old.numel()
        row_new, col_new = torch.zeros_like(row_old), torch.zeros_like(col_old)
        br, bc = 32, 64
        _v_rowcol_max_kernel[(triton.cdiv(nrows, br), triton.cdiv(ncols, bc))](
            g, st["exp_avg_sq_codes"], vtab, row_old, col_old, row_new, col_new, nrows, ncols,
            s["beta2"], s["omb2"], BR=br, BC=bc, num_warps=4,
        )
        vabs = row_old  # unused
    else:
        row_old = col_old = row_new = col_new = vabs = st["exp_avg_sq_absmax"]
        ncols = 1
    bpp = 8
    grid = (triton.cdiv(triton.cdiv(n, 128), bpp),)
    _adamw4bit_kernel[grid](
        p, g, st["exp_avg_codes"], st["exp_avg_absmax"], st["exp_avg_sq_codes"], vabs,
        row_old, col_old, row_new, col_new, mtab, mmid, vtab, vmid, comp, n, ncols, *args,
        QB=128, BPP=bpp, RANK1=rank1, P_BF16=bf16, ROUNDING=rounding, num_warps=4,
    )
    if rank1:
        row_old.copy_(row_new)
        col_old.copy_(col_new)
