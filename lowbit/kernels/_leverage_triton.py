"""Triton side of the leverage-sampled GEMM (imported lazily; see lowbit/kernels/leverage.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels._gemm_triton import _load_operand


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
def _exact_fp8_bits(x, E5M2: tl.constexpr):
    # The fp8 bits of an fp32 value that fp8 holds exactly (a normal number whose significand has
    # at most 2 (e5m2) / 3 (e4m3) fraction bits, or zero), from its fp32 bits: no float cast, so
    # the interpreter (whose fp8 casts round wrongly) and the GPU write the same bits.
    b = x.to(tl.int32, bitcast=True)
    sign = (b >> 24) & 0x80
    exp = (b >> 23) & 0xFF
    if E5M2:
        mag = ((exp - 112) << 2) | ((b >> 21) & 0x3)
    else:
        mag = ((exp - 120) << 3) | ((b >> 20) & 0x7)
    return (sign | tl.where(exp == 0, 0, mag)).to(tl.uint8)  # ±0 keeps its sign, as a cast does


@triton.jit
def _int4_to_fp8_kernel(d_ptr, g_ptr, out_ptr, R, K, sdr, sor, GAIN: tl.constexpr, E5M2: tl.constexpr,
                        BR: tl.constexpr, BC: tl.constexpr):
    # out[r, k] = int4 code[r, k] (x gain[k], a power of two <= 2^13) as fp8: exact (see leverage.py).
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    v = _load_operand(d_ptr, rows, R, sdr, tl.program_id(1) * BC, K, BR, BC, 3).to(tl.float32)
    if GAIN:
        v = v * tl.load(g_ptr + cols, cols < K, other=0.0)[None, :]
    m = (rows[:, None] < R) & (cols[None, :] < K)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * sor + cols[None, :], _exact_fp8_bits(v, E5M2), m)
