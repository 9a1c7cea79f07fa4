"""The "triton" GEMM backend for lowbit.quant.gemm: quantized Operands -> fp32 product on CUDA.

Registered by `lowbit.kernels.register()` (run on `import lowbit.kernels`), so `backend="triton"`
names it and `backend="auto"` tries it first. It declines (returns None, and the caller emulates or
uses cuBLAS) what it cannot run: fp32 operands, leverage sampling (int4_hq wgrad), pairs that
`gemm.why_not` rejects, and CPU tensors (unless a test switches the interpreter on below).
FP8 tensorwise/rowwise pairs run on cuBLAS (torch._scaled_mm), measured faster than our kernel.
A bit-split A (int4_hq) is two GEMMs added.
"""

from __future__ import annotations

import torch

from lowbit.kernels.quantize import interpret, triton_available
from lowbit.quant.gemm import Operand, _scaled_mm, _scaled_mm_ok
from lowbit.quant.recipes import GemmSpec

# Tests set this to run the Triton interpreter on CPU operands; never on in normal use, where CPU
# tensors must keep the fast emulation path.
ALLOW_INTERPRETER_ON_CPU = False
# Measured on the H100 (docs/BENCHMARKS.md): cuBLAS wins for fp8 tensorwise/rowwise.
PREFER_CUBLAS_FP8 = True


def _runnable(a: Operand) -> bool:
    if not triton_available():
        return False
    return a.is_cuda or (ALLOW_INTERPRETER_ON_CPU and interpret())


def triton_gemm_backend(a: Operand, b: Operand, gemm: GemmSpec) -> torch.Tensor | None:
    """fp32 A·B^T of two prepared operands on the Triton GEMM (or cuBLAS for fp8), None to decline."""
    if a.hp is not None or b.hp is not None or gemm.leverage_sampling or len(b.parts) != 1:
        return None
    if not _runnable(a):
        return None
    from lowbit.kernels.gemm import scaled_gemm, why_not

    qb = b.parts[0]
    # Power-of-two (e8m0) and E4M3 group scales times the elements are exact in bf16.
    exact = all(s is None or s.scale in ("e8m0", "e8m0_up", "e4m3") for s in (gemm.a, gemm.b))
    if any(why_not(qa, qb, exact) is not None for qa in a.parts):
        return None
    if PREFER_CUBLAS_FP8 and a.is_cuda and _scaled_mm_ok(a, b, gemm):
        try:
            return _scaled_mm(a, b)
        except RuntimeError:
            # A GPU without fp8 tensor cores (e.g. A100): decline, so that backend="auto" reaches
            # lowbit.quant.gemm's own cuBLAS attempt, which warns once and emulates.
            return None
    out = scaled_gemm(a.parts[0], qb, bf16_exact=exact)
    for qa in a.parts[1:]:
        out += scaled_gemm(qa, qb, bf16_exact=exact)
    return out
