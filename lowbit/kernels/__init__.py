"""Triton kernels: fused quantize, block-scaled GEMM, low-bit optimizer steps.

Each op dispatches to Triton on CUDA and to the lowbit.quant reference elsewhere. Importing this
package registers, with lowbit.quant.gemm, the "triton" GEMM backend, the fused quantize, the
pair quantize (an operand and its transpose in one pass), the Hadamard rotation (alone or fused
into the quantize pass), a bit split's residual and the leverage-sampled GEMM (lowbit.quant.leverage)
for CUDA operands.
Nothing imports Triton until a kernel runs, so lowbit imports without Triton installed.
"""

from __future__ import annotations


def register() -> None:
    """Register the Triton GEMM backend ("triton"; tried first by backend="auto") and quantizer."""
    import lowbit.quant.gemm as qgemm
    from lowbit.kernels.backend import triton_gemm_backend, why_not_triton
    from lowbit.kernels.bit_split import residual
    from lowbit.kernels.hadamard import hadamard_rotate, rotate_quantize
    from lowbit.kernels.leverage import leverage_gemm
    from lowbit.kernels.pair_quantize import quantize_pair_or_none
    from lowbit.kernels.quantize import quantize
    from lowbit.quant.leverage import register_leverage_backend

    qgemm.register_gemm_backend("triton", triton_gemm_backend, why_not_triton)
    qgemm.register_quantize_backend(quantize, "cuda")
    qgemm.register_pair_quantize_backend(quantize_pair_or_none, "cuda")
    qgemm.register_rotation_backend(hadamard_rotate, rotate_quantize, "cuda")
    register_leverage_backend(leverage_gemm, "cuda")
    qgemm.register_bit_split_backend(residual, "cuda")


register()
