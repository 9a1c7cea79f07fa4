"""Triton kernels: fused quantize, block-scaled GEMM, low-bit optimizer steps.

Each op dispatches to Triton on CUDA and to the lowbit.quant reference elsewhere. Importing this
package registers, with lowbit.quant.gemm, the "triton" GEMM backend and the fused quantize for
CUDA operands. Nothing imports Triton until a kernel runs, so lowbit
imports without Triton installed.
"""

from __future__ import annotations


def register() -> None:
    """Register the Triton GEMM backend ("triton"; tried first by backend="auto") and quantizer."""
    import lowbit.quant.gemm as qgemm
    from lowbit.kernels.backend import triton_gemm_backend
    from lowbit.kernels.quantize import quantize

    qgemm.register_gemm_backend("triton", triton_gemm_backend)
    qgemm.register_quantize_backend(quantize, "cuda")


register()
