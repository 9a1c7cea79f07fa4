"""Schema of the `optim=` config group (one dataclass for every optimizer; unused fields are ignored)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class OptimName(str, Enum):
    adamw = "adamw"


@dataclass
class OptimConfig:
    name: OptimName = OptimName.adamw
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Norms, biases and embeddings get no weight decay unless this is true.
    decay_norms_and_embeddings: bool = False
