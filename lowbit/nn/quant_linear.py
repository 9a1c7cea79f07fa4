"""QuantLinear: a drop-in nn.Linear whose three GEMMs run in the formats a Recipe names.

forward  Y  = X·W^T      (recipe.fprop)
backward dX = dY·W       (recipe.dgrad)
         dW = dY^T·X     (recipe.wgrad)
All three go through lowbit.quant.gemm (emulation on any device, cuBLAS fp8 for tensorwise,
rowwise and blockwise scaling on CUDA, or a registered kernel backend). For backward, the layer
keeps the *quantized* wgrad operand X^T and dgrad operand W^T (both prepared during the forward
pass, in the same pass that quantizes X and W where lowbit.kernels' pair quantizer applies), so
the activation memory held between forward and backward shrinks with the format.

Randomness (Hadamard signs, stochastic rounding, leverage sampling) takes one seed per GEMM call
from the layer's own torch.Generator (`layer.generator`), seeded by `seed` and mixed with the
data-parallel rank: runs repeat exactly, and the trainer's checkpoints save and restore these
generators, so a resumed run draws the same noise as an uninterrupted one. Delayed-scaling amax
histories are not checkpointed (a non-persistent buffer, so state dicts match across recipes).

Under autocast the input is first cast to the autocast dtype, as nn.Linear computes with it (TE
and torchao quantize that cast too), so dX comes back in that dtype; the GEMMs still compute from
the quantized values with fp32 accumulation (autocast is switched off inside), and the output
takes the autocast dtype, as nn.Linear's would; cuBLAS and the Triton GEMM write that dtype (and
add the bias) in their epilogue. The weight is quantized from its own dtype (fp32 master weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lowbit.kernels  # noqa: F401  (registers the Triton GEMM backend and fused quantizer; no triton import)
from lowbit.nn import quant_linear_graph
from lowbit.nn.quant_linear_traced import (
    autocast_input,
    output_dtype,
    register_history_owner,
    traced_function,
    traced_quant_linear,
    why_not_traced,
)
from lowbit.quant.gemm import (
    AmaxHistory,
    Observer,
    OperandPlan,
    derive_seed,
    gemm_backends,
    gemm_operands,
    prepare_operand_pair,
)
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
        if backend not in gemm_backends():  # before any work, not at the first forward
            raise ValueError(f"unknown GEMM backend {backend!r}; valid choices: {', '.join(gemm_backends())}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = get_recipe(recipe)
        _compile_safe()  # build the compile-safe entry now, never while torch.compile traces
        traced_function(self.recipe, backend)  # likewise the traced paths' Function classes
        if quant_linear_graph.why_not_graph(self.recipe, backend) is None:
            quant_linear_graph.graph_function(self.recipe, backend)
        self.backend = backend
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        # Telemetry hook, set by QuantTelemetry on sampled steps only.
        self.observer: Observer | None = None
        # Delayed scaling: amax history per (GEMM, operand), rows in GEMMS × (A, B) order.
        n_hist = self.recipe.amax_history
        # An all-zero row means nothing recorded yet (lowbit.quant.gemm.AmaxHistory, on the device).
        self.register_buffer("amax_history", torch.zeros(6, max(n_hist, 1), device=device), persistent=False)
        # How the traced layer's backward finds this buffer (lowbit.nn.quant_linear_traced).
        self.history_key = register_history_owner(self) if n_hist > 0 else -1
        # Calls made inside a compiled graph: the counter its seeds are hashed from (on the device:
        # lowbit.nn.quant_linear_graph). Not in the state dict; the trainer's checkpoints keep it.
        calls = torch.zeros((), dtype=torch.int64, device=device)
        self.register_buffer("graph_calls", calls, persistent=False)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> QuantLinear:
        # model.to(torch.bfloat16) and .half() cast floating buffers too: the amax histories stay
        # fp32 (amaxes rounded to bf16 would change the scales, and the pair kernels read fp32 rows).
        super()._apply(fn, recurse)
        if self.amax_history.dtype != torch.float32:
            self.amax_history = self.amax_history.float()
        return self

    def __setstate__(self, state: dict) -> None:
        # A copy (copy.deepcopy, unpickling) gets its own history key: the original's would lead
        # the traced backward to the original's buffer.
        super().__setstate__(state)
        if getattr(self, "history_key", -1) >= 0:
            self.history_key = register_history_owner(self)

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
        q.graph_calls = torch.zeros_like(q.graph_calls, device=w.device)
        return q

    def next_seed(self) -> int:
        """One GEMM call's seed (Hadamard signs, stochastic rounding) from the layer's generator."""
        return self.next_seeds(1)[0]

    def next_seeds(self, n: int) -> list[int]:
        """n GEMM calls' seeds from one draw of the layer's generator (the same as n next_seed calls)."""
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=self.generator).tolist()
        # Data-parallel ranks draw the same sequence; mixing in the rank keeps their rounding noise
        # independent, so averaging gradients across ranks also averages the SR noise down.
        rank = _rank()
        return [derive_seed(s, 1000 + rank) for s in seeds] if rank else seeds

    def history(self, gemm: str, role: int) -> AmaxHistory | None:
        """The amax history of `gemm`'s operand `role` (1 = A, 2 = B); None without delayed scaling."""
        if self.recipe.amax_history <= 0:
            return None
        return AmaxHistory(self.amax_history[GEMMS.index(gemm) * 2 + role - 1])

    def observe(self, gemm: str, role: int) -> Observer | None:
        """The telemetry hook for one operand, naming it `<gemm>_<operand>`; None when telemetry is off."""
        if self.observer is None:
            return None
        obs, name = self.observer, f"{gemm}_{OPERAND_NAMES[gemm][role - 1]}"
        return lambda _name, t, q: obs(name, t, q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe.is_identity:
            return F.linear(x, self.weight, self.bias)
        x = autocast_input(x)
        # Under torch.compile, fp8 tensor/row recipes are traced into the graph
        # (lowbit.nn.quant_linear_traced), most others run as graph ops of our kernels
        # (lowbit.nn.quant_linear_graph); telemetry steps and the rest run eagerly.
        if torch.compiler.is_compiling() and self.observer is None:
            if why_not_traced(self.recipe, self.backend) is None:
                return traced_quant_linear(x, self.weight, self.bias, self)
            if quant_linear_graph.usable(self, x):
                return quant_linear_graph.graph_quant_linear(x, self.weight, self.bias, self)
        return _compile_safe()(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}, backend={self.backend}"


def _quant_linear_eager(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: QuantLinear
) -> torch.Tensor:
    # Inside Function.forward grad mode is always off, so decide here which backward GEMMs will
    # run (none under torch.no_grad / eval; no wgrad for a frozen weight, no dgrad for an input
    # that needs no gradient): their operands X^T and W^T are made in forward only if so.
    grad = torch.is_grad_enabled()
    need_wgrad, need_dgrad = grad and weight.requires_grad, grad and x.requires_grad
    return _QuantLinearFn.apply(x, weight, bias, layer, need_wgrad, need_dgrad)


_compile_safe_fn = None


def _compile_safe() -> Callable[..., torch.Tensor]:
    """_quant_linear_eager wrapped in torch.compiler.disable, built on first use.

    Under torch.compile (train.compile=true) the layers that cannot be traced (`why_not_traced`:
    seeds drawn on the host, block formats, Triton GEMM backends) graph-break here and run
    eagerly with lowbit.kernels' fused kernels. Built lazily because torch.compiler.disable
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


def _plan(layer: QuantLinear, gemm: str, role: int, seed: int, wanted: bool = True) -> OperandPlan | None:
    """How `gemm`'s operand `role` is prepared (None when that GEMM will not run)."""
    if not wanted:
        return None
    spec = getattr(layer.recipe, gemm)
    return OperandPlan(
        spec.a if role == 1 else spec.b,
        spec,
        seed,
        role,
        history=layer.history(gemm, role),
        observe=layer.observe(gemm, role),
    )


class _QuantLinearFn(torch.autograd.Function):
    # Each of X, W and dY is needed along both of its axes (X for fprop and X^T for wgrad, W for
    # fprop and W^T for dgrad, dY for dgrad and dY^T for wgrad): prepare_operand_pair makes both
    # from one read where a fused pair quantizer exists. X^T and W^T are made during forward and
    # kept quantized for backward; the full-precision X is not saved.
    @staticmethod
    def forward(ctx, x, weight, bias, layer: QuantLinear, need_wgrad: bool, need_dgrad: bool):  # type: ignore[override]
        out_dtype = output_dtype(x)
        recipe = layer.recipe
        seeds = layer.next_seeds(len(GEMMS))
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            a, x_wgrad = prepare_operand_pair(
                x2, _plan(layer, "fprop", 1, seeds[0]), _plan(layer, "wgrad", 2, seeds[2], need_wgrad)
            )
            b, w_dgrad = prepare_operand_pair(
                weight, _plan(layer, "fprop", 2, seeds[0]), _plan(layer, "dgrad", 2, seeds[1], need_dgrad)
            )
            y = gemm_operands(a, b, recipe.fprop, seeds[0], layer.backend, out_dtype=out_dtype, bias=bias)
        ctx.layer, ctx.seeds, ctx.x_wgrad, ctx.w_dgrad = layer, seeds, x_wgrad, w_dgrad
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        ctx.w_shape, ctx.w_dtype = weight.shape, weight.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        layer: QuantLinear = ctx.layer
        recipe = layer.recipe
        seeds = ctx.seeds
        need_dx = ctx.needs_input_grad[0] and ctx.w_dgrad is not None
        need_dw = ctx.needs_input_grad[1] and ctx.x_wgrad is not None
        dx = dw = db = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            a, a_t = prepare_operand_pair(
                g2, _plan(layer, "dgrad", 1, seeds[1], need_dx), _plan(layer, "wgrad", 1, seeds[2], need_dw)
            )
            if need_dx:
                dx = gemm_operands(
                    a, ctx.w_dgrad, recipe.dgrad, seeds[1], layer.backend, out_dtype=ctx.x_dtype
                )
                dx = dx[:, : ctx.w_shape[1]].reshape(ctx.x_shape)
            if need_dw:
                dw = gemm_operands(
                    a_t, ctx.x_wgrad, recipe.wgrad, seeds[2], layer.backend, out_dtype=ctx.w_dtype
                )
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = g2.sum(0, dtype=torch.float32).to(ctx.w_dtype)
        ctx.x_wgrad = ctx.w_dgrad = None
        return dx, dw, db, None, None, None
