"""QuantSpec and quantize(): one tensor -> QTensor (groups, scales, rounding, storage).

A QuantSpec says how one GEMM operand is quantized:
    fmt       element format (formats.py)
    block     "tensor"      one scale for the whole tensor
              "row"         one scale per slice along `axis` (per-row for axis=-1 of a matrix)
              16/32/64/128  1-D blocks of that many consecutive elements along `axis` (the GEMM's
                            reduction axis); a short last block is padded with zeros for its amax
              (br, bc)      2-D tiles of a matrix (weights), e.g. (128, 128) or (16, 16); a tile
                            quantization of W is also a tile quantization of W^T
    scale     fp32 | e8m0 | e8m0_up | e4m3 (scaling.py)
    rounding  nearest (half to even) | stochastic (rounding.py)

Algorithm: move `axis` last -> group amax -> scales (scaling.py) -> y = x / scale (IEEE division;
exact for power-of-two scales) -> round_to_format(y) -> encode (qtensor.py). Stochastic noise is
`uniform_noise(seed, shape)` of the moved tensor, so element i uses hash(seed, i).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.quant.formats import ElementFormat, get_format
from lowbit.quant.qtensor import QTensor, encode, expand_scale
from lowbit.quant.rounding import check_rounding, uniform_noise
from lowbit.quant.rounding import round_to_format as _round
from lowbit.quant.scaling import check_scale_format, compute_scale

BLOCK_CHOICES = "'tensor', 'row', a positive int (1-D block) or a pair (2-D tile)"


@dataclass(frozen=True)
class QuantSpec:
    fmt: str = "fp8_e4m3"
    block: int | tuple[int, int] | str = "tensor"
    scale: str = "fp32"
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        fmt = get_format(self.fmt)
        block = self.block
        if isinstance(block, list | tuple):
            for b in block:
                if isinstance(b, bool) or not isinstance(b, numbers.Integral):
                    raise ValueError(
                        f"invalid block={self.block!r}: tile size {b!r} is not an integer; "
                        f"valid choices: {BLOCK_CHOICES}"
                    )
            block = tuple(int(b) for b in block)
            object.__setattr__(self, "block", block)
        ok = (
            block in ("tensor", "row")
            or (isinstance(block, int) and not isinstance(block, bool) and block > 0)
            or (isinstance(block, tuple) and len(block) == 2 and min(block) > 0)
        )
        if not ok:
            raise ValueError(f"invalid block={self.block!r}; valid choices: {BLOCK_CHOICES}")
        check_scale_format(self.scale, fmt)
        check_rounding(self.rounding)

    @property
    def format(self) -> ElementFormat:
        return get_format(self.fmt)

    def with_rounding(self, rounding: str) -> QuantSpec:
        return QuantSpec(self.fmt, self.block, self.scale, rounding)


def group_amax(x: torch.Tensor, block: int | tuple[int, int] | str) -> torch.Tensor:
    """Per-group amax of x (quantized axis last); NaN and Inf propagate into their group's amax."""
    a = x.abs()
    if block == "tensor":
        return _nan_amax(a.reshape(-1))
    if block == "row":
        return _nan_amax(a)
    if isinstance(block, int):
        k = a.shape[-1]
        pad = (-k) % block
        a = torch.nn.functional.pad(a, (0, pad))
        return _nan_amax(a.unflatten(-1, (-1, block)))
    if a.dim() != 2:
        raise ValueError(f"2-D block {block} needs a matrix, got a tensor of shape {tuple(x.shape)}")
    br, bc = block
    a = torch.nn.functional.pad(a, (0, (-a.shape[1]) % bc, 0, (-a.shape[0]) % br))
    tiles = a.unflatten(1, (-1, bc)).unflatten(0, (-1, br))  # (R/br, br, C/bc, bc)
    return _nan_amax(tiles.transpose(1, 2).flatten(2))


def _nan_amax(a: torch.Tensor) -> torch.Tensor:
    # amax already propagates NaN; this keeps empty tensors (numel 0) from raising.
    if a.numel() == 0:
        return torch.zeros(a.shape[:-1], dtype=torch.float32, device=a.device)
    return a.float().amax(dim=-1)


def check_quantize_args(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor | None = None) -> None:
    """The argument checks of `quantize`, shared with the fused kernel (lowbit.kernels.quantize)
    so that both reject the same calls with the same errors."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"quantize needs a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError("quantize needs a tensor with at least one dimension (the quantized axis)")
    if amax is not None and spec.block != "tensor":
        raise ValueError(f"an amax override (delayed scaling) needs block='tensor', got {spec.block!r}")


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    axis: int = -1,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    amax: torch.Tensor | None = None,
) -> QTensor:
    """Quantize `x` along `axis` (the GEMM reduction axis) as `spec` says.

    Stochastic rounding takes its noise from `seed`, or from a seed drawn from `generator` (or the
    global torch generator when neither is given). `amax` overrides the tensor's own amax for
    block='tensor' (delayed scaling: the caller passes the max of its amax history).
    """
    check_quantize_args(x, spec, amax)
    fmt = spec.format
    axis = axis % x.dim()
    xf = x.detach().float().movedim(axis, -1).contiguous()
    g_amax = group_amax(xf, spec.block) if amax is None else amax.float().reshape(())
    tensor_amax = None
    if spec.scale == "e4m3":
        tensor_amax = _nan_amax(xf.abs().reshape(-1))
    scale, tensor_scale = compute_scale(g_amax, fmt, spec.scale, tensor_amax)
    eff = scale if tensor_scale is None else scale * tensor_scale
    eff_x = expand_scale(eff, spec.block, xf.shape)
    zero = eff_x == 0  # e4m3 block scale underflowed: the block is zero
    y = xf / torch.where(zero, torch.ones_like(eff_x), eff_x)
    y = torch.where(zero, torch.zeros_like(y), y)
    noise = None
    if spec.rounding == "stochastic":
        if seed is None:
            seed = draw_seed(generator)
        noise = uniform_noise(seed, xf.shape, xf.device)
    q = _round(y, fmt, spec.rounding, noise=noise)
    data, packed = encode(q, fmt)
    return QTensor(data, scale, fmt, spec.block, xf.shape, axis, x.dtype, packed, tensor_scale)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A 31-bit seed from `generator` (reproducible when the generator is seeded)."""
    return int(torch.randint(0, 2**31 - 1, (), generator=generator))


def fake_quantize(x: torch.Tensor, spec: QuantSpec, axis: int = -1, **kwargs: Any) -> torch.Tensor:
    """quantize(...).dequantize(): x as the low-precision GEMM sees it, in x's layout and dtype."""
    return quantize(x, spec, axis, **kwargs).dequantize()
