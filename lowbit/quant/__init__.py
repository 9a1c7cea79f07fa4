"""Numerics source of truth, pure PyTorch: formats, scaling, rounding, Hadamard, recipes, QTensor.

from lowbit.quant import QuantSpec, quantize, get_recipe, hadamard_rotate
q = quantize(x, QuantSpec(fmt="fp4_e2m1", block=32, scale="e8m0", rounding="nearest"), axis=-1)
x_hat = q.dequantize()
"""

from lowbit.quant.formats import FORMATS, ElementFormat, get_format
from lowbit.quant.gemm import (
    Operand,
    gemm_operands,
    prepare_operand,
    quantized_gemm,
    register_gemm_backend,
    register_quantize_backend,
    register_rotation_backend,
)
from lowbit.quant.hadamard import hadamard_matrix, hadamard_rotate, inverse_hadamard_rotate, random_signs
from lowbit.quant.qtensor import QTensor
from lowbit.quant.quantize import QuantSpec, draw_seed, fake_quantize, quantize
from lowbit.quant.recipes import GEMMS, RECIPES, GemmSpec, Recipe, get_recipe
from lowbit.quant.rounding import hash_bits, lowbias32, round_to_format, uniform_noise

__all__ = [
    "FORMATS",
    "GEMMS",
    "RECIPES",
    "ElementFormat",
    "GemmSpec",
    "Operand",
    "QTensor",
    "QuantSpec",
    "Recipe",
    "draw_seed",
    "fake_quantize",
    "gemm_operands",
    "get_format",
    "get_recipe",
    "hadamard_matrix",
    "hadamard_rotate",
    "hash_bits",
    "inverse_hadamard_rotate",
    "lowbias32",
    "prepare_operand",
    "quantize",
    "quantized_gemm",
    "random_signs",
    "register_gemm_backend",
    "register_quantize_backend",
    "register_rotation_backend",
    "round_to_format",
    "uniform_noise",
]
