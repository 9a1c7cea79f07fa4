"""Optimizers: AdamW variants with low-bit states, BF16 without master weights, Shampoo."""

from lowbit.optim.factory import build_optimizer

__all__ = ["build_optimizer"]
