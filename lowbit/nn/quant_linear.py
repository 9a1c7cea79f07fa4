"""QuantLinear: a drop-in nn.Linear whose three GEMMs run in the formats a Recipe names.

forward  Y  = X·W^T      (recipe.fprop)
backward dX = dY·W       (recipe.dgrad)
         dW = dY^T·X     (recipe.wgrad)
All three go through lowbit.quant.gemm (emulation on any device, torch._scaled_mm for fp8
tensorwise/rowwise on CUDA, or a registered kernel backend). For backward, the layer saves the
*quantized* wgrad operand X^T (prepared during the forward pass from the full-precision X), so the
activation memory held between forward and backward shrinks with the format; the weight is a
Parameter that is kept anyway.

Randomness (Hadamard signs, stochastic rounding, leverage sampling) takes one seed per GEMM call
from the layer's own torch.Generator (`layer.generator`), seeded by `seed` and mixed with the
data-parallel rank: runs repeat exactly, and the trainer's checkpoints save and restore these
generators, so a resumed run draws the same noise as an uninterrupted one. Delayed-scaling amax
histories are not checkpointed (a non-persistent buffer, so state dicts match across recipes).

Under autocast the GEMMs still compute in fp32 from the quantized values (autocast is switched
off inside), and the output takes the autocast dtype, as nn.Linear's would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lowbit.kernels  # noqa: F401  (registers the Triton GEMM backend and fused quantizer; no triton import)
from lowbit.quant.gemm import Observer, Operand, derive_seed, gemm_operands, prepare_operand
from lowbit.quant.recipes import GEMMS, OPERAND_NAMES, Recipe, get_recipe


class QuantLinear(nn.Linear):
    """nn.Linear whose fprop, dgrad and wgrad GEMMs are quantized as `recipe` says (module docstring).

    `backend` picks the GEMM implementation (lowbit.quant.gemm: auto, emulate, scaled_mm or a
    registered kernel backend); `seed` seeds the layer's own generator of per-call seeds.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        recipe: Recipe | str = "fp8_tensorwise",
        *,
        backend: str = "auto",
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = get_recipe(recipe)
        _compile_safe()  # build the compile-safe entry now, never while torch.compile traces
        self.backend = backend
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        # Telemetry hook, set by QuantTelemetry on sampled steps only.
        self.observer: Observer | None = None
        # Delayed scaling: amax history per (GEMM, operand), rows in GEMMS × (A, B) order.
        n_hist = self.recipe.amax_history
        self.register_buffer("amax_history", torch.zeros(6, max(n_hist, 1), device=device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe | str, **kwargs: Any) -> QuantLinear:
        """A QuantLinear sharing `linear`'s weight and bias Parameters (no copy)."""
        w = linear.weight
        q = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            recipe,
            device="meta",
            **kwargs,
        )
        q.weight = w
        q.bias = linear.bias
        q.amax_history = torch.zeros_like(q.amax_history, device=w.device)
        return q

    def next_seed(self) -> int:
        """One GEMM call's seed (Hadamard signs, stochastic rounding) from the layer's generator."""
        seed = int(torch.randint(0, 2**31 - 1, (), generator=self.generator))
        # Data-parallel ranks draw the same sequence; mixing in the rank keeps their rounding noise
        # independent, so averaging gradients across ranks also averages the SR noise down.
        rank = _rank()
        return derive_seed(seed, 1000 + rank) if rank else seed

    def history(self, gemm: str, role: int) -> torch.Tensor | None:
        """The amax-history row of `gemm`'s operand `role` (1 = A, 2 = B); None without delayed scaling."""
        if self.recipe.amax_history <= 0:
            return None
        return self.amax_history[GEMMS.index(gemm) * 2 + role - 1]

    def observe(self, gemm: str, role: int) -> Observer | None:
        """The telemetry hook for one operand, naming it `<gemm>_<operand>`; None when telemetry is off."""
        if self.observer is None:
            return None
        obs, name = self.observer, f"{gemm}_{OPERAND_NAMES[gemm][role - 1]}"
        return lambda _name, t, q: obs(name, t, q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe.is_identity:
            return F.linear(x, self.weight, self.bias)
        return _compile_safe()(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}, backend={self.backend}"


def _quant_linear_eager(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: QuantLinear
) -> torch.Tensor:
    # Inside Function.forward grad mode is always off, so decide here whether wgrad will run
    # (not under torch.no_grad / eval, not for a frozen weight).
    need_wgrad = torch.is_grad_enabled() and weight.requires_grad
    return _QuantLinearFn.apply(x, weight, bias, layer, need_wgrad)


_compile_safe_fn = None


def _compile_safe() -> Callable[..., torch.Tensor]:
    """_quant_linear_eager wrapped in torch.compiler.disable, built on first use.

    torch.compile (train.compile=true) graph-breaks around the quantized GEMMs and runs them
    eagerly: they draw seeds on the host and Inductor's CPU codegen mis-splits their block
    reshapes; fused kernels are lowbit/kernels' job. Built lazily because torch.compiler.disable
    imports torch._dynamo (and Triton), which `import lowbit.nn` should not do.
    """
    global _compile_safe_fn
    if _compile_safe_fn is None:
        _compile_safe_fn = torch.compiler.disable(_quant_linear_eager)
    return _compile_safe_fn


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _prep(layer: QuantLinear, gemm: str, t: torch.Tensor, role: int, seed: int) -> Operand:
    spec = getattr(layer.recipe, gemm)
    operand_spec = spec.a if role == 1 else spec.b
    return prepare_operand(
        t,
        operand_spec,
        spec,
        seed,
        role,
        amax_history=layer.history(gemm, role),
        observe=layer.observe(gemm, role),
    )


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _QuantLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer: QuantLinear, need_wgrad: bool):  # type: ignore[override]
        out_dtype = _output_dtype(x)
        recipe = layer.recipe
        seeds = [layer.next_seed() for _ in GEMMS]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            a = _prep(layer, "fprop", x2, 1, seeds[0])
            b = _prep(layer, "fprop", weight, 2, seeds[0])
            y = gemm_operands(a, b, recipe.fprop, seeds[0], layer.backend)
            if bias is not None:
                y = y + bias.float()
            # The wgrad operand X^T (in × tokens), quantized now from the full-precision X.
            x_wgrad = _prep(layer, "wgrad", x2.t(), 2, seeds[2]) if need_wgrad else None
        ctx.layer, ctx.seeds, ctx.x_wgrad = layer, seeds, x_wgrad
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        ctx.save_for_backward(weight)
        return y.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        layer: QuantLinear = ctx.layer
        recipe = layer.recipe
        seeds = ctx.seeds
        dx = dw = db = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g2 = grad_out.reshape(-1, grad_out.shape[-1]).float()
            if ctx.needs_input_grad[0]:
                a = _prep(layer, "dgrad", g2, 1, seeds[1])
                b = _prep(layer, "dgrad", weight.t(), 2, seeds[1])
                dx = gemm_operands(a, b, recipe.dgrad, seeds[1], layer.backend)
                dx = dx[:, : weight.shape[1]].to(ctx.x_dtype).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                a = _prep(layer, "wgrad", g2.t(), 1, seeds[2])
                dw = gemm_operands(a, ctx.x_wgrad, recipe.wgrad, seeds[2], layer.backend)
                dw = dw.to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = g2.sum(0).to(weight.dtype)
        ctx.x_wgrad = None
        return dx, dw, db, None, None
