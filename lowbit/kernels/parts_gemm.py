"""A·B^T where A is one or two row-scaled parts (a bit split) and B is row-scaled: cuBLAS on CUDA.

int4_hq's GEMMs are all of this kind: fprop int4 × int4 (one part), dgrad and wgrad a bit-split
A (two parts, each with its own row scales); its wgrad's parts are fp8 e5m2 codes times the
leverage gains against B's codes as e4m3 (lowbit.kernels.leverage). On the H100 the Triton GEMM
ran these at ~670 TFLOP/s, and the two parts' sum and the bf16 cast were two more passes
(docs/BENCHMARKS.md, run 259). Here each part's raw product runs on cuBLAS (`torch._int_mm`,
int32 out, exact; or `torch._scaled_mm` with unit scales, fp32 out, fp32 accumulation) and one
Triton pass applies both parts' row scales, B's, the bias and the output dtype.

    parts_gemm(parts, qb, out_dtype, bias)  fp32/bf16 sum_p dequant(parts[p]) · dequant(qb)^T (+ bias),
                                            or None where cuBLAS does not take the shapes or elements
The result matches the emulation within fp32-accumulation tolerance. CPU tensors (tests, the
interpreter) return None: the caller then runs the Triton GEMM per part.
"""

from __future__ import annotations

import torch

from lowbit.kernels.launch import launchable
from lowbit.quant.qtensor import QTensor

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _kind(parts: list[QTensor], qb: QTensor) -> str | None:
    qs = [*parts, qb]
    if not all(q.block == "row" and q.tensor_scale is None and len(q.shape) == 2 for q in qs):
        return None
    if not (qb.data.is_cuda and 1 <= len(parts) <= 2):
        return None
    m, k = parts[0].shape
    n = qb.shape[0]
    if any(q.shape[1] != k or q.shape[0] != m for q in parts) or qb.shape[1] != k:
        return None
    # int4 only packed (K even): unpacked codes are stored as unsigned nibbles, not int8 values.
    if all(q.data.dtype == torch.int8 or (q.fmt.name == "int4" and q.packed) for q in qs):
        return "int" if m > 16 and k % 8 == 0 and n % 8 == 0 else None
    if all(q.data.dtype in _FP8 for q in qs) and qb.data.dtype == torch.float8_e4m3fn:
        return "fp8" if m % 16 == 0 and k % 16 == 0 and n % 16 == 0 else None
    return None


def _int8(q: QTensor) -> torch.Tensor:
    if q.packed:
        from lowbit.kernels.dequant import unpack_int4

        q = unpack_int4(q)
    return q.data


def parts_gemm(parts: list[QTensor], qb: QTensor, out_dtype: torch.dtype = torch.float32,
               bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """sum_p parts[p] · qb^T, dequantized (module docstring); None where it does not apply."""
    kind = _kind(parts, qb)
    if kind is None or out_dtype not in (torch.float32, torch.bfloat16):
        return None

    if kind == "int":
        b = _int8(qb)
        raw = [torch._int_mm(_int8(q), b.t()) for q in parts]
    else:
        one = torch.ones((), dtype=torch.float32, device=qb.data.device)
        raw = [torch._scaled_mm(q.data, qb.data.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
               for q in parts]
    return combine(raw, parts, qb, out_dtype, bias)


def combine(raw: list[torch.Tensor], parts: list[QTensor], qb: QTensor, out_dtype: torch.dtype,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """sum_p raw[p] · parts[p]'s row scales, times qb's row scales (+ bias), in out_dtype: one pass
    over the parts' raw GEMM sums (int32 or fp32, rows × cols, row-major)."""
    from lowbit.kernels._parts_gemm_triton import _combine_kernel

    m, n = raw[0].shape
    out = torch.empty((m, n), dtype=out_dtype, device=raw[0].device)
    scales = [q.scale.float().reshape(-1).contiguous() for q in (*parts, qb)]
    two = len(parts) == 2
    br, bc = 16, 256
    grid = (-(-m // br), -(-n // bc))
    launchable(_combine_kernel)[grid](
        raw[0], raw[-1], scales[0], scales[1] if two else scales[0], scales[-1],
        bias if bias is not None else scales[-1], out, m, n, raw[0].stride(0), out.stride(0),
        TWO=two, HAS_BIAS=bias is not None, BR=br, BC=bc, num_warps=4,
    )
    return out
