"""Triton side of the bf16 dequantize (imported lazily; see lowbit/kernels/dequant.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._gemm_triton import _load_operand
from lowbit.kernels._quant_math_triton import _bf16_rne


@triton.jit
def _dequant_bf16_kernel(d_ptr, s_ptr, out_ptr, R, K, sdr, ssr, ssg, sor, ELEM: tl.constexpr,
                         G: tl.constexpr, RD: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                         HW: tl.constexpr):
    # out[r, k] = value(code[r, k]) * scale[r // RD, k // G] in bf16 (exact: see dequant.py).
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    v = _load_operand(d_ptr, rows, R, sdr, tl.program_id(1) * BC, K, BR, BC, ELEM).to(tl.float32)
    m = (rows[:, None] < R) & (cols[None, :] < K)
    # One scale per element through 2-D indices (L1 hits), not a [BR, BC // G, G] reshape.
    s = tl.load(s_ptr + (rows // RD).to(tl.int64)[:, None] * ssr + (cols // G)[None, :] * ssg, m, other=1.0)
    y = v * s
    if HW:
        out = y.to(tl.bfloat16)
    else:  # the interpreter's bf16 cast rounds wrongly; the value is exact in bf16: keep the top bits
        out = (y.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * sor + cols[None, :], out, m)


@triton.jit
def _unpack_int4_kernel(d_ptr, out_ptr, R, K, sdr, sor, BR: tl.constexpr, BC: tl.constexpr):
    # out[r, k] = the signed int4 code k of row r, as int8 (exact; see dequant.unpack_int4).
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    v = _load_operand(d_ptr, rows, R, sdr, tl.program_id(1) * BC, K, BR, BC, 3)
    m = (rows[:, None] < R) & (cols[None, :] < K)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * sor + cols[None, :], v, m)


@triton.jit
def _scale_output_kernel(o_ptr, y_ptr, ta_ptr, tb_ptr, b_ptr, R, C, sor, syr, NS: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BF16: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    # y = (o * ta) * tb + bias, in that order and rounded after each step as torch's in-place ops
    # do (launched without fp fusion), then bf16 (to nearest even) or fp32.
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (rows[:, None] < R) & (cols[None, :] < C)
    v = tl.load(o_ptr + rows.to(tl.int64)[:, None] * sor + cols[None, :], m, other=0.0)
    if NS >= 1:
        v = v * tl.load(ta_ptr)
    if NS >= 2:
        v = v * tl.load(tb_ptr)
    if HAS_BIAS:
        v = v + tl.load(b_ptr + cols, cols < C, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rows.to(tl.int64)[:, None] * syr + cols[None, :]
    if BF16:
        tl.store(out, _bf16_rne(v), m)
    else:
        tl.store(out, v, m)
