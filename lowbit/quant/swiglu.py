"""SwiGLU's product and its gradients in fp32: the values the fused fp8 feed-forward quantizes.

The fused feed-forward (lowbit.nn.quant_feed_forward) never stores SwiGLU's output h = silu(g) * u
or its gradients dg, du in bf16: they are quantized to fp8 straight from fp32, inside the kernel
that computes them (lowbit.kernels.swiglu_pair). These functions are that computation in plain
PyTorch, the reference the kernels are tested against: the same operations in the same order.
Exponentials and divisions on a GPU differ from the CPU's in the last fp32 bits, so the two agree
to fp32 rounding, not bit for bit (a value on an fp8 rounding boundary may round either way).
"""

from __future__ import annotations

import torch


def _sigmoid(g: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-g))


def swiglu_fp32(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h = silu(g) * u = g * sigmoid(g) * u, computed in fp32 from g and u of any float dtype."""
    gf, uf = g.float(), u.float()
    return gf * _sigmoid(gf) * uf


def swiglu_grad_fp32(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) of h = silu(g) * u for the upstream gradient dh, in fp32.

    du = dh * silu(g); dg = dh * u * silu'(g), where silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g).
    """
    dhf, gf, uf = dh.float(), g.float(), u.float()
    s = _sigmoid(gf)
    du = dhf * (gf * s)
    dg = dhf * uf * (s * (1.0 + gf * (1.0 - s)))
    return dg, du
