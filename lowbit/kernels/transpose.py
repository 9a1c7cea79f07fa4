"""A row-major copy of a transposed matrix view (X^T, dY^T, W^T) on a tiled Triton kernel.

The quantize kernel reads its rows contiguously, so an operand whose K axis is not contiguous (the
wgrad and dgrad operands of row-scaled recipes) is copied row-major first. torch's copy of such a
view is slow on the H100: fp8_rowwise's 1b step spent 76 ms in 176 of them (0.43 ms each;
docs/BENCHMARKS.md, twenty-eighth pass). This kernel loads tiles along the source's contiguous axis
and stores them along the destination's. The bits are copied unchanged.
"""

from __future__ import annotations

import torch

# Tile of one program (elements): 64 x 64 moves 8-16 KB through shared memory.
TILE = (64, 64)
_LANES = {2: torch.int16, 4: torch.int32, 1: torch.int8, 8: torch.int64}


def row_major(x: torch.Tensor) -> torch.Tensor:
    """x (2-D, any strides) as a new contiguous tensor with the same values, bit for bit. Views
    whose rows are not contiguous go through the tiled kernel; others through torch's copy."""
    if x.dim() != 2:
        raise ValueError(f"row_major takes a matrix, got shape {tuple(x.shape)}")
    if x.is_contiguous():
        return x
    if x.stride(1) == 1 or x.numel() == 0 or x.element_size() not in _LANES:
        return x.contiguous()
    from lowbit.kernels._transpose_triton import _copy_kernel
    from lowbit.kernels.launch import launchable

    lanes = _LANES[x.element_size()]
    r, c = x.shape
    out = torch.empty((r, c), dtype=x.dtype, device=x.device)
    br, bc = TILE
    launchable(_copy_kernel)[(-(-r // br), -(-c // bc))](
        x.view(lanes), out.view(lanes), r, c, x.stride(0), x.stride(1), BR=br, BC=bc, num_warps=4)
    return out
