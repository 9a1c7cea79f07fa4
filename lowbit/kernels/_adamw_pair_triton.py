"""Triton side of the AdamW step that writes the fp8 delayed-scaling pair of each updated weight
(lowbit.kernels.adamw_pair): one program updates one [BR, BC] tile of a 2-D fp32 weight (AdamW, as
lowbit.optim's fp32 AdamW kernels compute it) and, while the new values are in registers, writes
their codes for W (fprop) and W^T (dgrad) under the tensor scale of the weight's amax history,
recording the tile's amax for that history.

Separately, the forward pass's pair kernel read every quantized weight again (4 bytes an element)
after the optimizer had written it. The history's scale is known before the step (delayed scaling
takes the history's max; the tensor's own amax only enters the history), so the codes equal what the
next forward's pair kernel would write, bit for bit. The one exception, a history of zeros (the
scale is then the new weight's own amax, known only after every tile), is redone by a second,
batched launch that returns at once for every other weight; a third rolls each amax into its
history rows and zeroes the record word for the next step.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._optim_adamw_triton import _adam
from lowbit.kernels._pair_quantize_triton import _history_bits, _record, _roll_rows, _side, _tile_amax_bits
from lowbit.kernels._quant_math_triton import _encode, _scaled, _scales


@triton.jit
def _adamw_tile(p_ptr, g_ptr, m_ptr, v_ptr, gs_ptr, idx, msk, beta1, omb1, beta2, omb2, step_size,
                inv_bc2_sqrt, eps, decay, HAS_GS: tl.constexpr):
    # One tile's AdamW step (the fp32 AdamW kernels' own update, lowbit.optim.adamw.adamw_math), the
    # gradient divided by grad_scale first (clipping folded in). Stores p, m, v and returns the new
    # p (0 outside the matrix).
    p = tl.load(p_ptr + idx, msk, other=0.0)
    g = tl.load(g_ptr + idx, msk, other=0.0)
    m = tl.load(m_ptr + idx, msk, other=0.0)
    v = tl.load(v_ptr + idx, msk, other=0.0)
    if HAS_GS:
        g = tl.div_rn(g, tl.load(gs_ptr))
    p, m, v = _adam(p, g, m, v, beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay)
    tl.store(p_ptr + idx, p, msk)
    tl.store(m_ptr + idx, m, msk)
    tl.store(v_ptr + idx, v, msk)
    return p


@triton.jit
def _store_pair(x, r0, c0, R, C, tamax, d_ptr, dt_ptr, s_ptr, st_ptr, a_ptr, MBITS: tl.constexpr,
                EMIN: tl.constexpr, EMAX: tl.constexpr, FMAX: tl.constexpr, HAS_INF: tl.constexpr,
                ENC: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, FAST: tl.constexpr, DIV: tl.constexpr,
                DIV_T: tl.constexpr):
    # W's and W^T's codes of the tile x under one tensor amax `tamax` ([1, 1]), as the pair kernel
    # writes them (_pair_quantize_triton._pair_kernel: its FAST form on the GPU, its generic side in
    # the interpreter); the tile at (0, 0) stores both scales, and `tamax` at a_ptr: a resumed run
    # writes the same codes again from it (lowbit.trainer.weight_pair_step.WeightPairStep.restore).
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    xt = tl.trans(x)
    if (r0 == 0) & (c0 == 0):
        tl.store(a_ptr + tl.zeros([1, 1], tl.int32), tamax)
    if FAST:
        s, eff = _scales(tamax, 1.0, FMAX, EMAX, 0)
        if (r0 == 0) & (c0 == 0):
            tl.store(s_ptr + tl.zeros([1, 1], tl.int32), s)
            tl.store(st_ptr + tl.zeros([1, 1], tl.int32), s)
        codes = _encode(_scaled(x, eff, 0, DIV), ENC, True)
        codes_t = _encode(_scaled(xt, eff, 0, DIV_T), ENC, True)
    else:
        codes = _side(x, r0, c0, R, C, tamax, s_ptr, 0, 0, 0, 0, BR, BC, MBITS, EMIN, EMAX, FMAX, HAS_INF,
                      False, ENC, 0, False, False, False, DIV)
        codes_t = _side(xt, c0, r0, C, R, tamax, st_ptr, 0, 0, 0, 0, BC, BR, MBITS, EMIN, EMAX, FMAX, HAS_INF,
                        False, ENC, 0, False, False, True, DIV_T)
    m = (rows[:, None] < R) & (cols[None, :] < C)
    tl.store(d_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], codes.to(tl.uint8), m)
    mt = (cols[:, None] < C) & (rows[None, :] < R)
    tl.store(dt_ptr + cols[:, None].to(tl.int64) * R + rows[None, :], codes_t.to(tl.uint8), mt)


@triton.jit
def _adamw_pair_kernel(p_ptr, g_ptr, m_ptr, v_ptr, gs_ptr, d_ptr, dt_ptr, s_ptr, st_ptr, a_ptr, hist_ptr,
                       rec_ptr, R, C, H, beta1, omb1, beta2, omb2, step_size, inv_bc2_sqrt, eps, decay,
                       HAS_GS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
                       FMAX: tl.constexpr, HAS_INF: tl.constexpr, ENC: tl.constexpr, HP: tl.constexpr,
                       BR: tl.constexpr, BC: tl.constexpr, FAST: tl.constexpr, DIV: tl.constexpr,
                       DIV_T: tl.constexpr):
    r0 = tl.program_id(0) * BR
    c0 = tl.program_id(1) * BC
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    msk = (rows[:, None] < R) & (cols[None, :] < C)
    idx = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = _adamw_tile(p_ptr, g_ptr, m_ptr, v_ptr, gs_ptr, idx, msk, beta1, omb1, beta2, omb2, step_size,
                    inv_bc2_sqrt, eps, decay, HAS_GS)
    _record(rec_ptr, _tile_amax_bits(x))
    # The history's max (an all-zero history gives amax 0, scale 1: _fixup_kernel redoes those).
    tamax = tl.zeros([1, 1], tl.float32) + _history_bits(hist_ptr, H, HP).to(tl.float32, bitcast=True)
    _store_pair(x, r0, c0, R, C, tamax, d_ptr, dt_ptr, s_ptr, st_ptr, a_ptr, MBITS, EMIN, EMAX, FMAX, HAS_INF,
                ENC, BR, BC, FAST, DIV, DIV_T)


# Columns of the per-weight table (int64, adamw_pair.pair_table) that the batched launches read:
# 0 the weight, 1 its codes, 2 its transpose's codes, 3 and 4 their scales, 5 and 6 the fprop and
# dgrad history rows, 7 the record word, 10 the amax the codes were made with (addresses), 8 and 9
# the weight's rows and columns.
T_COLS = 11


@triton.jit
def _ptr(base, col, DT: tl.constexpr):
    return tl.load(base + col).to(tl.pointer_type(DT))


@triton.jit
def _fixup_kernel(table_ptr, H, MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
                  FMAX: tl.constexpr, HAS_INF: tl.constexpr, ENC: tl.constexpr, HP: tl.constexpr,
                  BR: tl.constexpr, BC: tl.constexpr, FAST: tl.constexpr, NCOL: tl.constexpr):
    # Program (w, j): weight w's codes again where its history held only zeros (delayed scaling's
    # first call: the scale is the weight's own amax, now complete in its record word), tiles j,
    # j + num_programs(1), ...; every other weight returns after reading its history row.
    base = table_ptr + tl.program_id(0) * NCOL
    if _history_bits(_ptr(base, 5, tl.float32), H, HP) == 0:
        p_ptr = _ptr(base, 0, tl.float32)
        R = tl.load(base + 8).to(tl.int32)
        C = tl.load(base + 9).to(tl.int32)
        own = tl.load(_ptr(base, 7, tl.int32)).to(tl.float32, bitcast=True)
        tamax = tl.zeros([1, 1], tl.float32) + own
        n_c = tl.cdiv(C, BC)
        for t in range(tl.program_id(1), tl.cdiv(R, BR) * n_c, tl.num_programs(1)):
            r0 = (t // n_c) * BR
            c0 = (t % n_c) * BC
            rows = r0 + tl.arange(0, BR)
            cols = c0 + tl.arange(0, BC)
            msk = (rows[:, None] < R) & (cols[None, :] < C)
            x = tl.load(p_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], msk, other=0.0)
            # DIV 0: IEEE division, bit for bit the other forms' result
            _store_pair(x, r0, c0, R, C, tamax, _ptr(base, 1, tl.uint8), _ptr(base, 2, tl.uint8),
                        _ptr(base, 3, tl.float32), _ptr(base, 4, tl.float32), _ptr(base, 10, tl.float32),
                        MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, BR, BC, FAST, 0, 0)


@triton.jit
def _roll_all_kernel(table_ptr, H, HP: tl.constexpr, NCOL: tl.constexpr):
    # Program w: weight w's recorded amax as the newest entry of both its history rows (the older
    # entries shifted down, as AmaxHistory.record), then its record word zeroed for the next step.
    base = table_ptr + tl.program_id(0) * NCOL
    ha = _ptr(base, 5, tl.float32)
    hb = _ptr(base, 6, tl.float32)
    rec = _ptr(base, 7, tl.int32)
    _roll_rows(ha, hb, rec, H, HP, True)
    tl.store(rec, 0)
