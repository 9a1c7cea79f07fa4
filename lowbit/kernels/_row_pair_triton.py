"""Triton side of the row-scaled pair: X with one scale per row and X^T with one scale per row of
X^T (a column of X), from two reads of X and no transposed copy (imported lazily).

A row of X^T is a column of X, so its scale needs the column's amax over every row before any
of its elements is rounded: no tile sees a whole column. Pass 1 (`_row_col_amax_kernel`) reads X
once for both amaxes, as integer maxima of the |x| bits (NaN sorts above Inf, so it propagates as
in the reference), gathered with relaxed atomics; pass 2 (`_row_pair_kernel`) reads each tile
again and writes both sides' codes with the per-element steps of the fused quantize kernel
(_quant_math_triton.py), so each side is bit for bit what lowbit.quant.quantize gives.

Before this, fp8_rowwise's X^T went through a transposed copy and a second quantize: a read and a
write of X in bf16 more than these two passes (docs/BENCHMARKS.md, twenty-ninth pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels import _pair_quantize_triton, _quantize_triton
from lowbit.kernels._quant_math_triton import _quant_tile, _scales
from lowbit.kernels._quantize_triton import _abs_bits, _load_tile
from lowbit.kernels.launch import launchable, seed_args
from lowbit.kernels.quantize import interpret
from lowbit.quant.formats import ElementFormat


@triton.jit
def _row_col_amax_kernel(x_ptr, rbits_ptr, cbits_ptr, R, C, sxr, sxc, BR: tl.constexpr, BC: tl.constexpr,
                         ITERS: tl.constexpr):
    # One program: ITERS row blocks of BR rows in one column block of BC. Each block's row maxima
    # go out at once (one atomic per row); the column maxima stay in registers across the blocks
    # (one atomic per column at the end), so a launch issues R * C / BC + C * R / (BR * ITERS)
    # atomics instead of one per element. Outside the matrix the tile is zeros (no amax raised).
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmax = tl.zeros([BC], tl.int32)
    for i in range(ITERS):
        rows = (pid_r * ITERS + i) * BR + tl.arange(0, BR)
        bits = _abs_bits(_load_tile(x_ptr, rows, cols, R, C, sxr, sxc, False, ""))
        tl.atomic_max(rbits_ptr + rows, tl.max(bits, axis=1), mask=rows < R, sem="relaxed")
        cmax = tl.maximum(cmax, tl.max(bits, axis=0))
    tl.atomic_max(cbits_ptr + cols, cmax, mask=cols < C, sem="relaxed")


@triton.jit(do_not_specialize=["seed_a", "seed_b"])
def _row_pair_kernel(
    x_ptr, d_ptr, dt_ptr, rbits_ptr, cbits_ptr, s_ptr, st_ptr, R, C, sxr, sxc, seed_a, seed_b,
    MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, FMAX: tl.constexpr, HAS_INF: tl.constexpr,
    KIND_INT: tl.constexpr, ENC: tl.constexpr, SMODE: tl.constexpr, SR_A: tl.constexpr, SR_B: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, HW_FP8: tl.constexpr, DIV: tl.constexpr, DIV_T: tl.constexpr,
    SEED_PTR: tl.constexpr,
):
    # One [BR, BC] tile of X: its rows' codes scaled by their row amaxes, and its transpose's rows'
    # codes by X's column amaxes (pass 1). Scales are stored once, by the first column of
    # programs (X's) and the first row of programs (X^T's); every program derives the ones it uses
    # from the amaxes itself, the same bits.
    if SEED_PTR:  # one-element int64 tensors (lowbit.kernels.launch.seed_args)
        seed_a = tl.load(seed_a)
        seed_b = tl.load(seed_b)
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_c * BC + tl.arange(0, BC)
    x = _load_tile(x_ptr, rows, cols, R, C, sxr, sxc, False, "")
    ramax = tl.load(rbits_ptr + rows, rows < R, other=0).to(tl.float32, bitcast=True)
    camax = tl.load(cbits_ptr + cols, cols < C, other=0).to(tl.float32, bitcast=True)
    s, eff = _scales(ramax, 1.0, FMAX, EMAX, SMODE)
    s_t, eff_t = _scales(camax, 1.0, FMAX, EMAX, SMODE)
    if pid_c == 0:
        tl.store(s_ptr + rows, s, rows < R)
    if pid_r == 0:
        tl.store(st_ptr + cols, s_t, cols < C)
    idx = rows.to(tl.int64)[:, None] * C + cols[None, :]
    codes = _quant_tile(x, eff[:, None], idx, seed_a, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, SR_A,
                        SMODE, HW_FP8, False, DIV)
    m = (rows[:, None] < R) & (cols[None, :] < C)
    tl.store(d_ptr + idx, codes.to(tl.uint8), m)
    idx_t = cols.to(tl.int64)[:, None] * R + rows[None, :]
    codes_t = _quant_tile(tl.trans(x), eff_t[:, None], idx_t, seed_b, KIND_INT, MBITS, EMIN, EMAX, FMAX,
                          HAS_INF, ENC, SR_B, SMODE, HW_FP8, True, DIV_T)
    tl.store(dt_ptr + idx_t, codes_t.to(tl.uint8), (cols[:, None] < C) & (rows[None, :] < R))


# Launch shapes. AMAX_TILE: pass 1's (BR, BC) block, AMAX_ITERS_MAX its most row blocks a program;
# PAIR_TILE / PAIR_WARPS: pass 2's tile and warps. Run 250 of docs/BENCHMARKS.md
# (`benchmarks/row_pair_bw.py --sweep`, fp8 e4m3 rows, bf16 16384 x 2048 / x 8192, 47 settings,
# all bit-exact): 0.083 / 0.310 ms with these, against 0.101 / 0.392 with a 32 x 256 block looping
# over up to 8 row blocks (fewer atomics, but slower) and 64 x 64 tiles; 2 or 8 warps were slower.
AMAX_TILE = (64, 128)
AMAX_ITERS_MAX = 1
AMAX_WARPS = 4
PAIR_TILE = (32, 128)
PAIR_WARPS = 4


def launch_row_col_amax(x2: torch.Tensor, rbits: torch.Tensor, cbits: torch.Tensor) -> None:
    """Row and column maxima of |x2| as int32 bits into rbits (r words) and cbits (c words), zeroed."""
    r, c = x2.shape
    br = min(AMAX_TILE[0], triton.next_power_of_2(r))
    bc = min(AMAX_TILE[1], triton.next_power_of_2(c))
    col_blocks = triton.cdiv(c, bc)
    # Enough programs for ~2 waves on 132 SMs before a program takes more row blocks.
    iters = max(1, min(AMAX_ITERS_MAX, triton.cdiv(r, br) * col_blocks // 264))
    grid = (triton.cdiv(r, br * iters), col_blocks)
    launchable(_row_col_amax_kernel)[grid](
        x2, rbits, cbits, r, c, x2.stride(0), x2.stride(1), BR=br, BC=bc, ITERS=iters, num_warps=AMAX_WARPS,
    )


def launch_row_pair(x2: torch.Tensor, data: torch.Tensor, data_t: torch.Tensor, rbits: torch.Tensor,
                    cbits: torch.Tensor, scale: torch.Tensor, scale_t: torch.Tensor, fmt: ElementFormat,
                    enc: int, smode: int, sr_a: bool, sr_b: bool, seed_a: int | torch.Tensor,
                    seed_b: int | torch.Tensor) -> None:
    """Pass 2: both sides' codes (data r x c, data_t c x r, uint8) and scales (r and c words)."""
    r, c = x2.shape
    br = min(PAIR_TILE[0], max(16, triton.next_power_of_2(r)))
    bc = min(PAIR_TILE[1], max(16, triton.next_power_of_2(c)))
    # Row amaxes are the rows' own, so the quotients are bounded: _div_scale's DIV 3, on X^T's side
    # too where the pair kernel's TRANSPOSED_DIV says so (0, tl.div_rn, where FAST_DIVISION is off).
    div = 3 if _quantize_triton.FAST_DIVISION else 0
    div_t = div if _pair_quantize_triton.TRANSPOSED_DIV else 0
    (seed_a, seed_b), on_device = seed_args(seed_a, seed_b)
    launchable(_row_pair_kernel)[(triton.cdiv(r, br), triton.cdiv(c, bc))](
        x2, data, data_t, rbits, cbits, scale, scale_t, r, c, x2.stride(0), x2.stride(1), seed_a, seed_b,
        MBITS=fmt.mbits, EMIN=fmt.emin, EMAX=fmt.emax, FMAX=float(fmt.max), HAS_INF=fmt.has_inf,
        KIND_INT=fmt.kind == "int", ENC=enc, SMODE=smode, SR_A=sr_a, SR_B=sr_b, BR=br, BC=bc,
        HW_FP8=not interpret(), DIV=div, DIV_T=div_t, SEED_PTR=on_device, num_warps=PAIR_WARPS,
    )
