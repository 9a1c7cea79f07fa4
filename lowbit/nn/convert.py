"""Placeholder until the numerics core lands: only the bf16 (no quantization) recipe is known."""

from __future__ import annotations

from torch import nn

from lowbit.quant.config import QuantConfig


def apply_quant_config(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    if cfg.recipe != "bf16":
        raise ValueError(f"unknown quant.recipe={cfg.recipe!r}; valid choices: bf16")
    return model
