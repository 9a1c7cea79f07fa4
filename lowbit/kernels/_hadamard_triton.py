"""Triton side of the blockwise Hadamard rotation (imported lazily, like every Triton module here).

`_rotate_tile` repeats lowbit/quant/hadamard.py's reference literally: random signs from the
counter hash of (column mod b, seed), then the fast Walsh–Hadamard transform in the same stage
order (stage s pairs element j with j + 2^s inside each run of 2^(s+1) and writes (a + b, a - b)),
then one multiply by the fp32 constant 1/√b. Every fp32 add happens on the same two values in the
same order as the reference's, so the result is bit for bit the reference's on any device; a
b×b matmul (tensor cores or not) would sum in an order of its own.

The quantize kernel (_quantize_triton.py) rotates each tile right after loading it, so a rotated
operand is read once and never written in fp32. `_rotate_kernel` writes the rotated fp32 matrix
for the callers that need it whole (a bit-split residual, telemetry, padded K, views that are not
contiguous along K), or only its amax (tensor-wise and NVFP4 scales, before the fused pass).
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from lowbit.kernels._hash_triton import lowbias32
from lowbit.kernels.launch import launchable, seed_args


@triton.jit
def _rotate_tile(x, cols, sign_off, BR: tl.constexpr, BC: tl.constexpr, HAD: tl.constexpr,
                 LOG: tl.constexpr, SCALE: tl.constexpr, SIGNS: tl.constexpr, FLIP: tl.constexpr):
    # x: fp32 [BR, BC] tile whose columns `cols` start at a multiple of HAD (BC a multiple of HAD).
    # Two forms of the same stages (same adds on the same values): FLIP takes each element's
    # partner with tl.flip over the pair axis (warp shuffles), else tl.split/tl.join pair them up
    # (shared-memory layout changes). H100, run 62, fused into the quantize kernel at 8192 x 14336,
    # fraction of a copy: 1-D groups (MXFP4 with SR, NVFP4) 0.37 / 0.27 with FLIP against
    # 0.28 / 0.20; int4 rows 0.24 against 0.28. Alone (_rotate_kernel) both run at 0.94.
    if HAD > 1:
        if SIGNS:  # sign i of a block is 1 - 2 * (lowbias32(i + seed * golden) & 1)
            bit = lowbias32(((cols % HAD).to(tl.int64) + sign_off).to(tl.uint32)) & 1
            x = x * (1.0 - 2.0 * bit.to(tl.float32))[None, :]  # a multiply, as the reference's
        for s in tl.static_range(LOG):
            # [BR, runs, 2, 2^s]: element j of a run's first half pairs with j of its second half.
            # (2^s is written out: a constexpr name assigned in the unrolled loop is a reassignment.)
            x4 = tl.reshape(x, [BR, BC // (2 << s), 2, 1 << s])
            if FLIP:
                p4 = tl.flip(x4, 2)  # (b, a) against x4's (a, b): a + b first, then a - b = p - x
                first = (tl.arange(0, 2) == 0)[None, None, :, None]
                x = tl.reshape(tl.where(first, x4 + p4, p4 - x4), [BR, BC])
            else:
                a, b = tl.split(tl.permute(x4, [0, 1, 3, 2]))
                x = tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2]), [BR, BC])
        x = x * SCALE
    return x


@triton.jit(do_not_specialize=["sign_off"])
def _rotate_kernel(x_ptr, out_ptr, R, K, sxr, sxk, syr, sign_off,
                   BR: tl.constexpr, BC: tl.constexpr, HAD: tl.constexpr, LOG: tl.constexpr,
                   SCALE: tl.constexpr, SIGNS: tl.constexpr, AMAX: tl.constexpr,
                   SEED_PTR: tl.constexpr = False):
    # x·R into out_ptr (fp32, row stride syr), or with AMAX only max |x·R| as integer bits into
    # out_ptr[0] (NaN stays on top, as in the amax kernel of pair_quantize.py). SEED_PTR: sign_off
    # is a one-element int64 tensor (lowbit.kernels.launch.seed_args).
    if SEED_PTR:
        sign_off = tl.load(sign_off)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (rows[:, None] < R) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * sxr + cols.to(tl.int64)[None, :] * sxk, m, other=0.0)
    y = _rotate_tile(x.to(tl.float32), cols, sign_off, BR, BC, HAD, LOG, SCALE, SIGNS, False)
    if AMAX:
        bits = y.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        tl.atomic_max(out_ptr, tl.max(tl.max(bits, axis=1), axis=0), sem="relaxed")
    else:
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * syr + cols[None, :], y, m)


@functools.lru_cache(maxsize=16)
def _constants(block: int) -> tuple[tuple[str, object], ...]:
    # The reference's fp32 constant (a double rounded to fp32, as torch.tensor(..., float32) does;
    # no tensor: the first call may come while a graph is traced, under fake tensors).
    scale = struct.unpack("f", struct.pack("f", block**-0.5))[0]
    return (("HAD", block), ("LOG", block.bit_length() - 1), ("SCALE", scale))


def rotation_constants(block: int) -> dict:
    """The kernels' compile-time arguments for a Hadamard block (1 = no rotation). Cached: every
    quantize launch asks, and a torch.tensor per call showed in the host profile (run 66)."""
    return dict(_constants(block))


def _launch(x2: torch.Tensor, out: torch.Tensor, block: int, sign_off: int | torch.Tensor | None,
            amax: bool) -> None:
    r, k = x2.shape
    bc = max(block, min(triton.next_power_of_2(k), 1024))
    br = max(1, min(triton.next_power_of_2(r), 4096 // bc))
    grid = (triton.cdiv(r, br), triton.cdiv(k, bc))
    (sign_arg,), on_device = seed_args(sign_off)
    launchable(_rotate_kernel)[grid](
        x2, out, r, k, x2.stride(0), x2.stride(1), out.stride(0), sign_arg,
        BR=br, BC=bc, SIGNS=sign_off is not None, AMAX=amax, SEED_PTR=on_device,
        **rotation_constants(block), num_warps=4,
    )


def launch_rotate(x2: torch.Tensor, out: torch.Tensor, block: int,
                  sign_off: int | torch.Tensor | None) -> None:
    """out (fp32, row-major R × K) = x2 (any strided R × K, K a multiple of `block`) rotated."""
    _launch(x2, out, block, sign_off, False)


def launch_rotated_amax(x2: torch.Tensor, out_bits: torch.Tensor, block: int,
                        sign_off: int | torch.Tensor | None) -> None:
    """Integer max of |x2·R| bits into out_bits (int32, 1 element, zeroed): one read of x2."""
    _launch(x2, out_bits, block, sign_off, True)
