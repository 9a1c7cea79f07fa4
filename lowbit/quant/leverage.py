"""Leverage-score sampling of a GEMM's reduction terms (int4_hq's wgrad; Xi et al. 2023).

A·B^T = sum over parts p and columns k of A_p[:, k] B[:, k]^T. Term (p, k) is kept with
probability prob[p, k] and, when kept, scaled by 1/prob[p, k]: the expectation is the full
product. The probabilities follow the term's weight ||A_p[:, k]||·||B[:, k]|| (its Frobenius
norm), with sum prob = K (water-filling: the largest weights saturate at 1 and the rest share what
is left), so about half of a bit-split A's 2K terms are kept.

Each probability is then snapped to a power of two, the nearest in log2 (so within a factor √2 of
the proportional choice), and at least 2^-MAX_GAIN_LOG2. The estimator stays unbiased, since a kept
term is scaled by the 1/prob it was drawn with, and the gain is an exact power of two: an int4
value (|q| <= 7) times its gain is exact in fp8 e5m2 (7 · 2^13 = 57344, its largest finite value),
so lowbit.kernels runs the sampled GEMM on fp8 tensor cores with exact products and fp32
accumulation, as the fp32 emulation here computes it (up to the order of the fp32 sums).

    leverage_gains(norms_a, norms_b, seed)    (parts, K) gains: 0 (dropped) or 2^j, 0 <= j <= 13
    leverage_sampled(parts, bh, seed)         sum_p A_p * gains[p], the emulation's sampled A
Backends: register_leverage_backend(fn, device_type) plugs in a kernel that computes the sampled
product from the quantized operands (lowbit.kernels.leverage on CUDA); lowbit.quant.gemm tries it
before the fp32 emulation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.quant.rounding import DeviceSeed, exp2i, uniform_noise

# A GEMM call's seed: an int, a 0-d int64 tensor, or an entry of a traced layer's seed table.
Seed = int | torch.Tensor | DeviceSeed

MAX_GAIN_LOG2 = 13  # 1/prob <= 2^13: 7 * 2^13 is fp8 e5m2's largest finite value
_SQRT2 = 1.4142135381698608  # fp32(√2): a probability m·2^e with m >= √2 rounds up to 2^(e+1)
_WATER_FILL_STEPS = 8  # fixed, so every device runs the same iterations


def leverage_gains(norms_a: torch.Tensor, norms_b: torch.Tensor, seed: Seed) -> torch.Tensor:
    """The scale of each term (p, k) in the sampled product: 0 where dropped, else 1/prob[p, k].

    `norms_a` (parts, K) holds ||A_p[:, k]||, `norms_b` (K,) ||B[:, k]||; `seed` draws the uniform
    noise (lowbit.quant.rounding.uniform_noise, one value per term, row-major)."""
    w = norms_a.float() * norms_b.float()
    target = float(w.shape[-1])
    c = target / w.sum().clamp_min(1e-30)
    for _ in range(_WATER_FILL_STEPS):
        saturated = c * w >= 1
        rest = w.masked_fill(saturated, 0).sum()
        c = torch.where(rest > 0, (target - saturated.sum()) / rest.clamp_min(1e-30), c)
    prob = (c * w).clamp(max=1.0)
    # prob = f·2^e with f in [1, 2) (fp32 bits; exact on every device): 2^e, or 2^(e+1) if f >= √2.
    bits = prob.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127
    f = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    e = (e + (f >= _SQRT2).to(torch.int32)).clamp(-MAX_GAIN_LOG2, 0)
    u = uniform_noise(seed, tuple(prob.shape), prob.device)
    # A zero-weight term (an all-zero column) is never kept; a NaN weight never either (u < NaN is
    # false): its NaN reaches the product through the NaN scale of its row in A (0 x NaN).
    keep = (prob > 0) & (u < exp2i(e))
    return torch.where(keep, exp2i(-e), torch.zeros_like(prob))


def leverage_sampled(parts: list[torch.Tensor], bh: torch.Tensor, seed: Seed) -> torch.Tensor:
    """sum_p parts[p] * gains[p] (broadcast along rows): A with its sampled terms, for A @ bh.T.

    `parts` are A's dequantized terms (rows × K, fp32), `bh` is B dequantized (cols × K)."""
    gains = leverage_gains(torch.stack([p.norm(dim=0) for p in parts]), bh.norm(dim=0), seed)
    out = parts[0] * gains[0]
    for i in range(1, len(parts)):
        out = out + parts[i] * gains[i]
    return out


# fn(a, b, seed, out_dtype, bias) -> the sampled A·B^T (+ bias) or None to decline; `a` and `b` are
# lowbit.quant.gemm Operands and `seed` is already the sampling's own (derive_seed(seed, 4)).
LeverageBackend = Callable[..., "torch.Tensor | None"]
_BACKENDS: dict[str, LeverageBackend] = {}


def register_leverage_backend(fn: LeverageBackend, device_type: str = "cuda") -> None:
    """Compute leverage-sampled GEMMs of operands on `device_type` with `fn` (same gains as
    leverage_gains for the same norms and seed; it returns None for operands it does not take)."""
    _BACKENDS[device_type] = fn


def leverage_backend(device_type: str) -> LeverageBackend | None:
    return _BACKENDS.get(device_type)
