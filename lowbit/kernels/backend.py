"""The "triton" GEMM backend for lowbit.quant.gemm: quantized Operands -> product on CUDA.

Registered by `lowbit.kernels.register()` (run on `import lowbit.kernels`), so `backend="triton"`
names it and `backend="auto"` tries it after cuBLAS. It declines (returns None, and the caller
emulates) what it cannot run: fp32 operands, leverage sampling (int4_hq's wgrad, which
lowbit.quant.gemm hands to lowbit.kernels.leverage before any backend), pairs that
`gemm.why_not` rejects, and CPU tensors (unless a test switches the interpreter on below).
FP8 tensorwise/rowwise/blockwise pairs reach cuBLAS first under backend="auto" (lowbit.quant.gemm;
measured faster); backend="triton" runs them on our kernel. A bit-split A (int4_hq) is two GEMMs
added: on CUDA two cuBLAS GEMMs and one epilogue pass (lowbit.kernels.parts_gemm), else two
Triton GEMMs. The output is written in bf16 (with the bias) when the layer asks for bf16.
"""

from __future__ import annotations

import torch

from lowbit.kernels.quantize import interpret, triton_available
from lowbit.quant.gemm import Operand
from lowbit.quant.recipes import GemmSpec
from lowbit.quant.scale_fold import is_block_folded

# Tests set this to run the Triton interpreter on CPU operands; never on in normal use, where CPU
# tensors must keep the fast emulation path.
ALLOW_INTERPRETER_ON_CPU = False


def _runnable(a: Operand) -> bool:
    if not triton_available():
        return False
    return a.is_cuda or (ALLOW_INTERPRETER_ON_CPU and interpret())


def why_not_triton(a: Operand, b: Operand, gemm: GemmSpec) -> str | None:
    """Why triton_gemm_backend declines this GEMM (None: it runs it)."""
    if a.hp is not None or b.hp is not None:
        return "an operand is kept in high precision"
    if gemm.leverage_sampling:
        return "leverage sampling (int4_hq's wgrad) runs on lowbit.kernels.leverage, not this GEMM"
    if len(b.parts) != 1:
        return "B is split into parts"
    if not triton_available():
        return "Triton is not installed"
    if not _runnable(a):
        return f"the operands are on {a.parts[0].data.device}; the Triton GEMM runs on CUDA tensors"
    from lowbit.kernels.gemm import why_not

    qb = b.parts[0]
    for qa in a.parts:
        reason = why_not(qa, qb, _bf16_exact(gemm))
        if reason is not None:
            return reason
    return None


def _pow2_scaled(gemm: GemmSpec) -> bool:
    return all(s is not None and s.scale in ("e8m0", "e8m0_up") for s in (gemm.a, gemm.b))


def _bf16_exact(gemm: GemmSpec) -> bool:
    # Power-of-two (e8m0) and E4M3 group scales times the elements are exact in bf16.
    return all(s is None or s.scale in ("e8m0", "e8m0_up", "e4m3") for s in (gemm.a, gemm.b))


def triton_gemm_backend(
    a: Operand,
    b: Operand,
    gemm: GemmSpec,
    out_dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """A·B^T (+ bias) of two prepared operands on the Triton GEMM, None to decline (`why_not_triton`)."""
    if len(a.parts) == len(b.parts) == 1 and a.is_cuda and (
        is_block_folded(a.parts[0]) or is_block_folded(b.parts[0])
    ):  # an operand the column quantizer wrote folded (MXFP4): cuBLAS's blockwise GEMM
        from lowbit.kernels.scale_fold import folded_gemm

        return folded_gemm(a.parts[0], b.parts[0], out_dtype, bias)
    if why_not_triton(a, b, gemm) is not None:
        return None
    from lowbit.kernels.gemm import scaled_gemm

    qb, exact = b.parts[0], _bf16_exact(gemm)
    if len(a.parts) == 1 and _pow2_scaled(gemm):  # MXFP4: fp8 tensor cores, scales folded in
        from lowbit.kernels.scale_fold import folded_gemm

        out = folded_gemm(a.parts[0], qb, out_dtype, bias)
        if out is not None:
            return out
    if len(a.parts) == 1:
        dt = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
        return scaled_gemm(a.parts[0], qb, bias=bias, out_dtype=dt, bf16_exact=exact)
    from lowbit.kernels.parts_gemm import parts_gemm

    out = parts_gemm(a.parts, qb, out_dtype, bias)  # a bit split (int4_hq's dgrad) on cuBLAS
    if out is not None:
        return out
    out = scaled_gemm(a.parts[0], qb, bf16_exact=exact)
    for qa in a.parts[1:]:
        out += scaled_gemm(qa, qb, bf16_exact=exact)
    return out if bias is None else out + bias.float()
