"""Schema of the `quant=` config group: which numerics recipe `convert_model` applies to the model."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class QuantConfig:
    # A recipe name known to lowbit.quant.get_recipe (bf16 = no quantization).
    recipe: str = "bf16"
    # Module-name patterns that stay in high precision (fnmatch globs on the full dotted name, or
    # an exact dotted component: "lm_head", "layers.0.*", "w2").
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    # Log quantization telemetry every N optimizer steps (0 = off).
    telemetry_every: int = 0
    # Ablations. The GEMMs (fprop, dgrad, wgrad) that get a Hadamard rotation / stochastic rounding;
    # null keeps the recipe's choice, [] turns it off everywhere (e.g. quant.hadamard=[]).
    hadamard: list[str] | None = None
    stochastic_rounding: list[str] | None = None
    # Hadamard width for GEMMs that gain one (0 = the recipe's, else its block size, else 32).
    hadamard_block: int = 0
    # GEMM implementation: auto | emulate | scaled_mm | a registered kernel backend.
    backend: str = "auto"
    # Base seed of the layers' random streams (Hadamard signs, stochastic rounding).
    seed: int = 0
    # fp8 delayed scaling: quantize inside the SwiGLU feed-forward (lowbit.nn.quant_feed_forward);
    # false runs its three layers as separate QuantLinears.
    fuse_feed_forward: bool = True
    # fp8 delayed scaling: attention's q/k/v layers quantize their one input once
    # (lowbit.nn.quant_shared_input); false quantizes it in each layer.
    share_attention_input: bool = True
