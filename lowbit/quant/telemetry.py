"""Placeholder until the numerics core lands: telemetry that records nothing."""

from __future__ import annotations

from torch import nn


class QuantTelemetry:
    def __init__(self, model: nn.Module, every: int = 0) -> None:
        self.model, self.every = model, every

    def start_step(self, step: int) -> None:
        pass

    def end_step(self) -> dict[str, float]:
        return {}

    def summary(self) -> str:
        return ""
