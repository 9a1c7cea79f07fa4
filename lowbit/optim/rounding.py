"""Writing an fp32 update into a BF16 parameter: nearest, stochastic, or Kahan-compensated.

Pure-BF16 training without an fp32 master copy loses every update smaller than half a BF16 ulp
when rounding to nearest (Zamirai et al.). Stochastic rounding keeps them in expectation; Kahan
summation keeps the lost low bits in a BF16 compensation buffer and adds them back next step.

All rounding is done in fp32 bit arithmetic so the final cast to BF16 is exact: the Triton kernels
do the same integer operations and therefore produce the same bits on CPU and GPU. The random bits
for stochastic rounding come from a counter-based hash of (seed, element index), so no noise tensor
is stored and a resumed run draws exactly the same bits.
"""

from __future__ import annotations

import torch

from lowbit.quant.rounding import GOLDEN32, MASK32, hash_bits, lowbias32, lowbias32_int

# The hash and its seed mixing are lowbit.quant.rounding's (one definition for quantizers,
# optimizers and kernels); re-exported here for the optimizer code and its kernels.
__all__ = [
    "GOLDEN32",
    "MASK32",
    "ROUNDING_MODES",
    "lowbias32",
    "lowbias32_int",
    "random_bits",
    "round_bf16_nearest",
    "round_bf16_stochastic",
    "step_seed",
    "write_param_",
]


def step_seed(base_seed: int, step: int, tensor_index: int) -> int:
    """A 32-bit seed for one tensor at one step: distinct streams per tensor and per step."""
    return lowbias32_int(base_seed ^ lowbias32_int(step * 0x85EBCA6B + tensor_index * GOLDEN32))


def random_bits(seed: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint32 values (in int64) for elements 0..numel-1: lowbias32(index + seed * golden)."""
    return hash_bits(seed, numel, device)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32).to(torch.int64) & MASK32


def _from_bits(u: torch.Tensor) -> torch.Tensor:
    u = u & MASK32
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32).view(torch.float32)


def round_bf16_nearest(x: torch.Tensor) -> torch.Tensor:
    """fp32 → fp32 holding the nearest BF16 value (ties to even). NaN/Inf are passed through."""
    u = _bits(x)
    r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return torch.where(torch.isfinite(x), _from_bits(r), x)


def round_bf16_stochastic(x: torch.Tensor, seed: int) -> torch.Tensor:
    """fp32 → fp32 holding a BF16 value, rounded up with probability equal to the dropped fraction."""
    u = _bits(x)
    noise = random_bits(seed, x.numel(), x.device).view(x.shape) & 0xFFFF
    r = (u + noise) & 0xFFFF0000
    return torch.where(torch.isfinite(x), _from_bits(r), x)


ROUNDING_MODES = ("nearest", "stochastic", "kahan")


def write_param_(
    p: torch.Tensor,
    new_value: torch.Tensor,
    rounding: str,
    seed: int,
    comp: torch.Tensor | None = None,
    old_value: torch.Tensor | None = None,
) -> None:
    """Store the fp32 `new_value` into parameter `p` (fp32 or BF16).

    For BF16 `p`: `nearest` rounds to nearest even, `stochastic` rounds stochastically with the hash
    stream of `seed`, `kahan` adds the BF16 compensation buffer `comp` (updated in place) to the step
    `new_value - old_value` before rounding. fp32 parameters are written as they are.
    """
    if p.dtype == torch.float32:
        p.copy_(new_value)
        return
    if p.dtype != torch.bfloat16:
        raise TypeError(f"parameters must be float32 or bfloat16, got {p.dtype}")
    if rounding == "nearest":
        p.copy_(round_bf16_nearest(new_value))
    elif rounding == "stochastic":
        p.copy_(round_bf16_stochastic(new_value, seed))
    elif rounding == "kahan":
        if comp is None or old_value is None:
            raise ValueError("rounding='kahan' needs the BF16 compensation buffer `comp` and `old_value`")
        # y = step + carried error; s = p + y is rounded; the part rounding dropped is carried on.
        y = (new_value - old_value) + comp.float()
        s = old_value + y
        rounded = round_bf16_nearest(s)
        comp.copy_(round_bf16_nearest(s - rounded))
        p.copy_(rounded)
    else:
        raise ValueError(f"rounding={rounding!r}; valid choices: {', '.join(ROUNDING_MODES)}")
