"""MX layers' graph ops with the operands used at once written as BF16 values by the pair kernel.

Hopper has no block-scaled MMA, so an MXFP8 GEMM runs on CUDA as exact BF16 operands through
cuBLAS BF16 (lowbit.kernels.gemm, DEQUANT_CUBLAS): the pair kernel writes fp8 codes and scales,
then a dequantize pass reads them back and writes BF16. On the H100 that pass took 31.2 ms of a
254.5 ms 1b mxfp8 step, more than the pair kernels themselves (docs/BENCHMARKS.md, run 175).

For the operands a GEMM reads right away (X and W in fprop; dY and dY^T in backward) the pair
kernel now writes the BF16 values itself (lowbit.kernels.pair_quantize.quantize_pair_values):
the same BF16 operands, so the same cuBLAS call and the same bits, without the codes' round trip.
Operands saved for backward (X^T, W^T) stay fp8 codes and scales, so activation memory is what it
was, and are dequantized when backward reads them.

`uses_values` decides, for recipes whose six operands are fp8 with power-of-two scales on 1-D
groups of up to 32, nearest rounding, no rotation or bit split (mxfp8), on CUDA with the
dequantize-and-cuBLAS path on. The layer's autograd Function asks it while the graph is traced and
passes the answer to the ops as an argument (`as_values`), so the choice is part of the graph and
of Inductor's cache key (a cached graph traced the other way expects other output shapes).
LOWBIT_PAIR_VALUES=0 turns it off; the CPU tests turn it on under the Triton interpreter
(FORCE_INTERPRETED), where the GEMM is an fp32 torch matmul.
"""

from __future__ import annotations

import torch

from lowbit.env_flags import env_flag
from lowbit.quant.qtensor import QTensor
from lowbit.quant.quantize import QuantSpec
from lowbit.quant.recipes import GemmSpec, Recipe

ON = env_flag("LOWBIT_PAIR_VALUES", True)
# Tests: take the values path on the CPU too, under TRITON_INTERPRET=1.
FORCE_INTERPRETED = False


def _plain_mx(spec: QuantSpec | None) -> bool:
    return (
        spec is not None and spec.fmt in ("fp8_e4m3", "fp8_e5m2") and spec.scale in ("e8m0", "e8m0_up")
        and isinstance(spec.block, int) and spec.block <= 32 and spec.rounding == "nearest"
    )


def _plain_gemm(g: GemmSpec) -> bool:
    return _plain_mx(g.a) and _plain_mx(g.b) and not (g.hadamard or g.bit_split or g.leverage_sampling)


def values_recipe(recipe: Recipe) -> bool:
    """Whether every operand of the recipe can be written as values (module docstring): fp8 with
    power-of-two scales on 1-D groups of up to 32, nearest rounding, no rotation or bit split, and
    each pair (X/X^T, W/W^T, dY/dY^T) of one format and scale kind."""
    f, d, w = recipe.fprop, recipe.dgrad, recipe.wgrad
    if not all(_plain_gemm(g) for g in (f, d, w)):
        return False
    pairs = ((f.a, w.b), (f.b, d.b), (d.a, w.a))
    return all(p.fmt == q.fmt and p.scale == q.scale for p, q in pairs)


def uses_values(recipe: Recipe, x: torch.Tensor) -> bool:
    """Whether a graph-op call of this recipe on x writes its at-once operands as values."""
    if not (ON and values_recipe(recipe)):
        return False
    from lowbit.kernels import gemm as kgemm
    from lowbit.kernels.pair_quantize import GROUPS_ON_CUDA
    from lowbit.kernels.quantize import interpret, triton_available

    if x.is_cuda:
        return triton_available() and not interpret() and kgemm.DEQUANT_CUBLAS and GROUPS_ON_CUDA
    return FORCE_INTERPRETED and interpret() and x.device.type == "cpu"


def pair(
    t: torch.Tensor, spec: QuantSpec, spec_t: QuantSpec, values: tuple[bool, bool]
) -> tuple[QTensor | torch.Tensor, QTensor | torch.Tensor]:
    """t's pair with the `values` sides as BF16 values (lowbit.kernels.pair_quantize)."""
    from lowbit.kernels.pair_quantize import quantize_pair_values

    return quantize_pair_values(t, spec, spec_t, values)


def dequantized(q: QTensor) -> torch.Tensor:
    """A saved operand's codes as its exact BF16 values (lowbit.kernels.dequant)."""
    from lowbit.kernels.dequant import dequantize_bf16
    from lowbit.kernels.gemm import _elem, _smode

    return dequantize_bf16(q, _elem(q), *_smode(q))


def matmul(
    a16: torch.Tensor, b16: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """a16 · b16^T (+ bias) with fp32 accumulation: on CUDA the cuBLAS call the codes path makes
    after dequantizing (lowbit.kernels.gemm.bf16_gemm, no tensor scales), so the same bits."""
    from lowbit.kernels.dequant import scale_output
    from lowbit.kernels.gemm import bf16_gemm

    if a16.is_cuda:
        return bf16_gemm(a16, b16, [], bias, out_dtype)
    # The interpreter's tests: fp32 products of exact bf16 values.
    return scale_output(a16.float() @ b16.float().t(), [], bias, out_dtype)
