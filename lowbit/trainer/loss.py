"""The training objective: next-token cross-entropy over the model's logits.

`LanguageModelLoss` puts the loss in the same module as the model's forward, so that
torch.compile traces both as one graph: the cross-entropy is then fused (no fp32 copy of the
logits, no separate softmax passes over them), and under CUDA graphs the gradient of the logits
stays inside the replayed graph instead of being copied into it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (batch, seq, vocab) against targets (batch, seq), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class LanguageModelLoss(nn.Module):
    """criterion(model(x), y) as one module (for torch.compile and DDP); by default the mean
    next-token cross-entropy."""

    def __init__(
        self, model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = loss_fn
    ) -> None:
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.model(x), y)
