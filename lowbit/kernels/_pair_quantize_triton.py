"""Triton side of the pair quantizer and of the tensor amax (imported lazily, like every Triton
module here). The per-element steps are those of the fused quantize kernel (_quant_math_triton.py),
reused, so the pair's outputs are bit for bit what that kernel and the reference produce.

One program loads one [BR, BC] tile of X and writes it twice: quantized along the columns (X, the
fprop/dgrad operand) and, transposed in registers, quantized along the rows (X^T, the wgrad or
dgrad operand), so the transpose costs no extra pass over memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from lowbit.kernels import _quantize_triton
from lowbit.kernels._quant_math_triton import _bf16_rne, _encode, _quant_tile, _quant_values, _scaled, _scales
from lowbit.kernels._quantize_triton import _abs_bits, _load_tile
from lowbit.kernels.launch import launchable, seed_args
from lowbit.kernels.quantize import interpret
from lowbit.quant.formats import ElementFormat


@triton.jit
def _amax_kernel(x_ptr, out_ptr, R, C, sxr, sxc, BR: tl.constexpr, BC: tl.constexpr, ITERS: tl.constexpr):
    # Each program reduces ITERS row-blocks of one column-block to one integer max, then one atomic.
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BC + tl.arange(0, BC)
    acc = tl.zeros([BR, BC], tl.int32)
    for i in range(ITERS):
        rows = (pid_r * ITERS + i) * BR + tl.arange(0, BR)
        acc = tl.maximum(acc, _abs_bits(_load_tile(x_ptr, rows, cols, R, C, sxr, sxc, False, "")))
    tl.atomic_max(out_ptr, tl.max(tl.max(acc, axis=1), axis=0), sem="relaxed")


@triton.jit
def _history_bits(hist_ptr, H, HP: tl.constexpr):
    # Integer max of an amax-history row's bits (amaxes are >= 0 or NaN, so this orders them as
    # floats and keeps NaN on top, as torch's max does).
    i = tl.arange(0, HP)
    return tl.max(tl.load(hist_ptr + i, i < H, other=0.0).to(tl.int32, bitcast=True), axis=0)


@triton.jit
def _delayed_amax(hist_ptr, H, parts_ptr, NP: tl.constexpr, HP: tl.constexpr, PP: tl.constexpr):
    # Delayed scaling's amax (lowbit.quant.gemm.AmaxHistory.scale_amax): the history's max, or
    # while the history holds only zeros the tensor's own: the max of the NP (<= PP) int32 words
    # the gate stored at parts_ptr (_amax_if_empty_kernel). Those are loaded only then.
    h = _history_bits(hist_ptr, H, HP)
    i = tl.arange(0, PP)
    # (h broadcast by hand: Triton 3.9's interpreter rejects a mask anded with a scalar compare)
    own = tl.max(tl.load(parts_ptr + i, (i < NP) & ((i * 0 + h) == 0), other=0), axis=0)
    return tl.where(h != 0, h, own).to(tl.float32, bitcast=True)


@triton.jit
def _load_rounded(x_ptr, rows, cols, R, C, sxr, sxc, ROUND_BF16: tl.constexpr):
    # A [BR, BC] fp32 tile; ROUND_BF16: an fp32 input's values rounded to bf16 first (RNE, on the
    # bits), so that it is quantized exactly as its bf16 cast would be (lowbit.nn.gradient_cast_fold).
    x = _load_tile(x_ptr, rows, cols, R, C, sxr, sxc, False, "")
    if ROUND_BF16:
        x = _bf16_rne(x).to(tl.float32)
    return x


@triton.jit
def _amax_if_empty_kernel(x_ptr, parts_ptr, rec_ptr, hist_ptr, H, R, C, sxr, sxc, HP: tl.constexpr,
                          BR: tl.constexpr, BC: tl.constexpr, ROUND_BF16: tl.constexpr = False):
    # The gate of a delayed-scaling call. Program 0 zeroes the record word (rec_ptr) that the next
    # kernel takes atomic maxes into. While the history row holds only zeros (a first call), each
    # program also stores the integer max of |x| bits over its tiles (the small grid strides over
    # them) as its own word of parts_ptr, which _delayed_amax reduces: plain stores, so no word
    # needs zeroing beforehand (a fill kernel per word was ~0.3 ms of a 1b step, twenty-fifth pass
    # of docs/BENCHMARKS.md). Otherwise the programs return after reading the row, so the launch
    # costs a few microseconds.
    if tl.program_id(0) == 0:
        tl.store(rec_ptr, 0)
    if _history_bits(hist_ptr, H, HP) == 0:
        n_c = tl.cdiv(C, BC)
        acc = tl.zeros([BR, BC], tl.int32)
        for t in range(tl.program_id(0), tl.cdiv(R, BR) * n_c, tl.num_programs(0)):
            rows = (t // n_c) * BR + tl.arange(0, BR)
            cols = (t % n_c) * BC + tl.arange(0, BC)
            acc = tl.maximum(acc, _abs_bits(_load_rounded(x_ptr, rows, cols, R, C, sxr, sxc, ROUND_BF16)))
        tl.store(parts_ptr + tl.program_id(0), tl.max(tl.max(acc, axis=1), axis=0))


@triton.jit
def _tile_amax_bits(x):
    # The integer max of a 2-D tile's |x| bits: one reduction over the flattened tile (up to 4%
    # faster than the two-axis max in the delayed pair, run 190).
    return tl.max(tl.reshape(_abs_bits(x), [x.shape[0] * x.shape[1]]), axis=0)


@triton.jit
def _record(rec_ptr, bits):
    # A program's share of a tensor's own amax (its tile's _tile_amax_bits), atomically into
    # rec_ptr. Relaxed: the kernel's end orders it before the roll reads it. The default (acq_rel)
    # fences each program's atomic: on the H100 (docs/BENCHMARKS.md, run 190) that took the delayed
    # fp8 pair of a bf16 16384 x 2048 from 55.7 to 62.6 us (16384 x 512: 15.3 -> 18.2).
    tl.atomic_max(rec_ptr, bits, sem="relaxed")


@triton.jit
def _roll_kernel(ha_ptr, hb_ptr, own_ptr, H, HP: tl.constexpr, TWO: tl.constexpr):
    _roll_rows(ha_ptr, hb_ptr, own_ptr, H, HP, TWO)


@triton.jit
def _roll_rows(ha_ptr, hb_ptr, own_ptr, H, HP: tl.constexpr, TWO: tl.constexpr):
    # Record the tensor's amax (own_ptr, int32 bits) as the newest entry of one or two history
    # rows, shifting the older ones down (AmaxHistory.record: roll by one, then set entry 0).
    i = tl.arange(0, HP)
    own = tl.load(own_ptr).to(tl.float32, bitcast=True)
    a = tl.load(ha_ptr + i - 1, (i >= 1) & (i < H), other=0.0)
    b = tl.load(hb_ptr + i - 1, (i >= 1) & (i < H), other=0.0)
    tl.debug_barrier()  # every entry read before any is overwritten
    tl.store(ha_ptr + i, tl.where(i == 0, own, a), i < H)
    if TWO:
        tl.store(hb_ptr + i, tl.where(i == 0, own, b), i < H)


@triton.jit
def _code_values(codes, ENC: tl.constexpr):
    # fp32 values of e4m3 (0) / e5m2 (1) codes: the exact upcast the dequantize kernel reads them by.
    b = codes.to(tl.uint8)
    if ENC == 1:
        return b.to(tl.float8e5, bitcast=True).to(tl.float32)
    return b.to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _side(x, r0, c0, R, C, tamax, s_ptr, ssr, ssc, seed_off, G: tl.constexpr,
          BR: tl.constexpr, BC: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
          EMAX: tl.constexpr, FMAX: tl.constexpr, HAS_INF: tl.constexpr, KIND_INT: tl.constexpr,
          ENC: tl.constexpr, SMODE: tl.constexpr, SR: tl.constexpr, HW_FP8: tl.constexpr,
          TRANSPOSED: tl.constexpr, DIV: tl.constexpr, VALS: tl.constexpr = False):
    # Codes of one [BR, BC] tile (rows of length C in the whole matrix) quantized along its columns.
    # VALS (1-D groups only): their fp32 values (code value x group scale, exact) instead, and no scales.
    # G > 0: 1-D groups of G along the columns; G == 0: the tensor amax `tamax` ([1, 1]); G == -1:
    # the whole tile is one group (2-D tile scaling). Scales go to s_ptr with strides (ssr, ssc).
    # DIV: _div_scale's form of the division (0 for the transposed side, see _quant_tile).
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    idx = rows.to(tl.int64)[:, None] * C + cols[None, :]
    if G == BC:  # one group per row of the tile: 2-D (see _quant_tile on reshapes)
        amax = tl.max(_abs_bits(x), axis=1).to(tl.float32, bitcast=True)
        s, eff = _scales(amax, 1.0, FMAX, EMAX, SMODE)
        if not VALS:
            tl.store(s_ptr + rows * ssr + (c0 // G) * ssc, s, rows < R)
        codes = _quant_tile(x, eff[:, None], idx, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF,
                            ENC, SR, SMODE, HW_FP8, TRANSPOSED, DIV)
        if VALS:
            codes = _code_values(codes, ENC) * s[:, None]
    elif G > 0:
        NG: tl.constexpr = BC // G
        x3 = tl.reshape(x, [BR, NG, G])
        amax = tl.max(_abs_bits(x3), axis=2).to(tl.float32, bitcast=True)
        s, eff = _scales(amax, 1.0, FMAX, EMAX, SMODE)
        gcols = c0 // G + tl.arange(0, NG)
        gm = (rows[:, None] < R) & (gcols[None, :] < (C + G - 1) // G)
        if not VALS:
            tl.store(s_ptr + rows[:, None] * ssr + gcols[None, :] * ssc, s, gm)
        c3 = _quant_tile(x3, eff[:, :, None], tl.reshape(idx, [BR, NG, G]), seed_off, KIND_INT, MBITS,
                         EMIN, EMAX, FMAX, HAS_INF, ENC, SR, SMODE, HW_FP8, TRANSPOSED, DIV)
        if VALS:
            codes = tl.reshape(_code_values(c3, ENC) * s[:, :, None], [BR, BC])
        else:
            codes = tl.reshape(c3, [BR, BC])
    else:
        if G == 0:
            amax = tamax
        else:
            a = tl.max(tl.max(_abs_bits(x), axis=1), axis=0).to(tl.float32, bitcast=True)
            amax = a + tl.zeros([1, 1], tl.float32)
        s, eff = _scales(amax, 1.0, FMAX, EMAX, SMODE)
        if G == -1:
            tl.store(s_ptr + (r0 // BR) * ssr + (c0 // BC) * ssc + tl.zeros([1, 1], tl.int32), s)
        elif (r0 == 0) & (c0 == 0):
            tl.store(s_ptr + tl.zeros([1, 1], tl.int32), s)
        codes = _quant_tile(x, eff, idx, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, SR,
                            SMODE, HW_FP8, TRANSPOSED, DIV)
    return codes


@triton.jit
def _pair_strips(x_ptr, d_ptr, dt_ptr, s_ptr, st_ptr, R, C, sxr, sxc, ssr, ssc, sstr, sstc, seed_a, seed_b,
                 r0, c0, MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, FMAX: tl.constexpr,
                 HAS_INF: tl.constexpr, KIND_INT: tl.constexpr, ENC: tl.constexpr, SMODE: tl.constexpr,
                 GA: tl.constexpr, SR_A: tl.constexpr, SR_B: tl.constexpr, BR: tl.constexpr,
                 BC: tl.constexpr, STRIP: tl.constexpr, HW_FP8: tl.constexpr, DIV: tl.constexpr,
                 DIV_T: tl.constexpr):
    # The pair of one [BR, BC] tile whose X^T groups span all BR rows (1-D groups of BR along X^T's
    # rows, GA > 0 with X's groups within a row; or one 2-D tile scale, GA == -1), in strips of
    # STRIP rows: whole 128 x 128 tiles need 8 warps and reached only 0.45-0.53 of a copy, where
    # 32-row tiles on 2 warps reach 0.84 (runs 157-158). Pass 1 reads each strip for the column
    # (or tile) amax, and quantizes X's side where its scale is known (1-D groups); pass 2 reads
    # the strips again (the tile is still in L1/L2) for the rest. Tried on the H100 and no faster,
    # all bit-exact: X^T's codes formed in X's layout and the bytes transposed (a quarter of the
    # shared-memory traffic of tl.trans on fp32; run 170), and these loops unrolled
    # (tl.static_range: 1x128 0.60 -> 0.37-0.39 of a copy) or software-pipelined (tl.range with 2 or
    # 3 stages: 0.55-0.62; run 171).
    cols = c0 + tl.arange(0, BC)
    acc = tl.zeros([BC], tl.int32)
    for i in range(BR // STRIP):
        rows = r0 + i * STRIP + tl.arange(0, STRIP)
        x = _load_tile(x_ptr, rows, cols, R, C, sxr, sxc, False, "")
        acc = tl.maximum(acc, tl.max(_abs_bits(x), axis=0))
        if GA > 0:
            codes = _side(x, r0 + i * STRIP, c0, R, C, tl.zeros([1, 1], tl.float32), s_ptr, ssr, ssc,
                          seed_a, GA, STRIP, BC, MBITS, EMIN, EMAX, FMAX, HAS_INF, KIND_INT, ENC, SMODE,
                          SR_A, HW_FP8, False, DIV)
            m = (rows[:, None] < R) & (cols[None, :] < C)
            tl.store(d_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], codes.to(tl.uint8), m)
    if GA > 0:  # X^T's row groups: one per column of the tile
        s_t, eff_t = _scales(acc.to(tl.float32, bitcast=True)[:, None], 1.0, FMAX, EMAX, SMODE)
        tl.store(st_ptr + cols[:, None] * sstr + (r0 // BR) * sstc, s_t, cols[:, None] < C)
        eff = eff_t
    else:  # one scale for the tile, both sides
        amax = tl.max(acc, axis=0).to(tl.float32, bitcast=True) + tl.zeros([1, 1], tl.float32)
        s, eff = _scales(amax, 1.0, FMAX, EMAX, SMODE)
        tl.store(s_ptr + (r0 // BR) * ssr + (c0 // BC) * ssc + tl.zeros([1, 1], tl.int32), s)
        tl.store(st_ptr + (c0 // BC) * sstr + (r0 // BR) * sstc + tl.zeros([1, 1], tl.int32), s)
        eff_t = eff
    for i in range(BR // STRIP):
        rows = r0 + i * STRIP + tl.arange(0, STRIP)
        x = _load_tile(x_ptr, rows, cols, R, C, sxr, sxc, False, "")
        if GA < 0:
            idx = rows.to(tl.int64)[:, None] * C + cols[None, :]
            codes = _quant_tile(x, eff, idx, seed_a, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, SR_A,
                                SMODE, HW_FP8, False, DIV)
            m = (rows[:, None] < R) & (cols[None, :] < C)
            tl.store(d_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], codes.to(tl.uint8), m)
        idx_t = cols.to(tl.int64)[:, None] * R + rows[None, :]
        codes_t = _quant_tile(tl.trans(x), eff_t, idx_t, seed_b, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF,
                              ENC, SR_B, SMODE, HW_FP8, True, DIV_T)
        mt = (cols[:, None] < C) & (rows[None, :] < R)
        tl.store(dt_ptr + cols[:, None].to(tl.int64) * R + rows[None, :], codes_t.to(tl.uint8), mt)


@triton.jit(do_not_specialize=["seed_a", "seed_b"])
def _pair_kernel(
    x_ptr, d_ptr, dt_ptr, s_ptr, st_ptr, ga_ptr, rec_ptr, R, C, sxr, sxc,
    ssr, ssc, sstr, sstc, seed_a, seed_b,
    MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, FMAX: tl.constexpr,
    HAS_INF: tl.constexpr, KIND_INT: tl.constexpr, ENC: tl.constexpr, SMODE: tl.constexpr,
    GA: tl.constexpr, GB: tl.constexpr, SR_A: tl.constexpr, SR_B: tl.constexpr,
    SAME_CODES: tl.constexpr, RECORD: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
    HW_FP8: tl.constexpr, FAST: tl.constexpr, DIV: tl.constexpr, FLIP: tl.constexpr, hist_ptr, H,
    HP: tl.constexpr, HIST: tl.constexpr, DIV_T: tl.constexpr = 0, STRIP: tl.constexpr = 0,
    SEED_PTR: tl.constexpr = False, VALS_A: tl.constexpr = False, VALS_B: tl.constexpr = False,
    ROUND_BF16: tl.constexpr = False, NP: tl.constexpr = 1, PP: tl.constexpr = 1,
):
    # VALS_A / VALS_B: that side is written as its exact values in bf16 (d_ptr / dt_ptr bf16), for
    # a GEMM on BF16 operands, and its scales are not stored (1-D group scaling only).
    if SEED_PTR:  # the offsets are one-element int64 tensors (lowbit.kernels.launch.seed_args)
        seed_a = tl.load(seed_a)
        seed_b = tl.load(seed_b)
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    if FLIP:  # tiles last-first, after an amax pass over x (see _quantize_triton.TENSOR_AMAX_FLIP)
        pid_r = tl.num_programs(0) - 1 - pid_r
        pid_c = tl.num_programs(1) - 1 - pid_c
    if STRIP > 0:  # X^T's groups span the tile's BR rows: strips of STRIP rows, read twice
        _pair_strips(x_ptr, d_ptr, dt_ptr, s_ptr, st_ptr, R, C, sxr, sxc, ssr, ssc, sstr, sstc, seed_a,
                     seed_b, pid_r * BR, pid_c * BC, MBITS, EMIN, EMAX, FMAX, HAS_INF, KIND_INT, ENC, SMODE,
                     GA, SR_A, SR_B, BR, BC, STRIP, HW_FP8, DIV, DIV_T)
    else:
        rows = pid_r * BR + tl.arange(0, BR)
        cols = pid_c * BC + tl.arange(0, BC)
        x = _load_rounded(x_ptr, rows, cols, R, C, sxr, sxc, ROUND_BF16)
        xt = tl.trans(x)
        tamax = tl.zeros([1, 1], tl.float32)
        if GA == 0:  # one tensor amax: given, or delayed scaling's choice
            if HIST:
                tamax += _delayed_amax(hist_ptr, H, ga_ptr, NP, HP, PP)
            else:
                tamax += tl.load(ga_ptr)
        if RECORD:  # delayed scaling: this tensor's own amax, for the history
            _record(rec_ptr, _tile_amax_bits(x))
        if FAST:
            # GPU, fp8, one tensor scale, nearest rounding: the hardware cast rounds (see _quant_tile),
            # written out here without _side's reshapes to [BR, 1, BC] (run 23: 0.74 of a copy through
            # _side against 0.90 for this form in run 22, on 8192 x 14336 bf16).
            s, eff = _scales(tamax, 1.0, FMAX, EMAX, SMODE)
            if (pid_r == 0) & (pid_c == 0):  # both sides' scales (one tensor when the caller shares it)
                tl.store(s_ptr + tl.zeros([1, 1], tl.int32), s)
                tl.store(st_ptr + tl.zeros([1, 1], tl.int32), s)
            codes = _encode(_scaled(x, eff, SMODE, DIV), ENC, True)
        elif SAME_CODES:
            # One tensor scale and nearest rounding: X^T's values are X's, transposed. The fp32 grid
            # values are transposed and then encoded (transposing the codes made by the hardware e4m3
            # cast came out wrong on the H100, Triton 3.6).
            s, eff = _scales(tamax, 1.0, FMAX, EMAX, SMODE)
            if (pid_r == 0) & (pid_c == 0):
                tl.store(s_ptr + tl.zeros([1, 1], tl.int32), s)
            q = _quant_values(x, eff, x, seed_a, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF, False, SMODE,
                              DIV)
            codes = _encode(q, ENC, HW_FP8)
        else:
            codes = _side(x, pid_r * BR, pid_c * BC, R, C, tamax, s_ptr, ssr, ssc, seed_a, GA, BR, BC,
                          MBITS, EMIN, EMAX, FMAX, HAS_INF, KIND_INT, ENC, SMODE, SR_A, HW_FP8, False, DIV,
                          VALS_A)
        m = (rows[:, None] < R) & (cols[None, :] < C)
        if VALS_A:
            tl.store(d_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], _bf16_rne(codes), m)
        else:
            tl.store(d_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], codes.to(tl.uint8), m)
        if FAST:
            codes_t = _encode(_scaled(xt, eff, SMODE, DIV_T), ENC, True)
        elif SAME_CODES:
            # Bit assembly, not the hardware cast: on the H100 (Triton 3.6) the e4m3 cast of a
            # transposed tile came out wrong (runs 9 and 11), while tl.trans of fp32 tiles is right.
            codes_t = _encode(tl.trans(q), ENC, False)
        else:
            codes_t = _side(xt, pid_c * BC, pid_r * BR, C, R, tamax, st_ptr, sstr, sstc, seed_b,
                            GB, BC, BR, MBITS, EMIN, EMAX, FMAX, HAS_INF, KIND_INT, ENC, SMODE, SR_B, HW_FP8,
                            True, DIV_T, VALS_B)
        mt = (cols[:, None] < C) & (rows[None, :] < R)
        if VALS_B:
            tl.store(dt_ptr + cols[:, None].to(tl.int64) * R + rows[None, :], _bf16_rne(codes_t), mt)
        else:
            tl.store(dt_ptr + cols[:, None].to(tl.int64) * R + rows[None, :], codes_t.to(tl.uint8), mt)


def amax_launch_shape(r: int, c: int) -> tuple[tuple[int, int], dict]:
    """(grid, launch keywords) of _amax_kernel for an r x c matrix."""
    bc = min(256, triton.next_power_of_2(c))
    br = max(1, min(triton.next_power_of_2(r), 8192 // bc))
    iters = max(1, min(8, triton.cdiv(r, br * 264)))  # ~2 waves of programs on 132 SMs
    grid = (triton.cdiv(r, br * iters), triton.cdiv(c, bc))
    return grid, dict(BR=br, BC=bc, ITERS=iters, num_warps=8 if br * bc >= 8192 else 4)


def launch_amax(x2: torch.Tensor, out_bits: torch.Tensor, wrap: Callable[[Any], Any] | None = None) -> None:
    """Integer max of |x| bits over the whole matrix into out_bits (int32, 1 element, zeroed).
    `wrap`: torch.library.wrap_triton inside a triton_op (lowbit.kernels.pair_quantize_op)."""
    r, c = x2.shape
    grid, kw = amax_launch_shape(r, c)
    kernel = (wrap or launchable)(_amax_kernel)
    kernel[grid](x2, out_bits, r, c, x2.stride(0), x2.stride(1), **kw)


# Programs of the history-gated amax launch, and so words of partial amaxes that every program of
# the quantize kernels reduces (_delayed_amax): no more than one warp holds, since a reduction
# across warps goes through shared memory with a barrier (with 264 words the SwiGLU backward went
# from 0.562 to 0.581 ms on the H100, run 212). A first call reads its tensor on 32 SMs, once.
AMAX_IF_EMPTY_PROGRAMS = 32


def delayed_words(device: torch.device, n: int = 1) -> tuple[torch.Tensor, ...]:
    """Uninitialized int32 words for `n` tensors' delayed scaling in one call: (parts, rec) for
    each, where the gate stores a first call's partial amaxes (parts, AMAX_IF_EMPTY_PROGRAMS words)
    and zeroes rec, the record word (one allocation, no fill kernel)."""
    p = AMAX_IF_EMPTY_PROGRAMS
    words = torch.empty((n, p + 1), dtype=torch.int32, device=device)
    return tuple(w for k in range(n) for w in (words[k, :p], words[k, p:]))


def delayed_amax_args(parts: torch.Tensor) -> dict:
    """The kernels' NP and PP (constexprs) for a gate's words `parts` (_delayed_amax)."""
    return dict(NP=parts.numel(), PP=triton.next_power_of_2(parts.numel()))


def launch_amax_if_empty(x2: torch.Tensor, parts: torch.Tensor, rec: torch.Tensor, hist_row: torch.Tensor,
                         round_bf16: bool = False) -> None:
    """The gate of a delayed-scaling call (decided on the device, no sync): rec (int32) zeroed, and
    while `hist_row` holds only zeros, x2's amax bits as partial maxes into `parts` (int32, one
    word a program, from delayed_words). round_bf16: the amax of x2's values rounded to bf16."""
    r, c = x2.shape
    bc = min(256, triton.next_power_of_2(c))
    br = max(1, min(triton.next_power_of_2(r), 8192 // bc))
    launchable(_amax_if_empty_kernel)[(parts.numel(),)](
        x2, parts, rec, hist_row, hist_row.numel(), r, c, x2.stride(0), x2.stride(1),
        HP=triton.next_power_of_2(hist_row.numel()), BR=br, BC=bc, num_warps=8 if br * bc >= 8192 else 4,
        ROUND_BF16=round_bf16,
    )


def launch_roll(own_bits: torch.Tensor, row: torch.Tensor, row_t: torch.Tensor | None) -> None:
    """Record the amax in own_bits as the newest entry of `row` (and `row_t`), one program."""
    h = row.numel()
    launchable(_roll_kernel)[(1,)](
        row, row if row_t is None else row_t, own_bits, h, HP=triton.next_power_of_2(h),
        TWO=row_t is not None, num_warps=1,
    )


# Launch knobs of the pair kernel, measured by `benchmarks/pair_groups_bw.py --sweep`:
# TRANSPOSED_DIV: X^T's division by an fp32 scale in _div_scale's reciprocal form too (else
# tl.div_rn). X^T's tile comes out of tl.trans, where Triton 3.6 miscompiled a multiplied scale
# before the fp8 cast (see _quant_tile). This form was bit-exact on every case of runs 157-161 and
# in the GPU tests, and took the 1x128 pair from 0.39 to 0.44 of a copy, 128 x 128 tiles from 0.45
# to 0.53, and the fp8 tensor pair (amax given) from 0.89 to 0.91. 20 eager 1b mxfp8 training steps
# with it on gave bit-identical losses to the single kernels (run 164).
TRANSPOSED_DIV = True
# PAIR_STRIP_ROWS: tiles whose X^T groups span all their rows (1x128 groups, 128 x 128 tiles) in
# strips of this many rows, read twice (_pair_strips), on STRIP_WARPS warps; 0: whole tiles in
# registers. Run 160 (`benchmarks/pair_groups_bw.py --sweep`, bf16 8192 x 4096): the 1x128 pair
# 0.44 of a copy as whole tiles on 8 warps, 0.60 in 32-row strips on 2 warps (16-row strips 0.32-0.34,
# 64-row 0.21-0.56 on 1-4 warps); run 161: 128 x 128 tiles 0.53 -> 0.68. 1x64 pairs (64-row
# tiles) were slower in strips (0.58 -> 0.48-0.53), so strips start at 128-row tiles.
PAIR_STRIP_ROWS = 32
STRIP_WARPS = 2
STRIP_MIN_ROWS = 128
# PAIR_WARPS: warps per program, over the caller's; None: the caller's, or 8 for tiles of 16384
# elements or more, else 4.
PAIR_WARPS: int | None = None


def launch_pair(x2: torch.Tensor, data: torch.Tensor, data_t: torch.Tensor, scale: torch.Tensor,
                scale_t: torch.Tensor, g_amax: torch.Tensor | None, rec_bits: torch.Tensor | None,
                fmt: ElementFormat, enc: int, smode: int, ga: int, gb: int, sr_a: bool, sr_b: bool,
                same_codes: bool, tile: tuple[int, int], seed_a: int | torch.Tensor,
                seed_b: int | torch.Tensor,
                wrap: Callable[[Any], Any] | None = None, hist_row: torch.Tensor | None = None,
                num_warps: int | None = None, own_amax: bool = True,
                values: tuple[bool, bool] = (False, False), round_bf16: bool = False) -> None:
    # hist_row: delayed scaling; the amax is its max, or while it is all zeros the max of g_amax's
    # int32 words (the gate's parts, delayed_words).
    # values: which sides are written as bf16 values (_pair_kernel's VALS_A / VALS_B).
    # round_bf16: an fp32 x2 quantized as its bf16 cast would be (not in strips).
    # own_amax: a tensor amax (g_amax, no history) is x2's own, so x2 / scale is bounded.
    r, c = x2.shape
    br, bc = tile
    grid = (triton.cdiv(r, br), triton.cdiv(c, bc))
    dummy = scale
    hw = not interpret()
    # fp32 tensor scale only: see _quant_tile on casting a transposed tile with an e8m0 scale.
    fast = hw and enc in (0, 1) and smode == 0 and ga == 0 and gb == 0 and not (sr_a or sr_b or same_codes)
    # Side A's division (side B's is transposed: IEEE division, see _quant_tile): guarded where a
    # tensor amax from a history or an override leaves the quotients unbounded.
    unbounded = ga == 0 and (hist_row is not None or not own_amax)
    # Bounded quotients take DIV 3, not the branch-free DIV 1: see _div_scale (Triton 3.6, run 205).
    div = 0 if not _quantize_triton.FAST_DIVISION else (2 if unbounded else 3)
    # x's own tensor amax was read just before (tensor_amax): visit the tiles last-first.
    flip = _quantize_triton.TENSOR_AMAX_FLIP and ga == 0 and own_amax and hist_row is None
    # Strips where X^T's groups span the tile's rows (see _pair_strips).
    strip = PAIR_STRIP_ROWS if ga != 0 and br >= STRIP_MIN_ROWS and br > PAIR_STRIP_ROWS > 0 and (
        ga < 0 or gb == br) else 0
    if round_bf16 and (strip or x2.dtype != torch.float32):
        raise ValueError(f"round_bf16 needs an fp32 input quantized in whole tiles, got {x2.dtype}"
                         f"{' in strips' if strip else ''}")
    kernel = (wrap or launchable)(_pair_kernel)
    (seed_a, seed_b), on_device = seed_args(seed_a, seed_b)
    kernel[grid](
        x2, data, data_t, scale, scale_t, g_amax if g_amax is not None else dummy,
        rec_bits if rec_bits is not None else dummy, r, c, x2.stride(0), x2.stride(1),
        scale.stride(0), scale.stride(1), scale_t.stride(0), scale_t.stride(1),
        seed_a, seed_b,
        MBITS=fmt.mbits, EMIN=fmt.emin, EMAX=fmt.emax, FMAX=float(fmt.max), HAS_INF=fmt.has_inf,
        KIND_INT=fmt.kind == "int", ENC=enc, SMODE=smode, GA=ga, GB=gb, SR_A=sr_a, SR_B=sr_b,
        SAME_CODES=same_codes, RECORD=rec_bits is not None, BR=br, BC=bc, HW_FP8=hw, FAST=fast, DIV=div,
        FLIP=flip, SEED_PTR=on_device, DIV_T=div if TRANSPOSED_DIV else 0, STRIP=strip,
        VALS_A=values[0], VALS_B=values[1], ROUND_BF16=round_bf16,
        num_warps=PAIR_WARPS or num_warps or (STRIP_WARPS if strip else 8 if br * bc >= 16384 else 4),
        hist_ptr=dummy if hist_row is None else hist_row, H=1 if hist_row is None else hist_row.numel(),
        HP=1 if hist_row is None else triton.next_power_of_2(hist_row.numel()), HIST=hist_row is not None,
        # Every argument named: a triton_op's launch (wrap_triton) takes no defaults.
        **(delayed_amax_args(g_amax) if hist_row is not None else dict(NP=1, PP=1)),
    )
