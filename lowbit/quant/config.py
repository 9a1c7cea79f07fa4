"""Schema of the `quant=` config group: which numerics recipe `convert_model` applies to the model."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class QuantConfig:
    # A recipe name known to lowbit.quant.get_recipe (bf16 = no quantization).
    recipe: str = "bf16"
    # Module-name patterns that stay in high precision.
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    # Log quantization telemetry every N optimizer steps (0 = off).
    telemetry_every: int = 0
