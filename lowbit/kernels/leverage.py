"""The leverage-sampled GEMM (int4_hq's wgrad) on fp8 tensor cores.

lowbit.quant.leverage defines the product: about half of the K-terms of sum_p A_p·B^T, each kept
term scaled by 1/prob, a power of two <= 2^13. Its emulation multiplies fp32 matrices (an fp32
cuBLAS GEMM on CUDA: 5.3 of the int4_hq layer's 16.4 ms at 4096², H100, docs/BENCHMARKS.md).
Here, for int4 row-scaled operands (the only ones int4_hq samples):
  1. column norms ||A_p[:, k]|| and ||B[:, k]|| from the packed codes and row scales (one read
     each; partial sums per block of rows, added in a fixed order);
  2. the gains, from lowbit.quant.leverage.leverage_gains (same function, same noise);
  3. each part's codes times its gains as fp8 e5m2 and B's codes as e4m3, all exact;
  4. one fp8 GEMM per part (exact products, fp32 accumulation): on CUDA cuBLAS with unit scales
     and one pass for the row scales, the parts' sum and the output dtype
     (lowbit.kernels.parts_gemm); elsewhere lowbit.kernels.gemm.scaled_gemm, the parts added.
The result matches the emulation within fp32-accumulation tolerance (and the fp8 MMA's on CUDA);
the norms are sums in another order, so a probability on the edge between two powers of two, or a
noise value equal to it, may fall the other way (never seen in the tests).

    leverage_gemm(a, b, seed, out_dtype, bias)  the lowbit.quant.leverage backend for CUDA
    why_not_leverage(a, b)                      None when it runs the pair, else the reason
LOWBIT_LEVERAGE_KERNELS=0 leaves the product to the fp32 emulation (for comparisons).
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.env_flags import env_flag
from lowbit.kernels.launch import launchable
from lowbit.kernels.quantize import interpret, triton_runs_on
from lowbit.quant.formats import get_format
from lowbit.quant.gemm import Operand
from lowbit.quant.leverage import Seed, leverage_gains
from lowbit.quant.qtensor import QTensor

ENABLED = env_flag("LOWBIT_LEVERAGE_KERNELS", True)
_BR, _BC = 64, 128  # tile of the norm and conversion kernels (rows x codes)


def _int4_rows(q: QTensor) -> bool:
    plain = q.block == "row" and q.tensor_scale is None and len(q.shape) == 2
    return q.fmt.name == "int4" and q.packed and plain


def why_not_leverage(a: Operand, b: Operand) -> str | None:
    """Why leverage_gemm declines Operands a and b (None: it runs them)."""
    if not ENABLED:
        return "LOWBIT_LEVERAGE_KERNELS=0"
    if a.hp is not None or b.hp is not None:
        return "an operand is kept in high precision"
    if len(b.parts) != 1:
        return "B is split into parts"
    if not all(_int4_rows(q) for q in (*a.parts, *b.parts)):
        return "the operands are not packed int4 with one scale a row"
    if not triton_runs_on(b.parts[0].data):
        return f"the operands are on {b.parts[0].data.device}; the kernels run on CUDA tensors"
    if any(q.shape[1] != b.parts[0].shape[1] for q in a.parts):
        return "A and B differ along K"
    return None


def column_norms(q: QTensor) -> torch.Tensor:
    """(K,) fp32 ||dequantized q[:, k]|| of a packed int4 row-scaled QTensor (rows × K)."""
    from lowbit.kernels._leverage_triton import _column_sq_norm_kernel
    from lowbit.kernels.gemm import _data2d

    r, k = q.shape
    d, s = _data2d(q), q.scale.float().reshape(-1).contiguous()
    nb = max(1, -(-r // _BR))
    partial = torch.empty((nb, k), dtype=torch.float32, device=d.device)
    grid = (nb, -(-k // _BC))
    launchable(_column_sq_norm_kernel)[grid](d, s, partial, r, k, d.stride(0), partial.stride(0),
                                             BR=_BR, BC=_BC, num_warps=4)
    return partial.sum(0).sqrt()


def int4_as_fp8(q: QTensor, gains: torch.Tensor | None = None) -> QTensor:
    """q's codes (times `gains` along K, powers of two <= 2^13) as exact fp8: e5m2 with gains,
    e4m3 without; same row scales, so it dequantizes to q (times the gains)."""
    from lowbit.kernels._leverage_triton import _int4_to_fp8_kernel
    from lowbit.kernels.gemm import _data2d

    r, k = q.shape
    d = _data2d(q)
    dtype = torch.float8_e5m2 if gains is not None else torch.float8_e4m3fn
    out = torch.empty((r, k), dtype=dtype, device=d.device)
    g = gains.float().contiguous() if gains is not None else q.scale
    grid = (-(-r // _BR), -(-k // _BC))
    launchable(_int4_to_fp8_kernel)[grid](d, g, out.view(torch.uint8), r, k, d.stride(0), out.stride(0),
                                          GAIN=gains is not None, E5M2=gains is not None,
                                          HW_FP8=not interpret(), BR=_BR, BC=_BC, num_warps=4)
    fmt = get_format("fp8_e5m2" if gains is not None else "fp8_e4m3")
    return dataclasses.replace(q, data=out, fmt=fmt, packed=False)


def leverage_gemm(a: Operand, b: Operand, seed: Seed, out_dtype: torch.dtype = torch.float32,
                  bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """The leverage-sampled A·B^T (+ bias) of lowbit.quant.gemm Operands (module docstring); None
    where `why_not_leverage` declines. `seed` is the sampling's (derive_seed(gemm seed, 4))."""
    if why_not_leverage(a, b) is not None:
        return None
    from lowbit.kernels.gemm import scaled_gemm
    from lowbit.kernels.parts_gemm import parts_gemm

    qb = b.parts[0]
    norms_a = torch.stack([column_norms(q) for q in a.parts])
    gains = leverage_gains(norms_a, column_norms(qb), seed)
    b8 = int4_as_fp8(qb)
    a8 = [int4_as_fp8(q, g) for q, g in zip(a.parts, gains)]
    out = parts_gemm(a8, b8, out_dtype, bias)  # CUDA: cuBLAS fp8 GEMMs and one epilogue pass
    if out is not None:
        return out
    out = None
    for q in a8:
        part = scaled_gemm(q, b8)
        out = part if out is None else out.add_(part)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
