"""Triton side of the residual add + RMSNorm fused with the fp8 delayed-scaling pair of its output
(lowbit.nn.norm_pair_fold): s = a + b, y = bf16(s * rsqrt(mean(s^2) + eps) * w), and y's codes for
X (fprop) and X^T (wgrad) under one tensor scale from an amax history.

Separately, Inductor's add-and-norm kernel writes y in bf16 (2 bytes an element) and the pair
kernel reads it back; here y never reaches memory. One program holds whole rows (the norm's
reduction is along them), writes s and X's codes, and records y's amax; X^T's codes are X's
transposed (one tensor scale, nearest rounding: the same quotient of the same element), so a
second kernel transposes the 1-byte codes in tiles: 2 bytes an element, where y's write and the
pair kernel's read of it and its two writes moved 6.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels import _quantize_triton
from lowbit.kernels._pair_quantize_triton import (
    _delayed_amax,
    _history_bits,
    _record,
    _side,
    _tile_amax_bits,
)
from lowbit.kernels._quant_math_triton import _bf16_rne, _encode, _scaled, _scales
from lowbit.kernels._quantize_triton import _abs_bits
from lowbit.kernels.launch import launchable
from lowbit.kernels.quantize import interpret
from lowbit.quant.formats import ElementFormat


@triton.jit
def _norm_rows(a_ptr, b_ptr, w_ptr, s_ptr, rstd_ptr, r0, M, D, eps, ROWS: tl.constexpr, BD: tl.constexpr,
               STORE: tl.constexpr):
    # Rows r0 .. r0 + ROWS - 1 whole: s = a + b (stored with STORE), rstd = 1 / sqrt(mean(s^2) + eps)
    # (correctly rounded square root and division, as norm_pair_fold.reference's; stored with STORE), and
    # y = (s * rstd) * w rounded to bf16, returned as fp32 ([ROWS, BD], zeros outside the matrix).
    rows = r0 + tl.arange(0, ROWS)
    cols = tl.arange(0, BD)
    m = (rows[:, None] < M) & (cols[None, :] < D)
    idx = rows.to(tl.int64)[:, None] * D + cols[None, :]
    s = tl.load(a_ptr + idx, m, other=0.0) + tl.load(b_ptr + idx, m, other=0.0).to(tl.float32)
    mean = tl.div_rn(tl.sum(s * s, axis=1), D.to(tl.float32))
    rstd = tl.div_rn(1.0, tl.sqrt_rn(mean + eps))
    if STORE:
        tl.store(s_ptr + idx, s, m)
        tl.store(rstd_ptr + rows, rstd, rows < M)
    w = tl.load(w_ptr + cols, cols < D, other=0.0)
    y = (s * rstd[:, None]) * w[None, :]
    return _bf16_rne(y).to(tl.float32)


@triton.jit
def _norm_amax_if_empty_kernel(a_ptr, b_ptr, w_ptr, parts_ptr, rec_ptr, hist_ptr, H, M, D, eps,
                               HP: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr):
    # The gate (as _pair_quantize_triton._amax_if_empty_kernel): program 0 zeroes the record word;
    # while the history row is all zeros, each program stores the amax bits of y over the row
    # blocks it strides over, computed as the main kernel computes y (same rows, same reduction).
    if tl.program_id(0) == 0:
        tl.store(rec_ptr, 0)
    if _history_bits(hist_ptr, H, HP) == 0:
        acc = tl.zeros([ROWS, BD], tl.int32)
        for r in range(tl.program_id(0) * ROWS, M, tl.num_programs(0) * ROWS):
            y = _norm_rows(a_ptr, b_ptr, w_ptr, a_ptr, a_ptr, r, M, D, eps, ROWS, BD, False)
            acc = tl.maximum(acc, _abs_bits(y))
        tl.store(parts_ptr + tl.program_id(0), tl.max(tl.reshape(acc, [ROWS * BD]), axis=0))


@triton.jit
def _norm_pair_kernel(a_ptr, b_ptr, w_ptr, s_ptr, rstd_ptr, d_ptr, sc_ptr, sct_ptr, parts_ptr, rec_ptr,
                      hist_ptr, H, M, D, eps, MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
                      FMAX: tl.constexpr, HAS_INF: tl.constexpr, ENC: tl.constexpr, HP: tl.constexpr,
                      NP: tl.constexpr, PP: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr,
                      FAST: tl.constexpr, DIV: tl.constexpr):
    # Rows of s, rstd and X's codes (y quantized along its rows with the delayed tensor scale), and
    # y's amax recorded into rec_ptr. Program 0 stores the scale for X and X^T.
    r0 = tl.program_id(0) * ROWS
    y = _norm_rows(a_ptr, b_ptr, w_ptr, s_ptr, rstd_ptr, r0, M, D, eps, ROWS, BD, True)
    tamax = tl.zeros([1, 1], tl.float32) + _delayed_amax(hist_ptr, H, parts_ptr, NP, HP, PP)
    _record(rec_ptr, _tile_amax_bits(y))
    rows = r0 + tl.arange(0, ROWS)
    cols = tl.arange(0, BD)
    sc, eff = _scales(tamax, 1.0, FMAX, EMAX, 0)
    if r0 == 0:  # X^T's scale is X's (one tensor scale)
        tl.store(sct_ptr + tl.zeros([1, 1], tl.int32), sc)
    if FAST:  # GPU: the hardware cast rounds (as the pair kernel's FAST form)
        if r0 == 0:
            tl.store(sc_ptr + tl.zeros([1, 1], tl.int32), sc)
        codes = _encode(_scaled(y, eff, 0, DIV), ENC, True)
    else:  # the pair kernel's generic side (it stores the scale from program 0)
        codes = _side(y, r0, 0, M, D, tamax, sc_ptr, 0, 0, 0, 0, ROWS, BD, MBITS, EMIN, EMAX, FMAX,
                      HAS_INF, False, ENC, 0, False, False, False, DIV)
    m = (rows[:, None] < M) & (cols[None, :] < D)
    tl.store(d_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], codes.to(tl.uint8), m)


@triton.jit
def _transpose_bytes_kernel(x_ptr, t_ptr, M, D, BM: tl.constexpr, BN: tl.constexpr):
    # t[j, i] = x[i, j] for a row-major M x D matrix of bytes, one [BM, BN] tile a program.
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    m = (rows[:, None] < M) & (cols[None, :] < D)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], m, other=0)
    mt = (cols[:, None] < D) & (rows[None, :] < M)
    tl.store(t_ptr + cols.to(tl.int64)[:, None] * M + rows[None, :], tl.trans(x), mt)


# Launch shape of the row kernels: ROWS rows a program, whole rows up to this width.
NORM_ROWS = 2
MAX_WIDTH = 8192
TRANSPOSE_TILE = (64, 64)


def launch_norm_pair(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float, fmt: ElementFormat,
                     enc: int, hist_row: torch.Tensor, s: torch.Tensor, rstd: torch.Tensor,
                     data: torch.Tensor, data_t: torch.Tensor, scale: torch.Tensor, scale_t: torch.Tensor,
                     parts: torch.Tensor, rec: torch.Tensor) -> None:
    """The gate, the fused row kernel and the transpose of the codes (see the module docstring);
    the caller rolls `rec` into the history afterwards. a fp32, b any float dtype, both M x D and
    contiguous; w fp32 of D; data (M x D) and data_t (D x M) uint8; parts / rec from
    _pair_quantize_triton.delayed_words."""
    m, d = a.shape
    if d > MAX_WIDTH:
        raise ValueError(f"rows of {d} are wider than the fused norm's {MAX_WIDTH}")
    bd = triton.next_power_of_2(d)
    warps = 8 if bd * NORM_ROWS >= 8192 else 4
    hp = triton.next_power_of_2(hist_row.numel())
    launchable(_norm_amax_if_empty_kernel)[(parts.numel(),)](
        a, b, w, parts, rec, hist_row, hist_row.numel(), m, d, eps, HP=hp, ROWS=NORM_ROWS, BD=bd,
        num_warps=warps)
    hw = not interpret()
    div = 0 if not _quantize_triton.FAST_DIVISION else 2  # quotients unbounded: a history's amax
    launchable(_norm_pair_kernel)[(triton.cdiv(m, NORM_ROWS),)](
        a, b, w, s, rstd, data, scale, scale_t, parts, rec, hist_row, hist_row.numel(), m, d, eps,
        MBITS=fmt.mbits, EMIN=fmt.emin, EMAX=fmt.emax, FMAX=float(fmt.max), HAS_INF=fmt.has_inf, ENC=enc,
        HP=hp, NP=parts.numel(), PP=triton.next_power_of_2(parts.numel()), ROWS=NORM_ROWS, BD=bd,
        FAST=hw, DIV=div, num_warps=warps)
    bm, bn = TRANSPOSE_TILE
    launchable(_transpose_bytes_kernel)[(triton.cdiv(m, bm), triton.cdiv(d, bn))](
        data, data_t, m, d, BM=bm, BN=bn, num_warps=4)
