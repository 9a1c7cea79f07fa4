"""Fused quantize kernel: one read of a BF16/FP32 matrix -> quantized elements + scales (a QTensor).

`quantize(x, spec, axis, seed=..., amax=...)` is a drop-in for `lowbit.quant.quantize` and returns
the same QTensor bit for bit (same seed for stochastic rounding). Every step repeats the reference
(lowbit/quant/{scaling,rounding,qtensor}.py) literally in fp32/integer arithmetic:
    group amax -> scale (fp32 | e8m0 | e8m0_up | e4m3 + fp32 tensor scale) -> y = x / scale (IEEE
    division, `tl.div_rn`) -> round (saturate, exponent from the fp32 bits, power-of-two scaling,
    +2^23 RNE or floor + hash-noise SR) -> storage bits built from the exact grid value.
No float downcast is ever used to round: the interpreter rounds `.to(tl.float8e4nv)` wrongly and
Hopper has no FP4 cast, so fp8 bytes and fp4/int4 nibbles are assembled from integer fields.

Granularities (the QuantSpec `block`): 1-D blocks along K (power of two, 2..256), "row" (a row
of up to 4096 elements is read once; a longer one is read twice in pieces, the second read mostly
from L2), "tensor" (amax from one
read on the amax kernel of pair_quantize.py, or the delayed-scaling override; no host sync) and
2-D tiles (powers of two). The input may be any strided 2-D view. An X^T view can be read in
place (TRANSPOSED_READ), but that measured slow on the H100, so by default such views are copied
row-major first (lowbit.kernels.transpose, a tiled copy; torch's was slower); QuantLinear gets
X^T from pair_quantize.py where a pair kernel takes its specs (X and X^T in one pass).
Ragged shapes are masked; padding never enters an amax (zeros, as in the reference).

What falls back to the reference (never a wrong answer): NF4 (QLoRA's codebook path), 1-D blocks
that are not a power of two, N-D inputs whose axis is not last (they are moved first), tensors on
a device where Triton cannot run. `supports(x, spec)` says which path a call takes.
"""

from __future__ import annotations

import os

import torch

from lowbit.env_flags import env_flag
from lowbit.quant.formats import ElementFormat
from lowbit.quant.qtensor import QTensor
from lowbit.quant.quantize import QuantSpec, check_quantize_args, draw_seed
from lowbit.quant.quantize import quantize as reference_quantize
from lowbit.quant.rounding import seed_offset

_ENC = {"fp8_e4m3": 0, "fp8_e5m2": 1, "fp6_e3m2": 0, "fp6_e2m3": 0, "int8": 2, "fp4_e2m1": 3, "int4": 4}
_SCALE = {"fp32": 0, "e8m0": 1, "e8m0_up": 2, "e4m3": 3}
_G1D, _GROW, _GTENSOR, _GTILE = 0, 1, 2, 3


# Read X^T views in place (tiles loaded along the contiguous axis and transposed in registers).
# Off: on the H100 (Triton 3.6) that path measured far slower than torch's transpose copy followed
# by the row-major kernel, so a non-K-contiguous input is copied first (one extra read + write).
TRANSPOSED_READ = False
# Rotated (Hadamard) views not contiguous along K (wgrad's X^T and dY^T, dgrad's W^T) read in
# place by plain strided tile loads into the fused rotate-and-quantize pass (no tl.trans), instead
# of the rotation kernel writing them in fp32 for the quantize kernel to read. (Such views with
# 1-D groups now go to the column quantizer first, lowbit.kernels.column_quantize.) Opt-in
# (LOWBIT_ROTATED_STRIDED=1): on the H100 (docs/BENCHMARKS.md, run 86-87) it was 1.14x the two
# kernels for MXFP4 at 8192 x 14336 but mixed for NVFP4 (0.89-1.13x), and a 1b model trained
# at the same speed either way (mxfp4 48,251 against 48,240 tokens/s).
ROTATED_STRIDED_READ = env_flag("LOWBIT_ROTATED_STRIDED", False)
# 2-D tile scaling (NVFP4's 16 x 16 weight blocks) of an X^T view (W^T for dgrad, rows contiguous)
# read in place instead of after a transposed copy of the fp32 weight. On the H100 (docs/
# BENCHMARKS.md, run 197, benchmarks/tile_transposed_read.py) that made W^T's quantize 3.2-3.6x
# faster on 2048 x 2048 to 14336 x 4096 weights (1.9x at 512 x 2048), with the same bits.
TILE_TRANSPOSED_READ = True


