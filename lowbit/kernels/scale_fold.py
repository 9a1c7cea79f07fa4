"""MXFP4 GEMMs on Hopper's fp8 tensor cores: group scales folded into the values, one pass each.

lowbit.quant.scale_fold defines the fold: an E2M1 operand with power-of-two group scales becomes
fp8 values with one scale a row (exact while a row's group scales span less than 2^28 for e5m2,
2^14 for e4m3; beyond that the smallest groups round on the fp8 grid, see there). Here:

    fold_group_scales(q, dtype)           the same fold in Triton: a pass over the scales for each
                                          row's largest, then one over the packed codes (two
                                          launches: tiles whose values are all fp8 normals, then
                                          the rest; bit for bit the reference's)
    folded_gemm(qa, qb, out_dtype, bias)  A folded to e5m2 (gradients, the wider range), B to
                                          e4m3, then cuBLAS fp8: for a bf16 output (and no or a
                                          bf16 bias) with the row scales as its own (M, 1) and
                                          (1, N) scales; otherwise with unit scales and fp32 output
                                          and one epilogue pass for both row scales, the bias and
                                          the output dtype (lowbit.kernels.parts_gemm); None where
                                          it does not apply (`why_not_folded`)
The fold's codes come from integer operations on the E2M1 code and the scale's exponent, the
rounding of values below fp8's normals (half to even) included: bit for bit the reference. The fp8
MMA sums a K step's products at less than fp32 precision (as it does for every fp8 recipe on
cuBLAS), which shows where a row's values span many binades: measured on the H100 at up to ~3e-4
of the output's largest magnitude for groups spread over 2^-6..2^6 (run 266,
docs/BENCHMARKS.md), where the exact BF16 path is within fp32 rounding.

Before this, MX FP4 pairs ran as exact BF16 operands through cuBLAS BF16 (lowbit.kernels.dequant):
the same number of passes, but BF16's tensor cores instead of fp8's, and two bytes written per
element instead of one. LOWBIT_MX_FP8=0 keeps that exact BF16 path.
"""

from __future__ import annotations

import torch

from lowbit.env_flags import env_flag
from lowbit.kernels.launch import launchable
from lowbit.kernels.quantize import triton_runs_on
from lowbit.quant.formats import FORMATS
from lowbit.quant.qtensor import QTensor
from lowbit.quant.scale_fold import _FMT_NAME, FOLD_BLOCK, HEADROOM, is_block_folded, why_not_fold

ENABLED = env_flag("LOWBIT_MX_FP8", True)
_BR, _BC = 32, 128  # the fold's tile (rows x elements)
_TOP_BR, _TOP_BG = 8, 128  # the row-maximum pass: rows a program, scales a step


def _why_not_kernel(q: QTensor) -> str | None:
    reason = why_not_fold(q)
    if reason is None and not q.packed:
        reason = "unpacked fp4 codes (the kernel reads two a byte)"
    if reason is None and (q.block < 2 or q.block & (q.block - 1) or q.block > 1024):
        reason = f"group size {q.block} (the kernel takes powers of two from 2 to 1024)"
    if reason is None and not triton_runs_on(q.data):
        reason = f"a tensor on {q.data.device} (the kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1)"
    return reason


