"""Triton side of the 4-bit AdamW step with a rank-1 (row/column) second moment: the pass over the
new second moment's row and column maxima, the swap between the passes, and the update pass.
Device helpers shared with the other steps are in _optim_adamw_triton.py; the host side is
lowbit/kernels/optim_adamw_lowbit.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._optim_adamw_triton import (
    FAST_M_MAX,
    FAST_M_MIN,
    FAST_V_MAX,
    FAST_V_MIN,
    _codes_halves,
    _inv,
    _mids_sym,
    _pack,
    _ptr,
    _store_param,
    _update_halves,
    _v16,
)


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
