"""Gradient clipping by global norm, folded into the optimizer's step where the optimizer can take it.

`torch.nn.utils.clip_grad_norm_` reads every gradient once for the norm, then reads and writes every
gradient again to scale it — on a 1B-parameter model in fp32 that second pass moves 8.3 GB, about
3 ms on an H100, every step. torch's fused Adam/AdamW kernel already divides each gradient by an
optional `grad_scale` tensor (the hook GradScaler uses), inside the pass it makes anyway; handing it
the clipping factor there removes the second pass. torch's kernel writes the divided gradients
back, so half of that pass's traffic remains: clip and step on 1.04B fp32 parameters went from
15.97 to 14.45 ms (H100, docs/BENCHMARKS.md, twenty-sixth pass). The result equals
clip-then-step up to one rounding of the factor (g / s against g · (1/s)); the norm stays on the
device, so nothing waits.
"""

from __future__ import annotations

import torch


def folds_clipping(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` can apply the clipping factor itself: torch's Adam or AdamW with
    `fused=True` in every group, and no GradScaler already using the same hook."""
    return (
        isinstance(optimizer, torch.optim.Adam)
        and all(bool(g.get("fused")) for g in optimizer.param_groups)
        and getattr(optimizer, "grad_scale", None) is None
        and getattr(optimizer, "found_inf", None) is None
    )


def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor | None:
    """What a fused step divides the gradients by to clip them to `max_norm` (None: no clipping,
    `max_norm` not positive or inf): 1 / clip_grad_norm_'s factor, fp32, on the device."""
    if not 0 < max_norm < float("inf"):
        return None
    return torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)


def clip_and_step(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float
) -> torch.Tensor:
    """Scale the gradients of `params` so their global L2 norm is at most `max_norm` (no clipping when
    `max_norm` is not positive or is inf), take `optimizer.step()`, and return the norm before clipping
    as a device tensor. Same factor as `clip_grad_norm_`: max_norm / (norm + 1e-6), capped at 1."""
    grads = [p.grad for p in params if p.grad is not None]
    clip = 0 < max_norm < float("inf")
    if not folds_clipping(optimizer):
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        optimizer.step()
        return norm
    norm = torch.nn.utils.get_total_norm(grads)
    if not clip:
        optimizer.step()
        return norm
    optimizer.grad_scale = clip_factor(norm, max_norm)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
    return norm
