"""convert_model: the only way quantization enters a model (swap nn.Linear for QuantLinear by name).

The model's code is untouched (torchao's convert_to_float8_training style): Linear modules are
replaced in their parents by QuantLinear modules that share the same weight/bias Parameters, so an
optimizer built before or after conversion sees the same tensors.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from lowbit.nn.quant_linear import QuantLinear
from lowbit.quant.config import QuantConfig
from lowbit.quant.gemm import gemm_backends
from lowbit.quant.recipes import RECIPES, Recipe, get_recipe

DEFAULT_SKIP = ("lm_head",)


def matches(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """True if a pattern is an fnmatch glob of the full dotted name or equals one of its components."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(name, p) or p in parts for p in patterns)


def convert_model(
    model: nn.Module,
    recipe: Recipe | str,
    skip: list[str] | tuple[str, ...] | None = DEFAULT_SKIP,
    *,
    backend: str = "auto",
    seed: int = 0,
    fuse_feed_forward: bool = True,
    share_attention_input: bool = True,
) -> nn.Module:
    """Replace every nn.Linear whose name is not matched by `skip` with a QuantLinear (in place).

    Embeddings are never touched (they are not Linear layers). Layer i (in named_modules order)
    gets seed `seed + i`. Returns `model`. A recipe without quantized GEMMs (bf16) changes nothing.
    `fuse_feed_forward`: lowbit.nn.llama.FeedForward modules whose three layers became QuantLinears
    of a recipe `why_not_fused` accepts (fp8 delayed scaling) become QuantFeedForward modules,
    which quantize inside SwiGLU (same Parameters, buffers and state-dict names).
    `share_attention_input`: likewise lowbit.nn.llama.Attention modules become QuantAttention
    modules, whose q/k/v layers quantize their one input once (lowbit.nn.quant_shared_input).
    """
    recipe = get_recipe(recipe)
    if backend not in gemm_backends():
        raise ValueError(f"unknown backend {backend!r}; valid choices: {', '.join(gemm_backends())}")
    if recipe.is_identity:
        return model
    skip = list(skip or [])
    targets = [
        (name, m) for name, m in model.named_modules() if type(m) is nn.Linear and not matches(name, skip)
    ]
    for i, (name, linear) in enumerate(targets):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = QuantLinear.from_linear(linear, recipe, backend=backend, seed=seed + i)
        setattr(parent, attr, q)
    if fuse_feed_forward:
        _fuse_feed_forwards(model)
    if share_attention_input:
        _share_attention_inputs(model)
    return model


def _share_attention_inputs(model: nn.Module) -> None:
    from lowbit.nn.llama import Attention
    from lowbit.nn.quant_shared_input import QuantAttention, hooked, why_not_shared

    for name, m in list(model.named_modules()):
        layers = (getattr(m, "wq", None), getattr(m, "wk", None), getattr(m, "wv", None))
        if type(m) is not Attention or not name or hooked(m):  # as _fuse_feed_forwards
            continue
        if not all(type(q) is QuantLinear and q.bias is None for q in layers):
            continue
        if len({(q.recipe, q.backend) for q in layers}) != 1 or why_not_shared(m.wq.recipe, m.wq.backend):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantAttention(m))


def _fuse_feed_forwards(model: nn.Module) -> None:
    # Exact FeedForward modules only: a subclass may compute something else in forward.
    from lowbit.nn.llama import FeedForward
    from lowbit.nn.quant_feed_forward import QuantFeedForward, why_not_fused
    from lowbit.nn.quant_shared_input import hooked

    for name, m in list(model.named_modules()):
        # Not the root (it cannot be replaced in place), nor a module with hooks (they would be lost).
        if type(m) is not FeedForward or not name or hooked(m):
            continue
        layers = (m.w1, m.w3, m.w2)
        if not all(type(q) is QuantLinear and q.bias is None for q in layers):
            continue  # a skipped (high-precision) layer: left unfused
        if len({(q.recipe, q.backend) for q in layers}) != 1 or why_not_fused(m.w1.recipe, m.w1.backend):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantFeedForward(m.w1, m.w3, m.w2))


def recipe_from_config(cfg: QuantConfig) -> Recipe:
    """cfg.recipe by name, with the config's per-GEMM Hadamard / stochastic-rounding overrides."""
    name = str(cfg.recipe)
    if name not in RECIPES:
        raise ValueError(f"unknown quant.recipe={name!r}; valid choices: {', '.join(RECIPES)}")
    hadamard = None if cfg.hadamard is None else [str(g) for g in cfg.hadamard]
    sr = None if cfg.stochastic_rounding is None else [str(g) for g in cfg.stochastic_rounding]
    return get_recipe(name).with_overrides(hadamard, sr, int(cfg.hadamard_block or 0))


def apply_quant_config(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """The trainer's entry: build the recipe from `cfg` and convert the model (bf16: unchanged)."""
    recipe = recipe_from_config(cfg)
    if recipe.is_identity:
        return model
    backend = str(getattr(cfg, "backend", "auto"))
    return convert_model(
        model, recipe, skip=list(cfg.skip), backend=backend, seed=int(getattr(cfg, "seed", 0)),
        fuse_feed_forward=bool(getattr(cfg, "fuse_feed_forward", True)),
        share_attention_input=bool(getattr(cfg, "share_attention_input", True)),
    )
