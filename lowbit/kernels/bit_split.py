"""The residual of a bit split on the GPU: t - dequantize(q) in one pass.

int4_hq splits a gradient operand into two int4 terms: q = quantize(t), then the residual
t - dequantize(q) quantized again (lowbit.quant.gemm.prepare_operand). In eager torch the residual
took ~10 elementwise passes (nibble unpack, int64 decode, scale broadcast, multiply, subtract): 2.7
of the int4_hq layer's 6.1 ms at 4096² on the H100 (docs/BENCHMARKS.md, run 258). Here one kernel
reads t and the codes and writes the fp32 residual, bit for bit the reference's: the same fp32
product code × row scale and the same difference, each rounded once.

    residual(t, q)  fp32 (rows × K) t - q.dequantize_lastdim(), or None where it does not apply
                    (not a row-scaled int4/int8/fp8 matrix, or no Triton on t's device)
"""

from __future__ import annotations

import torch

from lowbit.kernels.launch import launchable
from lowbit.kernels.quantize import triton_runs_on
from lowbit.quant.qtensor import QTensor

_BR, _BC = 16, 256


def _elem(q: QTensor) -> int | None:
    from lowbit.kernels.gemm import _elem as gemm_elem

    e = gemm_elem(q)
    return None if e == 1 else e  # packed fp4 is read as e4m3 codes (no values) by the GEMM loader


def residual(t: torch.Tensor, q: QTensor) -> torch.Tensor | None:
    """t - q.dequantize_lastdim() in fp32 (module docstring); None where it does not apply."""
    plain = q.block == "row" and q.tensor_scale is None and len(q.shape) == 2 and t.dim() == 2
    if not plain or tuple(t.shape) != tuple(q.shape) or _elem(q) is None or not triton_runs_on(t):
        return None
    from lowbit.kernels._bit_split_triton import _residual_kernel
    from lowbit.kernels.gemm import _data2d

    r, k = t.shape
    d, s = _data2d(q), q.scale.float().reshape(-1).contiguous()
    out = torch.empty((r, k), dtype=torch.float32, device=t.device)
    grid = (-(-r // _BR), -(-k // _BC))
    launchable(_residual_kernel)[grid](t.detach(), d, s, out, r, k, t.stride(0), t.stride(1), d.stride(0),
                                       out.stride(0), ELEM=_elem(q), BR=_BR, BC=_BC, num_warps=4,
                                       enable_fp_fusion=False)
    return out
