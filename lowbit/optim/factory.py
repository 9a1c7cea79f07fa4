"""Build the optimizer named by the `optim=` config group, with weight-decay parameter groups."""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch import nn

from lowbit.optim.adamw import LowBitAdamW
from lowbit.optim.config import OptimName, validate_optim_config


def param_groups(model: nn.Module, cfg: Any) -> list[dict]:
    """Split parameters into decayed (matrices) and undecayed (norms, biases, embeddings) groups."""
    decay, no_decay = [], []
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        exempt = p.dim() < 2 or id(p) in embedding_params
        (no_decay if exempt and not cfg.decay_norms_and_embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _value(x: Any) -> Any:
    return x.value if isinstance(x, Enum) else x


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """The optimizer for `model` described by `cfg` (an OptimConfig or its DictConfig).

    Every param group carries `base_lr`, which the trainer's schedule multiplies each step.
    """
    validate_optim_config(cfg)
    name = OptimName(_value(cfg.name))
    rounding = _value(cfg.bf16_rounding)
    groups = param_groups(model, cfg)
    betas = tuple(float(b) for b in cfg.betas)
    common = dict(lr=cfg.lr, betas=betas, eps=cfg.eps)
    lowbit = dict(common, bf16_rounding=rounding, seed=cfg.seed, min_quant_numel=cfg.min_quant_numel,
                  rank1=cfg.rank1, fused=cfg.fused, paged=cfg.paged)
    opt: torch.optim.Optimizer
    if name is OptimName.adamw and rounding == "nearest":
        # torch's fused kernel where every parameter is on CUDA (torch picks its slower foreach
        # implementation by default): 1.07B params, H100, 11.3 ms a step (docs/BENCHMARKS.md);
        # on any device with optim.fused=true (the CPU has one too).
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        fused = cfg.fused if cfg.fused is not None else on_cuda
        opt = torch.optim.AdamW(groups, **common, fused=True if fused else None)
    elif name in (OptimName.adamw, OptimName.adamw_bf16_sr):
        opt = LowBitAdamW(groups, state_bits=32, **lowbit)
    elif name is OptimName.adamw8bit:
        opt = LowBitAdamW(groups, state_bits=8, **lowbit)
    elif name is OptimName.adamw4bit:
        opt = LowBitAdamW(groups, state_bits=4, **lowbit)
    else:
        from lowbit.optim.shampoo import Shampoo

        bits = cfg.precond_bits
        if bits is None:
            bits = 4 if name is OptimName.shampoo4bit else 32
        opt = Shampoo(
            groups, **common, bits=bits, max_preconditioner_dim=cfg.max_preconditioner_dim,
            stats_every=cfg.stats_every, inverse_every=cfg.inverse_every, shampoo_beta=cfg.shampoo_beta,
            matrix_eps=cfg.matrix_eps, bjorck_iters=cfg.bjorck_iters, eigvec_block=cfg.eigvec_block,
            bf16_rounding=rounding, seed=cfg.seed, distributed=cfg.shampoo_distributed,
        )
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt
