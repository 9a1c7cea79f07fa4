"""Triton side of the leverage-sampled GEMM (imported lazily; see lowbit/kernels/leverage.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._gemm_triton import _load_operand
from lowbit.kernels._quant_math_triton import _encode


@triton.jit
def _column_sq_norm_kernel(d_ptr, s_ptr, out_ptr, R, K, sdr, sor, BR: tl.constexpr, BC: tl.constexpr):
    # out[pid0, k] = sum over this program's rows r of (code[r, k] * scale[r])^2: one partial sum
    # per block of BR rows (summed by the caller), so the result does not depend on atomics' order.
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    v = _load_operand(d_ptr, rows, R, sdr, tl.program_id(1) * BC, K, BR, BC, 3).to(tl.float32)
    s = tl.load(s_ptr + rows, rows < R, other=0.0)
    y = v * s[:, None]  # the element as the reference dequantizes it (one fp32 product)
    tl.store(out_ptr + tl.program_id(0).to(tl.int64) * sor + cols, tl.sum(y * y, axis=0), cols < K)


@triton.jit
def _int4_to_fp8_kernel(d_ptr, g_ptr, out_ptr, R, K, sdr, sor, GAIN: tl.constexpr, E5M2: tl.constexpr,
                        HW_FP8: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    # out[r, k] = int4 code[r, k] (x gain[k], a power of two <= 2^13) as fp8: exact (see leverage.py),
    # so the quantizer's encoder writes it (a GPU cast, or the bits assembled in the interpreter).
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    v = _load_operand(d_ptr, rows, R, sdr, tl.program_id(1) * BC, K, BR, BC, 3).to(tl.float32)
    if GAIN:
        v = v * tl.load(g_ptr + cols, cols < K, other=0.0)[None, :]
    m = (rows[:, None] < R) & (cols[None, :] < K)
    codes = _encode(v, 1 if E5M2 else 0, HW_FP8).to(tl.uint8)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * sor + cols[None, :], codes, m)
