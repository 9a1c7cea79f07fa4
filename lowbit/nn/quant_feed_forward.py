"""QuantFeedForward: a SwiGLU feed-forward whose fp8 quantization is fused into SwiGLU (delayed scaling).

An fp8 feed-forward y = W2 h, h = silu(X W1^T) * (X W3^T), run as three QuantLinear layers,
quantizes per step: X twice (for W1 and for W3; same X, two histories with the same entries),
h after Inductor wrote it in bf16, and in backward dG and dU after SwiGLU's backward wrote them
in bf16. On the 1b model that was about half of the step's quantization traffic
(docs/BENCHMARKS.md, twelfth pass). convert_model replaces lowbit.nn.llama.FeedForward modules
whose three layers are fp8 delayed-scaling QuantLinears with this module, which keeps the three
layers (same Parameters, same state-dict names, same history buffers) and runs them as one
autograd Function:
  - X is quantized once (X and X^T, on W1's history rows; W3's X rows receive the same entries,
    as they would unfused);
  - h is made by lowbit.kernels.swiglu_pair straight from the fp8 GEMMs' bf16 outputs g, u into
    the fp8 pair (h, h^T) W2's GEMMs read, on W2's X rows: no bf16 h (its memory is not saved
    for backward either: g and u are, as unfused);
  - in backward one kernel makes dG's and dU's fp8 pairs from dH, g and u, on W1's and W3's dY
    rows; dX = dG W1 + dU W3.
h, dG and dU are rounded once, from fp32 to fp8 (unfused: to bf16, then to fp8), so the fused
module's numbers differ from the unfused layers' in the last bits; its kernels are tested against
lowbit.quant.swiglu + the reference quantizer. Elsewhere than CUDA the same ops run that
reference. The histories receive what the unfused layers' would, to fp32 rounding of h's, dG's and
dU's amaxes; one difference: when X needs no gradient, the unfused W1/W3 record dG/dU only in
their wgrad rows, the fused module in both rows of each. Every other piece (pairs of X, W, dY;
GEMMs; histories; CUDA graphs, no host sync;
the same known limits under activation checkpointing) is the traced QuantLinear path's
(lowbit.nn.quant_linear_traced), reused. Without grad (evaluation), with a frozen weight or
with telemetry on, or with hooks on its layers (DeepSpeed ZeRO-3's among them:
lowbit.nn.quant_shared_input.hooked), the module runs its three layers unfused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import swiglu_pair
from lowbit.kernels.quantize import triton_available
from lowbit.nn.quant_linear import QuantLinear
from lowbit.nn.quant_linear_traced import (
    _delayed_pair,
    _fake_pair,
    _gemm,
    _quantize_pair,
    _saved,
    autocast_input,
    history_owner,
    output_dtype,
    prequantized_weights,
    weight_pairs,
)
from lowbit.nn.quant_shared_input import (
    DY_ROW,
    DYT_ROW,
    X_ROW,
    XT_ROW,
    check_layers,
    quantize_shared_input,
    register_op,
    runs_shared,
    why_not_shared,
)
from lowbit.quant.qtensor import QTensor
from lowbit.quant.recipes import Recipe
from lowbit.quant.swiglu import swiglu_fp32, swiglu_grad_fp32

_OP_H = "lowbit::swiglu_pair_delayed"
_OP_DH = "lowbit::swiglu_grad_pairs_delayed"
_registered = False


def why_not_fused(recipe: Recipe, backend: str = "auto") -> str | None:
    """Why a feed-forward of QuantLinears with this recipe and backend is not fused (None: fused)."""
    why = why_not_shared(recipe, backend)
    if why is not None:
        return why
    if recipe.fprop.a.fmt != recipe.wgrad.b.fmt or recipe.dgrad.a.fmt != recipe.wgrad.a.fmt:
        return "an activation or gradient has different formats in its two GEMMs"
    return None


def _kernels(t: torch.Tensor) -> bool:
    return t.is_cuda and t.numel() > 0 and triton_available()


def _swiglu_pair(g: torch.Tensor, u: torch.Tensor, hist: torch.Tensor, fmt: str) -> tuple[torch.Tensor, ...]:
    if _kernels(g):
        return swiglu_pair.swiglu_pair_delayed(g, u, fmt, hist[X_ROW], hist[XT_ROW])
    return _delayed_pair(swiglu_fp32(g, u), hist, fmt, fmt, X_ROW, XT_ROW)


def _swiglu_grad_pairs(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, hist_g: torch.Tensor,
                       hist_u: torch.Tensor, fmt: str) -> tuple[torch.Tensor, ...]:
    if _kernels(g):
        return swiglu_pair.swiglu_grad_pairs_delayed(
            dh, g, u, fmt, (hist_g[DY_ROW], hist_g[DYT_ROW]), (hist_u[DY_ROW], hist_u[DYT_ROW])
        )
    dg, du = swiglu_grad_fp32(dh, g, u)
    return (*_delayed_pair(dg, hist_g, fmt, fmt, DY_ROW, DYT_ROW),
            *_delayed_pair(du, hist_u, fmt, fmt, DY_ROW, DYT_ROW))


def _register_ops() -> None:
    """Register the SwiGLU custom ops once (lazily, like the traced path's)."""
    global _registered
    if _registered:
        return
    register_op()

    @torch.library.custom_op(_OP_H, mutates_args=("hist",))
    def swiglu_pair_delayed(
        g: torch.Tensor, u: torch.Tensor, hist: torch.Tensor, fmt: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _swiglu_pair(g, u, hist, fmt)

    @swiglu_pair_delayed.register_fake
    def _(g, u, hist, fmt):  # noqa: ANN001, ANN202
        return _fake_pair(g, fmt, "tensor", fmt, "tensor", True, True)

    # Backward: the histories of the layers registered under `owner_g`, `owner_u`, written without
    # declaring them, and `token` a tensor of this call's forward (quant_linear_traced's docstring).
    @torch.library.custom_op(_OP_DH, mutates_args=())
    def swiglu_grad_pairs_delayed(
        dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, owner_g: int, owner_u: int, token: torch.Tensor,
        fmt: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
               torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        hist_g, hist_u = history_owner(owner_g).amax_history, history_owner(owner_u).amax_history
        return _swiglu_grad_pairs(dh, g, u, hist_g, hist_u, fmt)

    @swiglu_grad_pairs_delayed.register_fake
    def _(dh, g, u, owner_g, owner_u, token, fmt):  # noqa: ANN001, ANN202
        fake = _fake_pair(g, fmt, "tensor", fmt, "tensor", True, True)
        return fake + tuple(t.clone() for t in fake)  # two pairs: no output may alias another

    _registered = True


def _qtensors(parts: tuple[torch.Tensor, ...], spec, spec_t, dtype: torch.dtype) -> tuple[QTensor, QTensor]:  # noqa: ANN001
    d, s, d_t, s_t = parts
    return _saved(d, s, spec, dtype), _saved(d_t, s_t, spec_t, dtype)


_FUNCTIONS: dict[tuple[Recipe, str], type[torch.autograd.Function]] = {}


def fused_function(recipe: Recipe, backend: str) -> type[torch.autograd.Function]:
    """The autograd Function of the fused feed-forward for one (recipe, backend): one class per
    pair, closing over them (as lowbit.nn.quant_linear_traced.traced_function, for Dynamo)."""
    _register_ops()
    key = (recipe, backend)
    if key not in _FUNCTIONS:

        def forward(ctx, x, w1, w3, w2, h1, h3, h2, k1: int, k3: int, k2: int, need_dgrad: bool,  # noqa: ANN001
                    fresh: tuple[bool, ...], *pre):
            return _forward(recipe, backend, ctx, x, (w1, w3, w2), (h1, h3, h2), (k1, k3, k2), need_dgrad,
                            fresh, pre)

        def backward(ctx, dy):  # noqa: ANN001
            return _backward(recipe, backend, ctx, dy)

        methods = dict(forward=staticmethod(forward), backward=staticmethod(backward))
        _FUNCTIONS[key] = type(f"_FusedFeedForward_{recipe.name}", (torch.autograd.Function,), methods)
    return _FUNCTIONS[key]


def _forward(recipe: Recipe, backend: str, ctx, x, ws, hists, keys, need_dgrad: bool, fresh, pre):  # noqa: ANN001
    w1, w3, w2 = ws
    h1, h3, h2 = hists
    fp, dg, wg = recipe.fprop, recipe.dgrad, recipe.wgrad
    out_dtype = output_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, x.shape[-1])
        qx, x_t = quantize_shared_input(x2, [h1, h3], recipe)
        dgrad_b = dg.b if need_dgrad else None
        n13 = 4 * ((1 if fresh[0] else 0) + (1 if fresh[1] else 0))  # pre's tensors of w1 and w3
        (qw1, w1_t), (qw3, w3_t) = weight_pairs((w1, w3), fresh[:2], pre[:n13], (h1, h3), fp.b, dgrad_b)
        [(qw2, w2_t)] = weight_pairs((w2,), fresh[2:], pre[n13:], (h2,), fp.b, dg.b)
        g = _gemm(qx, qw1, fp, backend, out_dtype)
        u = _gemm(qx, qw3, fp, backend, out_dtype)
        qh, h_t = _qtensors(torch.ops.lowbit.swiglu_pair_delayed(g, u, h2, fp.a.fmt), fp.a, wg.b, out_dtype)
        y = _gemm(qh, qw2, fp, backend, out_dtype)
    ctx.save_for_backward(x_t.data, x_t.scale, w2_t.data, w2_t.scale, h_t.data, h_t.scale, g, u,
                          *((w1_t.data, w1_t.scale, w3_t.data, w3_t.scale) if need_dgrad else ()))
    ctx.keys, ctx.need_dgrad, ctx.n_pre = keys, need_dgrad, len(pre)
    ctx.dtypes = (x.dtype, w1.dtype, w3.dtype, w2.dtype)
    return y.reshape(*x.shape[:-1], w2.shape[0])


def _backward(recipe: Recipe, backend: str, ctx, dy):  # noqa: ANN001
    xt_d, xt_s, w2t_d, w2t_s, ht_d, ht_s, g, u, *w13 = ctx.saved_tensors
    k1, k3, k2 = ctx.keys
    x_dtype, w1_dtype, w3_dtype, w2_dtype = ctx.dtypes
    dg, wg = recipe.dgrad, recipe.wgrad

    x_t, h_t = _saved(xt_d, xt_s, wg.b, x_dtype), _saved(ht_d, ht_s, wg.b, g.dtype)
    w2_t = _saved(w2t_d, w2t_s, dg.b, w2_dtype)
    dx = None
    with torch.autocast(dy.device.type, enabled=False):
        dy2 = dy.reshape(-1, dy.shape[-1])
        qdy, qdy_t = _quantize_pair(dy2, dg.a, wg.a, rows=(DY_ROW, DYT_ROW), owner=(k2, ht_s))
        dh = _gemm(qdy, w2_t, dg, backend, g.dtype)
        dw2 = _gemm(qdy_t, h_t, wg, backend, w2_dtype)
        parts = torch.ops.lowbit.swiglu_grad_pairs_delayed(dh, g, u, k1, k3, xt_s, dg.a.fmt)
        qdg, qdg_t = _qtensors(parts[:4], dg.a, wg.a, g.dtype)
        qdu, qdu_t = _qtensors(parts[4:], dg.a, wg.a, g.dtype)
        # All three wgrads: the module runs fused only while every weight needs its gradient.
        dw1 = _gemm(qdg_t, x_t, wg, backend, w1_dtype)
        dw3 = _gemm(qdu_t, x_t, wg, backend, w3_dtype)
        if ctx.need_dgrad and ctx.needs_input_grad[0]:
            w1_t, w3_t = _saved(w13[0], w13[1], dg.b, w1_dtype), _saved(w13[2], w13[3], dg.b, w3_dtype)
            dx = _gemm(qdg, w1_t, dg, backend, x_dtype) + _gemm(qdu, w3_t, dg, backend, x_dtype)
            dx = dx.reshape(*dy.shape[:-1], dx.shape[-1])
    return dx, dw1, dw3, dw2, None, None, None, None, None, None, None, None, *([None] * ctx.n_pre)


class QuantFeedForward(nn.Module):
    """lowbit.nn.llama.FeedForward's SwiGLU (w1 gate, w3 up, w2 down) on three QuantLinear layers,
    fused as the module docstring says; built by convert_model, which checked `why_not_fused`."""

    def __init__(self, w1: QuantLinear, w3: QuantLinear, w2: QuantLinear) -> None:
        super().__init__()
        check_layers("QuantFeedForward", [w1, w3, w2], ["w1", "w3", "w2"], same_input=False)
        shapes = [tuple(m.weight.shape) for m in (w1, w3, w2)]
        if not (shapes[0] == shapes[1] and shapes[2] == shapes[0][::-1]):
            raise ValueError("QuantFeedForward: weights must be (hidden, dim), (hidden, dim), (dim, hidden); "
                             f"got w1 {shapes[0]}, w3 {shapes[1]}, w2 {shapes[2]}")
        why = why_not_fused(w1.recipe, w1.backend)
        if why is not None:
            raise ValueError(f"QuantFeedForward: recipe {w1.recipe.name} cannot be fused: {why}")
        self.w1, self.w3, self.w2 = w1, w3, w2
        fused_function(w1.recipe, w1.backend)  # the Function class now, not while Dynamo traces

    def __setstate__(self, state: dict) -> None:
        # Unpickled (or deep-copied): build the Function class now, not while Dynamo traces.
        super().__setstate__(state)
        fused_function(self.w1.recipe, self.w1.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)  # as the layers would (the fallback's layers then cast nothing)
        if not (runs_shared([self.w1, self.w3, self.w2], x) and x.dtype in swiglu_pair.DTYPES):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        w1, w3, w2 = self.w1, self.w3, self.w2
        fn = fused_function(w1.recipe, w1.backend)
        fresh, pre = prequantized_weights([w1, w3, w2])
        return fn.apply(x, w1.weight, w3.weight, w2.weight, w1.amax_history, w3.amax_history, w2.amax_history,
                        w1.history_key, w3.history_key, w2.history_key, x.requires_grad, fresh, *pre)
