"""Triton kernels: fused quantize, block-scaled GEMM, low-bit optimizer steps.

Each op dispatches to Triton on CUDA and to the lowbit.quant reference elsewhere; importing this
package registers the "triton" GEMM backend with lowbit.quant.gemm (no Triton import until a
kernel runs, so lowbit imports without Triton installed).
"""

from __future__ import annotations


def register() -> None:
    """Register the Triton GEMM backend ("triton"; also tried first by backend="auto")."""
    from lowbit.kernels.backend import triton_gemm_backend
    from lowbit.quant.gemm import register_gemm_backend

    register_gemm_backend("triton", triton_gemm_backend)


register()
