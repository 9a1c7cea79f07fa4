"""Hadamard-rotated GEMM operands on the Triton kernels.

    rotate_quantize(x, spec, block, signs_seed, seed=, amax=)
        == lowbit.quant.quantize(hadamard_rotate(x.float(), block, signs), spec, seed=seed, amax=amax)
    hadamard_rotate(x, block, signs_seed) == lowbit.quant.hadamard_rotate(x.float(), block, signs)

bit for bit, with signs = random_signs(block, signs_seed) (None: no signs). rotate_quantize reads x
once and rotates each tile in registers before quantizing it, so the rotated fp32 matrix is never
written (before: an fp32 copy, the rotation's read and write, and the quantizer's read). Tensor-wise
and NVFP4 scales need the rotated tensor's amax first: one more read, on a rotate-and-max kernel.

Views whose rows are contiguous and K strided (X^T and dY^T for wgrad, W^T for dgrad) with 1-D
groups go to the column quantizer (lowbit.kernels.column_quantize): one read of the view, each
thread rotating and quantizing whole groups of its rows, 2.2-2.4x the rotation kernel followed by
the quantize kernel (H100, docs/BENCHMARKS.md, thirty-second pass).

`rotate_quantize` returns None for what it does not fuse (the caller rotates, then quantizes):
K not a multiple of the block (the reference pads K), 2-D scale tiles not holding whole blocks,
other views not contiguous along K (row or tensor scaling of X^T, or what the column quantizer
declines: the rotation kernel reads them in place, faster than the copy the quantize kernel would
make), and anything `lowbit.kernels.quantize.supports` sends to the reference.

Speed (H100, docs/BENCHMARKS.md, seventh pass): the rotation kernel alone runs at 0.94 of a copy
(6 bytes an element); the fused kernel at 0.28-0.62 of a copy (2.5 bytes an element, but the
butterfly's register exchanges cost about as much time as the quantize itself), which is still
1.65-2.8x the two kernels and 4-7x the fp32 matmul rotation it replaced.
"""

from __future__ import annotations

import torch

from lowbit.kernels import quantize as _kq
from lowbit.kernels.column_quantize import column_fold_for, column_quantize, why_not_columns
from lowbit.kernels.quantize import quantize_2d, supports, triton_runs_on
from lowbit.quant.formats import FORMATS
from lowbit.quant.hadamard import hadamard_rotate as reference_rotate
from lowbit.quant.hadamard import random_signs
from lowbit.quant.qtensor import QTensor
from lowbit.quant.quantize import QuantSpec, check_quantize_args
from lowbit.quant.rounding import seed_offset
from lowbit.quant.scale_fold import FOLD_BLOCK

MAX_BLOCK = 256  # the largest block a tile rotates (the 16-256; 2-8 work too)


def why_not_fused(x: torch.Tensor, spec: QuantSpec, block: int) -> str | None:
    """Why rotate_quantize declines (x, spec, block), or None when it fuses them."""
    if block < 2 or block > MAX_BLOCK or block & (block - 1):
        return f"Hadamard block {block} is not a power of two in [2, {MAX_BLOCK}]"
    if x.dim() != 2:
        return f"x has shape {tuple(x.shape)}, not a matrix"
    if x.shape[1] % block:
        return f"K={x.shape[1]} is not a multiple of the Hadamard block {block} (the reference pads it)"
    if x.stride(1) != 1 and x.shape[1] > 1 and not _kq.ROTATED_STRIDED_READ:
        # The quantize kernel would copy it to row-major first, and that strided copy measured
        # 2.8x slower than the rotation kernel reading the view (H100, run 60: 208 vs 74 us).
        return "x is not contiguous along K (the rotation kernel reads such views faster)"
    if not supports(x, spec):
        return f"the Triton quantizer does not run {spec} on {x.device} ({x.dtype})"
    b = spec.block  # 1-D groups and Hadamard blocks, both powers of two, always nest
    if isinstance(b, tuple) and b[1] % block:
        return f"2-D scale tiles {b} do not hold whole Hadamard blocks of {block}"
    return None


def rotate_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    block: int,
    signs_seed: int | None = None,
    *,
    seed: int = 0,
    amax: torch.Tensor | None = None,
    role: int | None = None,
) -> QTensor | None:
    """x (R × K) rotated along K in Hadamard blocks of `block` and quantized, in one kernel; None
    where it does not fuse (see why_not_fused). `role`, the GEMM side x is for (1 = A, 2 = B), lets
    the column quantizer write an MXFP4 operand folded for cuBLAS (`column_fold_for`)."""
    check_quantize_args(x, spec, amax)
    sign_off = seed_offset(signs_seed) if signs_seed is not None else None
    if 2 <= block <= MAX_BLOCK and why_not_columns(x, spec, block) is None:  # X^T, dY^T, W^T
        fold = column_fold_for(x, spec, block, role)
        data, scale, tscale, packed = column_quantize(x.detach(), spec, block, sign_off, seed_offset(seed),
                                                      fold=fold)
        if fold is not None:  # e4m3 values, a scale a 1 x 128 chunk (A) or 128 x 128 tile (B)
            b = FOLD_BLOCK if fold == "chunk" else (FOLD_BLOCK, FOLD_BLOCK)
            return QTensor(data, scale, FORMATS["fp8_e4m3"], b, x.shape, 1, torch.float32, False)
        return QTensor(data, scale, spec.format, spec.block, x.shape, 1, torch.float32, packed, tscale)
    if why_not_fused(x, spec, block) is not None:
        return None
    data, scale, tscale, packed = quantize_2d(x.detach(), spec, seed=seed, amax=amax, hadamard=block,
                                              sign_off=sign_off)
    # The reference rotates x.float(): the QTensor dequantizes to fp32, as the reference's does.
    return QTensor(data, scale, spec.format, spec.block, x.shape, 1, torch.float32, packed, tscale)


def hadamard_rotate(x: torch.Tensor, block: int, signs_seed: int | None = None) -> torch.Tensor:
    """fp32 x·R along the last axis of a matrix (Triton where it runs, else the reference)."""
    pow2 = 2 <= block <= MAX_BLOCK and block & (block - 1) == 0
    if x.dim() != 2 or not pow2 or x.shape[1] % block or not triton_runs_on(x):
        # The reference raises on a block that is not a power of two (the butterfly needs one).
        signs = random_signs(block, signs_seed, x.device) if signs_seed is not None else None
        return reference_rotate(x.float(), block, signs)
    from lowbit.kernels._hadamard_triton import launch_rotate

    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    launch_rotate(x.detach(), out, block, seed_offset(signs_seed) if signs_seed is not None else None)
    return out
