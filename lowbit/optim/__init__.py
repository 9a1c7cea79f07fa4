"""Optimizers: AdamW variants with low-bit states, BF16 without master weights, Shampoo."""

from lowbit.optim.adamw import AdamW4bit, AdamW8bit, BF16AdamW, LowBitAdamW
from lowbit.optim.config import OptimConfig, OptimName, validate_optim_config, wants_bf16_params
from lowbit.optim.factory import build_optimizer

__all__ = [
    "AdamW4bit",
    "AdamW8bit",
    "BF16AdamW",
    "LowBitAdamW",
    "OptimConfig",
    "OptimName",
    "build_optimizer",
    "validate_optim_config",
    "wants_bf16_params",
]
