"""Triton side of the bit-split residual (imported lazily; see lowbit/kernels/bit_split.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._gemm_triton import _load_operand


@triton.jit
def _residual_kernel(t_ptr, d_ptr, s_ptr, out_ptr, R, K, str_, stk, sdr, sor, ELEM: tl.constexpr,
                     BR: tl.constexpr, BC: tl.constexpr):
    # out = t - code * row scale, rounded after the product and after the difference (the kernel is
    # launched without fp fusion, so no fma joins them), as the reference's two torch ops round.
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (rows[:, None] < R) & (cols[None, :] < K)
    t = tl.load(t_ptr + rows.to(tl.int64)[:, None] * str_ + cols.to(tl.int64)[None, :] * stk, m, other=0.0)
    v = _load_operand(d_ptr, rows, R, sdr, tl.program_id(1) * BC, K, BR, BC, ELEM).to(tl.float32)
    s = tl.load(s_ptr + rows, rows < R, other=1.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * sor + cols[None, :], t.to(tl.float32) - v * s[:, None], m)
