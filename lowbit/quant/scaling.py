"""Scale factors: how a block's amax becomes the number every element of the block is divided by.

Scale formats (the `scale=` field of QuantSpec):
    fp32     s = amax / max_elem                                   (any element format)
    e8m0     s = 2^(floor(log2 amax) - emax_elem)                  OCP MX rule; float formats only.
             Values up to 2^(emax+1) - ulp of the block may exceed max_elem and saturate (by design
             of the spec: the largest elements of a block lose a little precision to saturation).
    e8m0_up  like e8m0, but the exponent is raised by one when amax / s > max_elem, so nothing in the
             block saturates (what stochastic rounding needs to stay unbiased; Tseng et al. get the
             same effect by pre-scaling by 3/4).
    e4m3     NVFP4: a per-tensor fp32 scale t = amax_tensor / (448 * max_elem) and per-block E4M3
             scales b = RNE_e4m3((amax_block / max_elem) / t); elements are divided by (b * t).
Exponents of e8m0 are clamped to the format's range [-127, 127].

Special blocks:
    amax == 0 (all-zero block): fp32 scale 1, e8m0 scale 2^-127, e4m3 block scale 0 -> elements 0.
    amax NaN or ±Inf (any non-finite element in the block): the scale is NaN (the E8M0 NaN code),
    so the whole block dequantizes to NaN. For per-tensor scaling that means the whole tensor: a
    non-finite value is never silently turned into a finite one.
"""

from __future__ import annotations

import torch

from lowbit.quant.formats import ElementFormat, get_format
from lowbit.quant.rounding import exp2i, round_to_format

SCALE_FORMATS = ("fp32", "e8m0", "e8m0_up", "e4m3")
E4M3_MAX = 448.0


def check_scale_format(scale: str, fmt: ElementFormat) -> None:
    """Raise ValueError unless `scale` is a scale format that `fmt` can use (names both)."""
    if scale not in SCALE_FORMATS:
        raise ValueError(f"unknown scale={scale!r}; valid choices: {', '.join(SCALE_FORMATS)}")
    if scale.startswith("e8m0") and fmt.kind != "float":
        raise ValueError(
            f"scale={scale!r} (OCP MX power-of-two) needs a float element format, got fmt={fmt.name!r}; "
            "use scale='fp32' for int/codebook formats"
        )


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for finite a > 0 from the fp32 exponent field (fp32 subnormals give -127)."""
    return ((a.float().view(torch.int32) >> 23) & 0xFF).to(torch.int32) - 127


def compute_scale(
    amax: torch.Tensor,
    fmt: str | ElementFormat,
    scale: str,
    tensor_amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block scales (fp32 values, shape of amax) and, for e4m3, the fp32 per-tensor scale."""
    fmt = get_format(fmt)
    check_scale_format(scale, fmt)
    amax = amax.float()
    bad = ~torch.isfinite(amax)
    # Divide by tensors, not Python floats: on CUDA `t / float` multiplies by the rounded
    # reciprocal, which differs from true division in the last bit for about half of the values
    # (e.g. amax / 448), so GPU and CPU scales would disagree.
    fmax = torch.full_like(amax, fmt.max)
    if scale == "fp32":
        s = amax / fmax
        s = torch.where(s == 0, torch.ones_like(s), s)
        return torch.where(bad, torch.full_like(s, float("nan")), s), None
    if scale in ("e8m0", "e8m0_up"):
        e = floor_log2(amax) - fmt.emax
        e = torch.where(amax == 0, torch.full_like(e, -127), e)
        e = torch.clamp(e, -127, 127)
        if scale == "e8m0_up":
            e = torch.where(amax / exp2i(e) > fmax, e + 1, e).clamp(max=127)
        s = exp2i(e)
        return torch.where(bad, torch.full_like(s, float("nan")), s), None
    # e4m3 block scales under an fp32 tensor scale (NVFP4).
    t_amax = amax.amax() if tensor_amax is None else tensor_amax.float()
    t = t_amax / torch.full_like(t_amax, E4M3_MAX * fmt.max)
    t = torch.where(t == 0, torch.ones_like(t), t)
    t = torch.where(torch.isfinite(t_amax), t, torch.full_like(t, float("nan")))  # no host sync
    b = round_to_format((amax / fmax) / t, "fp8_e4m3", "nearest")
    return torch.where(bad, torch.full_like(b, float("nan")), b), t


def encode_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 byte codes (biased exponent, 255 = NaN) of power-of-two fp32 scales."""
    code = (floor_log2(scale) + 127).clamp(0, 254)
    # 2^-127 is an fp32 subnormal: its exponent field reads 0, code 0, which is right.
    code = torch.where(torch.isnan(scale), torch.full_like(code, 255), code)
    return code.to(torch.uint8)


def decode_e8m0(code: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_e8m0`: fp32 2^(code - 127), NaN for code 255."""
    c = code.to(torch.int32)
    s = exp2i(c - 127)
    return torch.where(c == 255, torch.full_like(s, float("nan")), s)
