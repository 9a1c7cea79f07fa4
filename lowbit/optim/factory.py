"""Build the optimizer named by the `optim=` config group, with weight-decay parameter groups."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.optim.config import OptimConfig, OptimName


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
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


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    name = OptimName(cfg.name)
    groups = param_groups(model, cfg)
    if name is OptimName.adamw:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    raise ValueError(f"unknown optim.name={cfg.name!r}; valid choices: {[n.value for n in OptimName]}")