def interpret() -> bool:
    """True when TRITON_INTERPRET=1: kernels then run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """Whether triton imports (lowbit itself imports and runs without it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def triton_runs_on(x: torch.Tensor) -> bool:
    """Whether Triton kernels run on x's device (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    return triton_available() and (x.is_cuda or (interpret() and x.device.type == "cpu"))


def supports(x: torch.Tensor, spec: QuantSpec) -> bool:
    """True when the Triton kernel handles this call (else `quantize` runs the reference)."""
    if not triton_runs_on(x):
        return False
    if spec.fmt not in _ENC or not x.is_floating_point() or x.numel() == 0:
        return False
    b = spec.block
    if isinstance(b, int) and not (_pow2(b) and 2 <= b <= 256):
        return False
    if isinstance(b, tuple) and not (_pow2(b[0]) and _pow2(b[1]) and b[0] * b[1] <= 65536 and b[1] >= 2):
        return False
    return True


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    axis: int = -1,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    amax: torch.Tensor | None = None,
) -> QTensor:
    """`lowbit.quant.quantize` on the Triton kernel (same arguments, same QTensor bit for bit)."""
    check_quantize_args(x, spec, amax)
    if not supports(x, spec):
        return reference_quantize(x, spec, axis, seed=seed, generator=generator, amax=amax)
    if spec.rounding == "stochastic" and seed is None:
        seed = draw_seed(generator)
    axis = axis % x.dim()
    xm = x.detach().movedim(axis, -1)
    if isinstance(spec.block, tuple) and xm.dim() != 2:
        raise ValueError(f"2-D block {spec.block} needs a matrix, got a tensor of shape {tuple(x.shape)}")
    shape = xm.shape
    x2 = xm if xm.dim() == 2 else xm.reshape(-1, shape[-1])  # a view when the axis was last
    data, scale, tscale, packed = quantize_2d(x2, spec, seed=0 if seed is None else seed, amax=amax)
    data = data.reshape(*shape[:-1], data.shape[-1])
    if isinstance(spec.block, int):
        scale = scale.reshape(*shape[:-1], scale.shape[-1])
    elif spec.block == "row":
        scale = scale.reshape(shape[:-1])
    return QTensor(data, scale, spec.format, spec.block, shape, axis, x.dtype, packed, tscale)


def _tensor_amax(x2: torch.Tensor) -> torch.Tensor:
    # One read on the Triton amax kernel; NaN propagates and Inf gives Inf, as the reference's amax.
    from lowbit.kernels.pair_quantize import tensor_amax

    return tensor_amax(x2)


def _rotated_amax(x2: torch.Tensor, block: int, sign_off: int | torch.Tensor | None) -> torch.Tensor:
    from lowbit.kernels._hadamard_triton import launch_rotated_amax

    bits = torch.zeros(1, dtype=torch.int32, device=x2.device)
    launch_rotated_amax(x2, bits, block, sign_off)
    return bits.view(torch.float32)


def quantize_2d(
    x2: torch.Tensor, spec: QuantSpec, seed: int | torch.Tensor = 0, amax: torch.Tensor | None = None,
    hadamard: int = 1, sign_off: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """Quantize a (strided) R × K matrix along K: (data, scales, tensor scale or None, packed).
    `hadamard` > 1 quantizes x2·R instead (lowbit.kernels.hadamard checks the shapes)."""
    from lowbit.kernels._quantize_triton import launch
    from lowbit.kernels.transpose import row_major

    fmt: ElementFormat = spec.format
    r, k = x2.shape
    dev = x2.device
    if x2.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        x2 = x2.float()
    tile_t = TILE_TRANSPOSED_READ and isinstance(spec.block, tuple) and x2.stride(0) == 1
    in_place = TRANSPOSED_READ or tile_t
    if x2.stride(1) != 1 and not in_place and not (hadamard > 1 and ROTATED_STRIDED_READ):
        x2 = row_major(x2)
    enc = _ENC[fmt.name]
    packed = enc in (3, 4) and k % 2 == 0
    dcols = k // 2 if packed else k
    ddtype = {0: torch.float8_e4m3fn, 1: torch.float8_e5m2, 2: torch.int8}.get(enc, torch.uint8)
    data = torch.empty((r, dcols), dtype=torch.uint8, device=dev)
    b = spec.block
    # Tensor-wise group amax (maybe the delayed-scaling override) and NVFP4's tensor amax (always
    # the data's own, as in the reference).
    own = None
    if spec.scale == "e4m3" or (b == "tensor" and amax is None):
        own = _tensor_amax(x2) if hadamard == 1 else _rotated_amax(x2, hadamard, sign_off)
    g_amax = None
    if b == "tensor":
        g_amax = amax.float().reshape(1).to(dev) if amax is not None else own
    t_amax = own if spec.scale == "e4m3" else None
    # Group scales are stored group-major (a transposed view of the (rows, groups) shape): the GEMM
    # then reads one K-group's scales for a tile of rows contiguously.
    if isinstance(b, int):
        gmode, scale = _G1D, torch.empty((-(-k // b), r), dtype=torch.float32, device=dev).t()
    elif b == "row":
        gmode, scale = _GROW, torch.empty((r, 1), dtype=torch.float32, device=dev)
    elif b == "tensor":
        gmode, scale = _GTENSOR, torch.empty((1, 1), dtype=torch.float32, device=dev)
    else:
        gmode = _GTILE
        scale = torch.empty((-(-k // b[1]), -(-r // b[0])), dtype=torch.float32, device=dev).t()
    tscale = torch.empty((1,), dtype=torch.float32, device=dev) if spec.scale == "e4m3" else None
    launch(
        x2, data, scale, tscale, g_amax, t_amax, fmt, enc, packed, _SCALE[spec.scale], gmode, b,
        spec.rounding == "stochastic", seed_offset(seed), hadamard, sign_off, own_amax=amax is None,
    )
    data = data.view(ddtype) if ddtype != torch.uint8 else data
    if gmode == _GROW:
        scale = scale.reshape(r)
    elif gmode == _GTENSOR:
        scale = scale.reshape(())
    return data, scale, (tscale.reshape(()) if tscale is not None else None), packed
