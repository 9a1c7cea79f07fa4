"""Schema of the `optim=` config group (one dataclass for every optimizer; unused fields are ignored).

`validate_optim_config` checks every value and names the bad one with its valid range; the factory
calls it before building anything (Hydra's structured configs check types, not ranges).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class OptimName(str, Enum):
    adamw = "adamw"  # fp32 states (torch AdamW; ours when bf16_rounding is not nearest)
    adamw8bit = "adamw8bit"  # 8-bit block-wise dynamic-map states (Dettmers et al.)
    adamw4bit = "adamw4bit"  # 4-bit states, rank-1 normalized second moment (Li et al. 2023)
    # BF16 params without master copy: stochastic rounding, Kahan, or (the lossy baseline) nearest
    adamw_bf16_sr = "adamw_bf16_sr"
    shampoo = "shampoo"  # 32-bit Shampoo grafted to AdamW
    shampoo4bit = "shampoo4bit"  # 4-bit eigenvector Shampoo (Wang et al. 2024)


class BF16Rounding(str, Enum):
    nearest = "nearest"
    stochastic = "stochastic"
    kahan = "kahan"


@dataclass
class OptimConfig:
    name: OptimName = OptimName.adamw
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Norms, biases and embeddings get no weight decay unless this is true.
    decay_norms_and_embeddings: bool = False
    # How updates are written into BF16 parameters (no fp32 master copy); fp32 params ignore it.
    # Anything but `nearest` asks the trainer to hold the model in BF16 (wants_bf16_params).
    bf16_rounding: BF16Rounding = BF16Rounding.nearest
    # Seed of the stochastic-rounding hash stream (per step and tensor, so resume is bitwise).
    seed: int = 0
    # Low-bit AdamW: tensors with fewer elements keep fp32 states.
    min_quant_numel: int = 4096
    # 4-bit AdamW: rank-1 (row/col max) normalization of the second moment of matrices.
    rank1: bool = True
    # Fused step: null = on CUDA (lowbit's Triton step when triton imports; torch's fused AdamW for
    # adamw), true = always (on the CPU too), false = the torch reference / torch's foreach AdamW.
    fused: bool | None = None
    # Low-bit AdamW: keep states in pinned host memory, prefetched to the GPU per tensor.
    paged: bool = False
    # Shampoo: preconditioner bits (null = 32 for shampoo, 4 for shampoo4bit), blocks of at most
    # this dim, statistics every `stats_every` steps, inverse 4th roots every `inverse_every` steps.
    precond_bits: int | None = None
    max_preconditioner_dim: int = 1024
    stats_every: int = 1
    inverse_every: int = 10
    # EMA factor of the Shampoo statistics L = β L + (1-β) G Gᵀ.
    shampoo_beta: float = 0.95
    # Added to eigenvalues relative to the largest one before the inverse 4th root.
    matrix_eps: float = 1e-6
    # Björck orthogonalization iterations applied to dequantized eigenvector matrices.
    bjorck_iters: int = 1
    # Block size of the quantized eigenvector matrices.
    eigvec_block: int = 64
    # DDP: each rank preconditions a share of the Shampoo blocks; results are all-gathered.
    shampoo_distributed: bool = True


def _get(cfg: Any, key: str) -> Any:
    return cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)


def _enum(cls: type[Enum], value: Any, key: str) -> Enum:
    try:
        return cls(value.value if isinstance(value, Enum) else value)
    except ValueError:
        raise ValueError(
            f"optim.{key}={value!r} is not valid; valid choices: {', '.join(m.value for m in cls)}"
        ) from None


def validate_optim_config(cfg: Any) -> None:
    """Raise ValueError naming the first bad hyperparameter and its valid range or choices."""
    name = _enum(OptimName, _get(cfg, "name"), "name")
    _enum(BF16Rounding, _get(cfg, "bf16_rounding"), "bf16_rounding")

    def check(key: str, ok: bool, valid: str) -> None:
        if not ok:
            raise ValueError(f"optim.{key}={_get(cfg, key)!r} is out of range; valid: {valid}")

    lr = _get(cfg, "lr")
    check("lr", isinstance(lr, (int, float)) and lr >= 0, "a number >= 0")
    betas = list(_get(cfg, "betas"))
    check("betas", len(betas) == 2 and all(0 <= b < 1 for b in betas), "two numbers in [0, 1)")
    check("eps", _get(cfg, "eps") > 0, "> 0")
    check("weight_decay", _get(cfg, "weight_decay") >= 0, ">= 0")
    check("seed", 0 <= _get(cfg, "seed") < 2**32, "an integer in [0, 2**32)")
    check("min_quant_numel", _get(cfg, "min_quant_numel") >= 1, "an integer >= 1")
    bits = _get(cfg, "precond_bits")
    check("precond_bits", bits is None or bits in (32, 8, 4), "null, 32, 8 or 4")
    if name is OptimName.shampoo4bit:
        check("precond_bits", bits in (None, 4), "null or 4 for optim=shampoo4bit")
    check("max_preconditioner_dim", _get(cfg, "max_preconditioner_dim") >= 2, "an integer >= 2")
    check("stats_every", _get(cfg, "stats_every") >= 1, "an integer >= 1")
    check("inverse_every", _get(cfg, "inverse_every") >= 1, "an integer >= 1")
    check("shampoo_beta", 0 < _get(cfg, "shampoo_beta") <= 1, "in (0, 1]")
    check("matrix_eps", _get(cfg, "matrix_eps") > 0, "> 0")
    check("bjorck_iters", 0 <= _get(cfg, "bjorck_iters") <= 10, "an integer in [0, 10]")
    blk = _get(cfg, "eigvec_block")
    check("eigvec_block", blk >= 2 and blk % 2 == 0, "an even integer >= 2")


def wants_bf16_params(cfg: Any) -> bool:
    """True when the optimizer expects the model's parameters in BF16 (no fp32 master copy)."""
    name = _enum(OptimName, _get(cfg, "name"), "name")
    rounding = _enum(BF16Rounding, _get(cfg, "bf16_rounding"), "bf16_rounding")
    return name is OptimName.adamw_bf16_sr or rounding is not BF16Rounding.nearest