def fold_chunks(q: QTensor) -> QTensor:
    """lowbit.quant.scale_fold.fold_blocks(q, rows=1) in Triton: one launch for the chunks whose
    values are all e4m3 normals, one for the rest (q packed, groups dividing 128)."""
    from lowbit.kernels import _scale_fold_triton as kt
    from lowbit.kernels.gemm import _data2d, _scale2d

    reason = _why_not_kernel(q)
    if reason is None and (FOLD_BLOCK % q.block or q.shape[1] % FOLD_BLOCK):
        reason = f"groups of {q.block} along K={q.shape[1]} (chunks of {FOLD_BLOCK} hold whole groups)"
    if reason is not None:
        raise ValueError(f"fold_chunks: {reason}")
    dtype = torch.float8_e4m3fn
    fmt = FORMATS[_FMT_NAME[dtype]]
    r, k = q.shape
    d, s = _data2d(q), _scale2d(q)
    out = torch.empty((r, k), dtype=torch.uint8, device=d.device)
    scale = torch.empty((k // FOLD_BLOCK, r), dtype=torch.float32, device=d.device).t()  # cuBLAS's layout
    if r and k:
        for full in (False, True):
            launchable(kt._fold_kernel)[(-(-r // _BR), k // FOLD_BLOCK)](
                d, s, scale, out.view(torch.int16), r, k, d.stride(0), s.stride(0), s.stride(1), k // 2,
                G=q.block, HEADROOM=HEADROOM[dtype], MBITS=fmt.mbits, EB=fmt.bias, BR=_BR, BC=FOLD_BLOCK,
                FULL=full, CHUNK=True, scr=scale.stride(0), scc=scale.stride(1), num_warps=4,
            )
    return QTensor(data=out.view(dtype), scale=scale, fmt=fmt, block=FOLD_BLOCK, shape=q.shape, axis=q.axis,
                   dtype=q.dtype, packed=False)


def fold_group_scales(q: QTensor, dtype: torch.dtype = torch.float8_e4m3fn) -> QTensor:
    """lowbit.quant.scale_fold.fold_group_scales in two Triton passes (q packed, on a Triton device)."""
    from lowbit.kernels import _scale_fold_triton as kt
    from lowbit.kernels.gemm import _data2d, _scale2d

    reason = _why_not_kernel(q)
    if reason is not None:
        raise ValueError(f"fold_group_scales: {reason}")
    if dtype not in HEADROOM:
        raise ValueError(f"fold_group_scales: dtype {dtype}; valid choices: {', '.join(map(str, HEADROOM))}")
    fmt = FORMATS[_FMT_NAME[dtype]]
    r, k = q.shape  # k is even: the codes are packed
    d, s = _data2d(q), _scale2d(q)
    dev = d.device
    top = torch.empty(r, dtype=torch.int32, device=dev)
    row = torch.empty(r, dtype=torch.float32, device=dev)
    out = torch.empty((r, k), dtype=torch.uint8, device=dev)
    if r and k:
        launchable(kt._row_top_kernel)[(-(-r // _TOP_BR),)](
            s, top, row, r, s.shape[1], s.stride(0), s.stride(1), HEADROOM=HEADROOM[dtype], BR=_TOP_BR,
            BG=_TOP_BG, num_warps=4,
        )
        bc = max(_BC, q.block)  # whole groups a tile
        for full in (False, True):  # tiles of fp8 normals, then the others (_fold_kernel)
            launchable(kt._fold_kernel)[(-(-r // _BR), -(-k // bc))](
                d, s, top, out.view(torch.int16), r, k, d.stride(0), s.stride(0), s.stride(1), k // 2,
                G=q.block, HEADROOM=HEADROOM[dtype], MBITS=fmt.mbits, EB=fmt.bias, BR=_BR, BC=bc, FULL=full,
                num_warps=4,
            )
    return QTensor(data=out.view(dtype), scale=row, fmt=fmt, block="row", shape=q.shape, axis=q.axis,
                   dtype=q.dtype, packed=False)


def why_not_folded(qa: QTensor, qb: QTensor) -> str | None:
    """None when folded_gemm runs the pair (whose group scales the caller knows are powers of two)."""
    if not ENABLED:
        return "LOWBIT_MX_FP8=0"
    for q in (qa, qb):
        reason = why_not_fold(q)
        if reason is not None:
            return reason
        if not q.packed:
            return "unpacked fp4 codes"
    if qa.block != qb.block:
        return f"group sizes differ ({qa.block} vs {qb.block})"
    if not (qa.data.is_cuda and qb.data.is_cuda):
        return "CPU operands (cuBLAS fp8 runs on CUDA)"
    m, k = qa.shape
    n = qb.shape[0]
    if not (m and n and k):
        return f"an empty product {tuple(qa.shape)} x {tuple(qb.shape)}"
    if qb.shape[1] != k or m % 16 or n % 16 or k % 16:
        return f"shapes {tuple(qa.shape)} x {tuple(qb.shape)} (cuBLAS fp8 wants multiples of 16)"
    return None


def folded_gemm(qa: QTensor, qb: QTensor, out_dtype: torch.dtype = torch.float32,
                bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """dequant(qa) · dequant(qb)^T (+ bias) on fp8 tensor cores (module docstring); None to decline.
    Where an operand comes folded already (`is_block_folded`: the column quantizer's chunks or
    tiles), the pair runs on cuBLAS's blockwise GEMM, and is never declined."""
    if is_block_folded(qa) or is_block_folded(qb):
        return _blockwise_folded(qa, qb, out_dtype, bias)
    if out_dtype not in (torch.float32, torch.bfloat16) or why_not_folded(qa, qb) is not None:
        return None
    from lowbit.kernels.parts_gemm import parts_gemm

    fa = fold_group_scales(qa, torch.float8_e5m2)
    fb = fold_group_scales(qb, torch.float8_e4m3fn)
    if out_dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16):
        # cuBLAS applies both row scales and the bias to its fp32 sums and rounds once to bf16.
        return torch._scaled_mm(fa.data, fb.data.t(), scale_a=fa.scale.reshape(-1, 1),
                                scale_b=fb.scale.reshape(1, -1), bias=bias, out_dtype=torch.bfloat16)
    return parts_gemm([fa], fb, out_dtype, bias)


def why_not_blockwise(qa: QTensor, qb: QTensor) -> str | None:
    """None when cuBLAS's blockwise fp8 GEMM runs qa · qb^T for folded (or chunk-foldable) operands."""
    if not hasattr(torch.nn.functional, "ScalingType"):
        return f"torch {torch.__version__} has no blockwise scaled_mm"
    if not (qa.data.is_cuda and qb.data.is_cuda):
        return "CPU operands (cuBLAS fp8 runs on CUDA)"
    if qa.block == qb.block == (FOLD_BLOCK, FOLD_BLOCK):
        return "two 128 x 128 tiled operands (cuBLAS pairs a tiled operand with 1 x 128 chunks)"
    (m, k), n = qa.shape, qb.shape[0]
    if not (m and n and k) or m % FOLD_BLOCK or n % FOLD_BLOCK or k % FOLD_BLOCK or qb.shape[1] != k:
        return f"shapes {tuple(qa.shape)} x {tuple(qb.shape)} (cuBLAS's blockwise GEMM wants multiples of " \
            f"{FOLD_BLOCK})"
    for q in (qa, qb):
        if is_block_folded(q):
            continue
        reason = _why_not_kernel(q)
        if reason is None and FOLD_BLOCK % q.block:
            reason = f"groups of {q.block} (a chunk of {FOLD_BLOCK} holds whole groups)"
        if reason is not None:
            return reason
    return None


def _blockwise_folded(qa: QTensor, qb: QTensor, out_dtype: torch.dtype,
                      bias: torch.Tensor | None) -> torch.Tensor:
    from torch.nn.functional import scaled_mm

    from lowbit.kernels.gemm import bf16_gemm
    from lowbit.quant.gemm import blockwise_scales

    if why_not_blockwise(qa, qb) is not None:
        # e4m3 values times power-of-two scales, and E2M1 codes times E8M0 scales, are bf16
        # numbers (short significands) wherever they fall in bf16's range, as training's do.
        a16, b16 = (q.dequantize_lastdim().to(torch.bfloat16) for q in (qa, qb))
        return bf16_gemm(a16, b16, [], bias, out_dtype)
    fa = qa if is_block_folded(qa) else fold_chunks(qa)
    fb = qb if is_block_folded(qb) else fold_chunks(qb)
    (sa, ka), (sb, kb) = blockwise_scales(fa), blockwise_scales(fb)
    dt = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32
    out = scaled_mm(fa.data, fb.data.t(), sa, ka, sb, kb, output_dtype=dt)
    if bias is not None:
        out = out + bias.to(dt)
    return out.to(out_dtype)
