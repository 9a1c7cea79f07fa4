"""Triton side of the fused SwiGLU quantizers (lowbit.kernels.swiglu_pair; imported lazily).

Each program loads [BR, BC] tiles of SwiGLU's inputs, computes h = silu(g) * u (forward) or its
gradients dg, du (backward) in fp32 as lowbit.quant.swiglu does, and writes each result as the
fp8 pair the next GEMMs read: quantized (row-major) and transposed, with one tensor scale chosen
by delayed scaling (_pair_quantize_triton's `_delayed_amax`), recording the result's own amax.
The per-element quantization is the pair kernel's (same helpers), so for equal fp32 values the
codes are its codes, bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels._pair_quantize_triton import (
    _delayed_amax,
    _history_bits,
    _record,
    _tile_amax_bits,
    delayed_amax_args,
)
from lowbit.kernels._quant_math_triton import (
    _div_fast,
    _div_fast_ok_bits,
    _encode,
    _reciprocal,
    _round_float,
    _scaled,
    _scales,
)
from lowbit.kernels._quantize_triton import _abs_bits, _load_tile
from lowbit.kernels.launch import launchable
from lowbit.kernels.quantize import interpret
from lowbit.quant.formats import ElementFormat


@triton.jit
def _sigmoid(g):
    return 1.0 / (1.0 + tl.exp(-g))


@triton.jit
def _silu_mul(g, u):
    # lowbit.quant.swiglu.swiglu_fp32, operation for operation.
    return g * _sigmoid(g) * u


@triton.jit
def _silu_mul_grads(dh, g, u):
    # lowbit.quant.swiglu.swiglu_grad_fp32, operation for operation: (dg, du).
    s = _sigmoid(g)
    du = dh * (g * s)
    dg = dh * u * (s * (1.0 + g * (1.0 - s)))
    return dg, du


@triton.jit
def _emit_pair(x, rows, cols, R, C, amax, d_ptr, dt_ptr, s_ptr, st_ptr, first,
               MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, FMAX: tl.constexpr,
               HAS_INF: tl.constexpr, ENC: tl.constexpr, HW_FP8: tl.constexpr,
               xbits=0, DIVFAST: tl.constexpr = False, SEL: tl.constexpr = 0):
    # x ([BR, BC] fp32) as fp8 codes of X (d_ptr, R x C) and of X^T (dt_ptr, C x R), one fp32
    # tensor scale from `amax` ([1, 1]) that the first program stores for both sides.
    # The division by the scale is tl.div_rn per element, or with DIVFAST _div_scale's reciprocal
    # form with no guard at all. Guarded inside each division that form was slower here on the H100
    # (runs 150 and 203: the backward 0.80 -> 0.69 of a copy, the branch's joined quotients
    # doubling the registers), and with the guard taken once a tile around both quantize-and-stores,
    # faster (0.90) but wrong on a ragged tile (Triton 3.6, run 202: rows of one value where the
    # interpreter's bits were right). So no branch: the function returns whether the reciprocal
    # form is exact for this tile (ok, [1, 1]: _div_fast_ok's conditions on the tile's amax bits
    # `xbits`), and SEL 1 stores only where it is, SEL 2 only where it is not (the fix-up launch
    # of the tiles SEL 1 left, with tl.div_rn), SEL 0 everywhere.
    s, eff = _scales(amax, 1.0, FMAX, EMAX, 0)
    if first:
        tl.store(s_ptr + tl.zeros([1, 1], tl.int32), s)
        tl.store(st_ptr + tl.zeros([1, 1], tl.int32), s)
    r = _reciprocal(eff)
    ok = _div_fast_ok_bits(eff.to(tl.int32, bitcast=True), xbits + tl.zeros([1, 1], tl.int32), r)
    if DIVFAST:
        y = _div_fast(x, eff, r)
        y_t = _div_fast(tl.trans(x), eff, r)
    else:
        y = _scaled(x, eff, 0)
        y_t = _scaled(tl.trans(x), eff, 0)
    if HW_FP8:  # the pair kernel's FAST form: the hardware cast rounds (see _quant_tile)
        codes = _encode(y, ENC, True)
        codes_t = _encode(y_t, ENC, True)
    else:  # the interpreter: explicit rounding, bits assembled (its fp8 cast rounds wrongly)
        q = _round_float(y, y, MBITS, EMIN, EMAX, FMAX, HAS_INF, False)
        codes = _encode(q, ENC, False)
        codes_t = _encode(tl.trans(q), ENC, False)
    m = (rows[:, None] < R) & (cols[None, :] < C)
    mt = (cols[:, None] < C) & (rows[None, :] < R)
    if SEL != 0:  # ok broadcast to the tiles by hand (the interpreter rejects a scalar in a mask)
        keep = ok if SEL == 1 else ~ok
        m = m & ((tl.zeros_like(m.to(tl.int32)) + keep.to(tl.int32)) != 0)
        mt = mt & ((tl.zeros_like(mt.to(tl.int32)) + keep.to(tl.int32)) != 0)
    tl.store(d_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], codes.to(tl.uint8), m)
    tl.store(dt_ptr + cols[:, None].to(tl.int64) * R + rows[None, :], codes_t.to(tl.uint8), mt)
    return ok


@triton.jit
def _swiglu_pair_kernel(
    g_ptr, u_ptr, sg, su, d_ptr, dt_ptr, s_ptr, st_ptr, own_ptr, rec_ptr, hist_ptr, H, R, C, NP: tl.constexpr,
    MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, FMAX: tl.constexpr,
    HAS_INF: tl.constexpr, ENC: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, HP: tl.constexpr,
    HW_FP8: tl.constexpr, PP: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_c * BC + tl.arange(0, BC)
    h = _silu_mul(_load_tile(g_ptr, rows, cols, R, C, sg, 1, False, ""),
                  _load_tile(u_ptr, rows, cols, R, C, su, 1, False, ""))
    _record(rec_ptr, _tile_amax_bits(h))  # h's own amax, for the history
    amax = tl.zeros([1, 1], tl.float32) + _delayed_amax(hist_ptr, H, own_ptr, NP, HP, PP)
    _emit_pair(h, rows, cols, R, C, amax, d_ptr, dt_ptr, s_ptr, st_ptr, (pid_r == 0) & (pid_c == 0),
               MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, HW_FP8)


@triton.jit
def _grad_tile(pid_r, pid_c, dh_ptr, g_ptr, u_ptr, sdh, sg, su,
               gd_ptr, gdt_ptr, gs_ptr, gst_ptr, g_own, g_rec, g_hist,
               ud_ptr, udt_ptr, us_ptr, ust_ptr, u_own, u_rec, u_hist, H, R, C, NP: tl.constexpr,
               MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, FMAX: tl.constexpr,
               HAS_INF: tl.constexpr, ENC: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
               HP: tl.constexpr, HW_FP8: tl.constexpr, PP: tl.constexpr, MODE: tl.constexpr):
    # One [BR, BC] tile of the backward (_swiglu_grad_pairs_kernel's MODE); returns whether the
    # reciprocal division is exact for both of its results ([1, 1]).
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_c * BC + tl.arange(0, BC)
    dg, du = _silu_mul_grads(_load_tile(dh_ptr, rows, cols, R, C, sdh, 1, False, ""),
                             _load_tile(g_ptr, rows, cols, R, C, sg, 1, False, ""),
                             _load_tile(u_ptr, rows, cols, R, C, su, 1, False, ""))
    # The tiles' amax bits: recorded once (not again by the fix-up), and _emit_pair's check.
    g_bits = _tile_amax_bits(dg)
    u_bits = _tile_amax_bits(du)
    if MODE != 2:
        _record(g_rec, g_bits)
        _record(u_rec, u_bits)
    first = (pid_r == 0) & (pid_c == 0)
    amax_g = tl.zeros([1, 1], tl.float32) + _delayed_amax(g_hist, H, g_own, NP, HP, PP)
    ok_g = _emit_pair(dg, rows, cols, R, C, amax_g, gd_ptr, gdt_ptr, gs_ptr, gst_ptr, first,
                      MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, HW_FP8, g_bits, MODE == 1, MODE)
    amax_u = tl.zeros([1, 1], tl.float32) + _delayed_amax(u_hist, H, u_own, NP, HP, PP)
    ok_u = _emit_pair(du, rows, cols, R, C, amax_u, ud_ptr, udt_ptr, us_ptr, ust_ptr, first,
                      MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, HW_FP8, u_bits, MODE == 1, MODE)
    return ok_g & ok_u


@triton.jit
def _swiglu_grad_pairs_kernel(
    dh_ptr, g_ptr, u_ptr, sdh, sg, su,
    gd_ptr, gdt_ptr, gs_ptr, gst_ptr, g_own, g_rec, g_hist,
    ud_ptr, udt_ptr, us_ptr, ust_ptr, u_own, u_rec, u_hist, H, R, C, NP: tl.constexpr,
    MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, FMAX: tl.constexpr,
    HAS_INF: tl.constexpr, ENC: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, HP: tl.constexpr,
    HW_FP8: tl.constexpr, PP: tl.constexpr, fix_ptr, cnt_ptr, MODE: tl.constexpr,
):
    # MODE 0: a tile a program, tl.div_rn. MODE 1: a tile a program, the reciprocal division without
    # a guard; a tile where it would not be exact is stored nowhere and listed (fix_ptr, its count
    # at cnt_ptr, zeroed by the gate) instead. MODE 2: the fix-up launch: its programs take the
    # listed tiles (none in training so far: a value 2^100 times the history's amax, a NaN or Inf,
    # or a history amax under 2^-64 times the format's max) and store them with tl.div_rn.
    if MODE == 2:
        n_c = tl.cdiv(C, BC)
        for i in range(tl.program_id(0), tl.load(cnt_ptr), tl.num_programs(0)):
            t = tl.load(fix_ptr + i)
            _grad_tile(t // n_c, t % n_c, dh_ptr, g_ptr, u_ptr, sdh, sg, su,
                       gd_ptr, gdt_ptr, gs_ptr, gst_ptr, g_own, g_rec, g_hist,
                       ud_ptr, udt_ptr, us_ptr, ust_ptr, u_own, u_rec, u_hist, H, R, C, NP,
                       MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, BR, BC, HP, HW_FP8, PP, MODE)
    else:
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        ok = _grad_tile(pid_r, pid_c, dh_ptr, g_ptr, u_ptr, sdh, sg, su,
                        gd_ptr, gdt_ptr, gs_ptr, gst_ptr, g_own, g_rec, g_hist,
                        ud_ptr, udt_ptr, us_ptr, ust_ptr, u_own, u_rec, u_hist, H, R, C, NP,
                        MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, BR, BC, HP, HW_FP8, PP, MODE)
        if MODE == 1:
            bad = ~ok
            slot = tl.atomic_add(cnt_ptr + tl.zeros([1, 1], tl.int32), 1, mask=bad, sem="relaxed")
            tl.store(fix_ptr + slot, pid_r * tl.cdiv(C, BC) + pid_c + tl.zeros([1, 1], tl.int32), mask=bad)


@triton.jit
def _swiglu_amax_if_empty_kernel(
    a_ptr, b_ptr, c_ptr, sa, sb, sc, parts_1, parts_2, rec_1, rec_2, rec_3, hist_1, hist_2, H, R, C,
    GRAD: tl.constexpr, HP: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):
    # The gate of the pair quantizer (_amax_if_empty_kernel) for SwiGLU's results: program 0
    # zeroes the record words (GRAD: three, the last the fix-up count), and a first call's own
    # amaxes are stored as one partial max a program (parts_1, parts_2): h's from (g, u) = (a, b),
    # or GRAD: dg's and du's from (dh, g, u) = (a, b, c). Read only while a history row holds only
    # zeros; otherwise every program returns at once.
    if tl.program_id(0) == 0:
        tl.store(rec_1, 0)
        if GRAD:
            tl.store(rec_2, 0)
            tl.store(rec_3, 0)  # the backward's count of tiles for its fix-up launch
    empty = _history_bits(hist_1, H, HP) == 0
    if GRAD:
        empty = empty | (_history_bits(hist_2, H, HP) == 0)
    if empty:
        n_c = tl.cdiv(C, BC)
        acc_1 = tl.zeros([BR, BC], tl.int32)
        acc_2 = tl.zeros([BR, BC], tl.int32)
        for t in range(tl.program_id(0), tl.cdiv(R, BR) * n_c, tl.num_programs(0)):
            rows = (t // n_c) * BR + tl.arange(0, BR)
            cols = (t % n_c) * BC + tl.arange(0, BC)
            a = _load_tile(a_ptr, rows, cols, R, C, sa, 1, False, "")
            b = _load_tile(b_ptr, rows, cols, R, C, sb, 1, False, "")
            if GRAD:
                dg, du = _silu_mul_grads(a, b, _load_tile(c_ptr, rows, cols, R, C, sc, 1, False, ""))
                acc_1 = tl.maximum(acc_1, _abs_bits(dg))
                acc_2 = tl.maximum(acc_2, _abs_bits(du))
            else:
                acc_1 = tl.maximum(acc_1, _abs_bits(_silu_mul(a, b)))
        tl.store(parts_1 + tl.program_id(0), tl.max(tl.max(acc_1, axis=1), axis=0))
        if GRAD:
            tl.store(parts_2 + tl.program_id(0), tl.max(tl.max(acc_2, axis=1), axis=0))


# Tile (rows x columns) and warps per program of the forward and backward kernels (knobs for
# sweeps). H100 sweep (docs/BENCHMARKS.md, twelfth pass, run 110: `benchmarks/swiglu_pair_bw.py
# --sweep` on 1b's 16384 x 8192): 32 x 128 tiles on 4 / 8 warps moved their bytes at 0.87 / 0.71
# of a copy's speed, 64 x 64 tiles (the pair quantizer's) at 0.84 / 0.69; 128-row tiles were
# slower (0.38-0.85).
TILE = (32, 128)
WARPS = (4, 8)
# The backward kernel's tile (it reads three tiles and writes four, two of them transposed).
GRAD_TILE = (32, 128)
# FAST_GRAD_DIVISION: the backward divides in _div_scale's reciprocal form without a guard (MODE
# 1), and a second launch (MODE 2, FIXUP_PROGRAMS programs, which return at once when no tile was
# listed) redoes with tl.div_rn any tile where that form would not be exact; else tl.div_rn
# everywhere (MODE 0). Same bits either way. H100 (docs/BENCHMARKS.md, twenty-fifth pass, run 219,
# interleaved in one process, 16384 x 8192, bit-equal): 0.798 of a copy before this kernel was
# split into _grad_tile (80 registers), MODE 0 0.878 (64 registers), MODE 1 0.903 (64 registers,
# 1034 instructions to the last EXIT against 1322); in a 1b step (run 218) 9.98 -> 8.06 ms.
FAST_GRAD_DIVISION = True
FIXUP_PROGRAMS = 132


def _fmt_kwargs(fmt: ElementFormat, enc: int) -> dict:
    return dict(MBITS=fmt.mbits, EMIN=fmt.emin, EMAX=fmt.emax, FMAX=float(fmt.max), HAS_INF=fmt.has_inf,
                ENC=enc, HW_FP8=not interpret())


def launch_amax_if_empty(ins: tuple[torch.Tensor, ...], parts: tuple[torch.Tensor, ...],
                         recs: tuple[torch.Tensor, ...], rows: tuple[torch.Tensor, ...]) -> None:
    """The gate of SwiGLU's delayed scaling: `recs` (int32 words: h's record, or dg's, du's and the
    backward's fix-up count) zeroed, and while a history row in `rows` is all zeros, the own amax
    bits of SwiGLU's result(s) as partial maxes into `parts` (_pair_quantize_triton.delayed_words):
    ins = (g, u) for h, or (dh, g, u) for (dg, du)."""
    grad = len(ins) == 3
    a, b, c = (*ins, ins[0]) if not grad else ins
    r, cc = a.shape
    br, bc = 32, min(128, max(1, triton.next_power_of_2(cc)))  # launched for empty inputs too
    h = rows[0].numel()
    rec_2, rec_3 = recs[1:] if grad else (recs[0], recs[0])  # read only when grad
    launchable(_swiglu_amax_if_empty_kernel)[(parts[0].numel(),)](
        a, b, c, a.stride(0), b.stride(0), c.stride(0), parts[0], parts[-1], recs[0], rec_2, rec_3,
        rows[0], rows[-1], h, r, cc, GRAD=grad, HP=triton.next_power_of_2(h), BR=br, BC=bc, num_warps=8,
    )


def launch_swiglu_pair(g: torch.Tensor, u: torch.Tensor, outs: tuple[torch.Tensor, ...], own: torch.Tensor,
                       rec: torch.Tensor, row: torch.Tensor, fmt: ElementFormat, enc: int) -> None:
    """h = silu(g) * u as the fp8 pair outs = (data, data_t, scale, scale_t), scaled by `row`'s max
    (the max of the gate's words `own` while it is all zeros), h's own amax bits into `rec`."""
    r, c = g.shape
    br, bc = TILE
    d, dt, s, st = outs
    launchable(_swiglu_pair_kernel)[(triton.cdiv(r, br), triton.cdiv(c, bc))](
        g, u, g.stride(0), u.stride(0), d, dt, s, st, own, rec, row, row.numel(), r, c,
        BR=br, BC=bc, HP=triton.next_power_of_2(row.numel()), num_warps=WARPS[0], **_fmt_kwargs(fmt, enc),
        **delayed_amax_args(own),
    )


def grad_fixup_list(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialized int32 storage for the backward's fix-up (launch_swiglu_grad_pairs): one word per
    tile, and the count word, which the gate zeroes."""
    n = triton.cdiv(g.shape[0], GRAD_TILE[0]) * triton.cdiv(g.shape[1], GRAD_TILE[1])
    words = torch.empty(n + 1, dtype=torch.int32, device=g.device)
    return words[:n], words[n:]


def launch_swiglu_grad_pairs(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                             outs_g: tuple[torch.Tensor, ...], outs_u: tuple[torch.Tensor, ...],
                             own: tuple[torch.Tensor, torch.Tensor], rec: tuple[torch.Tensor, torch.Tensor],
                             rows: tuple[torch.Tensor, torch.Tensor], fmt: ElementFormat, enc: int,
                             fixup: tuple[torch.Tensor, torch.Tensor]) -> None:
    """(dg, du) of SwiGLU as two fp8 pairs (each (data, data_t, scale, scale_t)), each scaled by its
    history row's max and recording its own amax bits (own, rec, rows: dg's then du's); `fixup`
    from grad_fixup_list, its count zeroed by the gate."""
    r, c = g.shape
    br, bc = GRAD_TILE
    kernel = launchable(_swiglu_grad_pairs_kernel)
    args = (dh, g, u, dh.stride(0), g.stride(0), u.stride(0),
            *outs_g, own[0], rec[0], rows[0], *outs_u, own[1], rec[1], rows[1], rows[0].numel(), r, c)
    kw = dict(BR=br, BC=bc, HP=triton.next_power_of_2(rows[0].numel()), num_warps=WARPS[1],
              **_fmt_kwargs(fmt, enc), **delayed_amax_args(own[0]), fix_ptr=fixup[0], cnt_ptr=fixup[1])
    kernel[(triton.cdiv(r, br), triton.cdiv(c, bc))](*args, MODE=1 if FAST_GRAD_DIVISION else 0, **kw)
    if FAST_GRAD_DIVISION:
        kernel[(FIXUP_PROGRAMS,)](*args, MODE=2, **kw)
