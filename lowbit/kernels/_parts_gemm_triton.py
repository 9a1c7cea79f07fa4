"""Triton side of the split-operand GEMM's epilogue (imported lazily; see lowbit/kernels/parts_gemm.py)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _combine_kernel(o0_ptr, o1_ptr, s0_ptr, s1_ptr, sb_ptr, bias_ptr, out_ptr, R, C, so, sout,
                    TWO: tl.constexpr, HAS_BIAS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    # out = (o0 * s0[r] + o1 * s1[r]) * sb[c] (+ bias[c]): raw GEMM sums (int32 or fp32) of each
    # part of A, their row scales, B's row scales; written in out's dtype (fp32 or bf16).
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (rows[:, None] < R) & (cols[None, :] < C)
    off = rows.to(tl.int64)[:, None] * so + cols[None, :]
    rm = rows < R
    v = tl.load(o0_ptr + off, m, other=0).to(tl.float32) * tl.load(s0_ptr + rows, rm, other=1.0)[:, None]
    if TWO:
        v += tl.load(o1_ptr + off, m, other=0).to(tl.float32) * tl.load(s1_ptr + rows, rm, other=1.0)[:, None]
    v = v * tl.load(sb_ptr + cols, cols < C, other=1.0)[None, :]
    if HAS_BIAS:
        v = v + tl.load(bias_ptr + cols, cols < C, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * sout + cols[None, :], v.to(out_ptr.dtype.element_ty), m)
