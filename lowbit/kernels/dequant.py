"""Dequantize a (K-last) QTensor to BF16 on the GPU, exactly, for a cuBLAS BF16 GEMM; unpack
packed int4 to int8 for the int8 GEMM (`unpack_int4`).

Hopper has no block-scaled MMA, so MX and NVFP4 pairs whose element x group-scale products are
exact in BF16 (fp8/fp4 values with power-of-two or E4M3 group scales: at most 4 + 4 significant
bits, against BF16's 8) can run as: dequantize both operands to BF16 (one pass each), then cuBLAS
BF16 with fp32 accumulation. That is the same product as the fused Triton GEMM's BF16 path and
ran 2x faster than it on the H100 (docs/BENCHMARKS.md). NVFP4's fp32 tensor scales are left out
here (their products would round) and applied to the fp32 GEMM output by the caller.
Exact except where value x scale falls below BF16's smallest subnormal (blocks whose amax is
below ~2^-118), where it rounds, as in the Triton GEMM's BF16 path.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.kernels.launch import launchable
from lowbit.kernels.quantize import interpret
from lowbit.quant.qtensor import QTensor


def dequantize_bf16(q: QTensor, elem: int, smode: int, rd: int, g: int) -> torch.Tensor:
    """(rows, K) BF16 = element values x group (or row / tensor) scales of a 2-D K-last QTensor.

    `elem`, `smode`, `rd`, `g` are lowbit.kernels.gemm's `_elem` and `_smode` of `q`."""
    from lowbit.kernels._dequant_triton import _dequant_bf16_kernel
    from lowbit.kernels.gemm import _data2d, _scale2d

    r, k = q.shape
    d = _data2d(q)
    s = _scale2d(q)
    ssr, ssg = s.stride(0), s.stride(1)
    if smode == 0:  # one scale: every element reads [0, 0]
        ssr = ssg = 0
    elif smode == 1:  # one scale a row
        ssg = 0
    out = torch.empty((r, k), dtype=torch.bfloat16, device=d.device)
    br, bc = 32, 128
    grid = (-(-r // br), -(-k // bc))
    launchable(_dequant_bf16_kernel)[grid](d, s, out, r, k, d.stride(0), ssr, ssg, out.stride(0), ELEM=elem,
                               G=max(g, 1), RD=max(rd, 1), BR=br, BC=bc, HW=not interpret(), num_warps=4)
    return out


def unpack_int4(q: QTensor) -> QTensor:
    """The same QTensor with its packed int4 codes as one int8 a code (same scales, exact).

    Two int4 operands then run on the int8 MMA with the int8 GEMM's epilogue: on the H100 the
    int4 kernel, which unpacks nibbles inside its K loop, ran at ~210 TFLOP/s against the int8
    kernel's ~850 (docs/BENCHMARKS.md), and the unpack pass moves only 1.5 bytes an element."""
    from lowbit.kernels._dequant_triton import _unpack_int4_kernel
    from lowbit.kernels.gemm import _data2d

    r, k = q.shape
    d = _data2d(q)
    out = torch.empty((r, k), dtype=torch.int8, device=d.device)
    br, bc = 32, 128
    grid = (-(-r // br), -(-k // bc))
    launchable(_unpack_int4_kernel)[grid](d, out, r, k, d.stride(0), out.stride(0), BR=br, BC=bc, num_warps=4)
    return dataclasses.replace(q, data=out, packed=False)  # still int4 values: decode reads int8 data


def scale_output(
    out: torch.Tensor, scales: list[torch.Tensor], bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """The fp32 GEMM output's epilogue in one pass: out times each 1-element scale in turn, plus
    bias, in out_dtype: bit for bit `out.mul_(s)` for each s, `out.add_(bias.float())`,
    `out.to(out_dtype)`. Those eager ops were one pass each over an fp32 matrix, and the multiplies
    by a 0-d device tensor took torch's slow broadcasting kernel: on the H100 they came to 104 ms of
    a 459 ms 1b nvfp4 step (docs/BENCHMARKS.md, run 182). fp32 outputs are scaled in place."""
    from lowbit.kernels._dequant_triton import _scale_output_kernel

    if not scales and bias is None and out.dtype == out_dtype:  # nothing to do: no pass over out
        return out
    plain = out.dim() == 2 and out.stride(1) == 1 and out.dtype == torch.float32
    if out_dtype not in (torch.bfloat16, torch.float32) or len(scales) > 2 or not plain:
        for s in scales:
            out.mul_(s)
        if bias is not None:
            out.add_(bias.float())
        return out.to(out_dtype)
    r, c = out.shape
    y = out if out_dtype == torch.float32 else torch.empty((r, c), dtype=out_dtype, device=out.device)
    ts = [s.float().reshape(1) for s in scales] + [out] * (2 - len(scales))
    br, bc = 16, 256
    grid = (-(-r // br), -(-c // bc))
    launchable(_scale_output_kernel)[grid](
        out, y, ts[0], ts[1], bias if bias is not None else out, r, c, out.stride(0), y.stride(0),
        NS=len(scales), HAS_BIAS=bias is not None, BF16=out_dtype == torch.bfloat16, BR=br, BC=bc,
        num_warps=4, enable_fp_fusion=False,
    )
    return y
