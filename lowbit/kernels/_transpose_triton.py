"""Triton side of lowbit.kernels.transpose: a tiled copy of a strided 2-D view into a row-major
matrix, moving bits (integer lanes), so any float payload (NaN, -0, subnormals) is kept as is."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, R, C, s_r, s_c, BR: tl.constexpr, BC: tl.constexpr):
    # One [BR, BC] tile: loaded with the source's strides (Triton vectorizes along whichever axis
    # has stride 1 and moves the tile through shared memory to the store's order), stored row-major.
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (rows[:, None] < R) & (cols[None, :] < C)
    r64 = rows.to(tl.int64)[:, None]
    c64 = cols.to(tl.int64)[None, :]
    v = tl.load(src_ptr + r64 * s_r + c64 * s_c, m)
    tl.store(dst_ptr + r64 * C + c64, v, m)
