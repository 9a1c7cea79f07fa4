"""Blockwise (random) Walsh–Hadamard rotation along the last axis.

R = blockdiag(D·H_b/√b, ..., D·H_b/√b), with H_b the Sylvester Hadamard matrix of size b (a power
of two) and D = diag(signs) an optional ±1 diagonal. R is orthonormal, so rotating both operands
of a GEMM along its reduction axis leaves the product unchanged — (A R)(B R)^T = A B^T — while
spreading an outlier over b elements, which shrinks the amax a block scale has to cover.

The product x·H is computed as a fast Walsh–Hadamard transform in fp32 in one fixed order, so a
kernel that repeats it gets the same bits (the fused rotate-and-quantize kernel does,
lowbit/kernels/_hadamard_triton.py): stage s = 0, 1, ..., log2(b) - 1 pairs element j with j + 2^s
inside each run of 2^(s+1) (j's bit s clear) and writes (a + b, a - b) back to (j, j + 2^s); the
result is then multiplied by the fp32 constant 1/√b. This is x·H_b for the Sylvester H_b
(H_2n = [[H_n, H_n], [H_n, -H_n]]) with b·log2(b) adds instead of a b×b matmul whose summation
order is the BLAS library's.

Random signs come from the same counter hash as stochastic rounding (rounding.py): sign i is
1 - 2·(lowbias32(i + seed·0x9E3779B9) & 1), so a Triton kernel rebuilds D from the seed alone.
Recipes re-draw the seed on every call ("signs redrawn per step"); both operands of one GEMM must
use the same seed.
"""

from __future__ import annotations

import functools

import torch

from lowbit.quant.formats import cached_constant
from lowbit.quant.rounding import hash_bits


@functools.lru_cache(maxsize=64)
def _hadamard(n: int, device: str) -> torch.Tensor:
    # Cached per device so a GPU run does not copy it from the host on every GEMM.
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h * n**-0.5).to(device)


def hadamard_matrix(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The n×n orthonormal Sylvester Hadamard matrix H/√n (fp32); n must be a power of two."""
    _check_block(n)
    return cached_constant(_hadamard, n, str(torch.device(device or "cpu")))


def random_signs(block: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """±1 (fp32) for the random Hadamard diagonal, from the counter hash of (seed, i)."""
    bit = hash_bits(seed, block, device) & 1
    return (1 - 2 * bit).to(torch.float32)


def _check(x: torch.Tensor, block: int, signs: torch.Tensor | None) -> None:
    if x.shape[-1] % block:
        raise ValueError(
            f"hadamard_rotate: last dim {x.shape[-1]} is not a multiple of block={block}; "
            "pad it or pick a block that divides it"
        )
    if signs is not None and signs.shape != (block,):
        raise ValueError(f"signs must have shape ({block},), got {tuple(signs.shape)}")


def _check_block(block: int) -> None:
    if block <= 0 or block & (block - 1):
        raise ValueError(f"Hadamard block size must be a power of two, got {block}")


def _fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 x·H_b/√b on each run of `block` along the last axis, in the stage order of the
    module docstring (the order the Triton kernel repeats)."""
    shape = x.shape
    h = 1
    while h < block:
        pairs = x.reshape(-1, 2, h)  # runs of 2h: (first half, second half)
        a, b = pairs[:, 0], pairs[:, 1]
        x = torch.stack((a + b, a - b), 1)
        h *= 2
    scale = torch.tensor(block**-0.5, dtype=torch.float32, device=x.device)
    return (x * scale).reshape(shape)


def hadamard_rotate(x: torch.Tensor, block: int = 32, signs: torch.Tensor | None = None) -> torch.Tensor:
    """x·R along the last axis (R as in the module docstring); computed in fp32, returned in x.dtype."""
    _check_block(block)
    _check(x, block, signs)
    xb = x.float()
    if signs is not None:
        xb = (xb.unflatten(-1, (-1, block)) * signs.to(xb.device, torch.float32)).flatten(-2)
    return _fwht(xb.contiguous(), block).to(x.dtype)


def inverse_hadamard_rotate(
    y: torch.Tensor, block: int = 32, signs: torch.Tensor | None = None
) -> torch.Tensor:
    """y·R^T, the inverse of hadamard_rotate (H is symmetric, so R^T = H·D/√b)."""
    _check_block(block)
    _check(y, block, signs)
    xb = _fwht(y.float().contiguous(), block).unflatten(-1, (-1, block))
    if signs is not None:
        xb = xb * signs.to(xb.device, torch.float32)
    return xb.flatten(-2).to(y.dtype)
