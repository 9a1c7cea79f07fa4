"""The "triton" GEMM backend for lowbit.quant.gemm: quantized Operands -> product on CUDA.

Registered by `lowbit.kernels.register()` (run on `import lowbit.kernels`), so `backend="triton"`
names it and `backend="auto"` tries it after cuBLAS. It declines (returns None, and the caller
emulates) what it cannot run: fp32 operands, leverage sampling (int4_hq wgrad), pairs that
`gemm.why_not` rejects, and CPU tensors (unless a test switches the interpreter on below).
FP8 tensorwise/rowwise/blockwise pairs reach cuBLAS first under backend="auto" (lowbit.quant.gemm;
measured faster); backend="triton" runs them on our kernel. A bit-split A (int4_hq) is two GEMMs
added. The output is written in bf16 (with the bias) when the layer asks for bf16.
"""

from __future__ import annotations

import torch

from lowbit.kernels.quantize import interpret, triton_available
from lowbit.quant.gemm import Operand
from lowbit.quant.recipes import GemmSpec

# Tests set this to run the Triton interpreter on CPU operands; never on in normal use, where CPU
# tensors must keep the fast emulation path.
ALLOW_INTERPRETER_ON_CPU = False


def _runnable(a: Operand) -> bool:
    if not triton_available():
        return False
    return a.is_cuda or (ALLOW_INTERPRETER_ON_CPU and interpret())


def triton_gemm_backend(
    a: Operand,
    b: Operand,
    gemm: GemmSpec,
    out_dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """A·B^T (+ bias) of two prepared operands on the Triton GEMM, None to decline."""
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
    if len(a.parts) == 1:
        dt = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
        return scaled_gemm(a.parts[0], qb, bias=bias, out_dtype=dt, bf16_exact=exact)
    out = scaled_gemm(a.parts[0], qb, bf16_exact=exact)
    for qa in a.parts[1:]:
        out += scaled_gemm(qa, qb, bf16_exact=exact)
    return out if bias is None else out + bias.float()
