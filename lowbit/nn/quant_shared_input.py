"""Several fp8 delayed-scaling QuantLinears that read one input, with that input quantized once.

Under delayed scaling each QuantLinear keeps its own amax history, so layers that read the same X
(attention's q, k and v projections; a feed-forward's gate and up projections) each quantize X
again: their calls of the traced op differ by the history they write, and AOTAutograd cannot
merge them as it merges tensorwise scaling's identical calls. Their histories nevertheless hold
the same entries (the same tensor's amaxes, recorded at the same calls). Here X's pair (X for the
forward GEMMs, X^T for the wgrad GEMMs) is made once on the first layer's history rows, and the
others' X rows receive the same entries (`lowbit::quantize_shared_input_pair_delayed`); every
other piece is the traced QuantLinear path's (lowbit.nn.quant_linear_traced): W and dY pairs on
each layer's own rows, the GEMMs, the backward's history owners. Each output, weight gradient and
history row is bit for bit what the separate layers give; dX is the sum of the layers' dgrads in
their order, each rounded to X's dtype, so in bf16 it may differ from autograd's sum of the
separate layers' dX in the last bits.

`QuantAttention` (lowbit.nn.llama.Attention with its q/k/v projections run this way) is what
convert_model builds; `lowbit.nn.quant_feed_forward` uses the op for W1 and W3.
"""

from __future__ import annotations

import torch

from lowbit.nn.llama import Attention
from lowbit.nn.quant_linear import QuantLinear
from lowbit.nn.quant_linear_traced import (
    _delayed_pair,
    _fake_pair,
    _gemm,
    _quantize_pair,
    _register_op,
    _row,
    _saved,
    autocast_input,
    output_dtype,
    prequantized_weights,
    weight_pairs,
    why_not_traced,
)
from lowbit.quant.qtensor import QTensor
from lowbit.quant.recipes import Recipe

OP = "lowbit::quantize_shared_input_pair_delayed"
# QuantLinear.amax_history rows: X (fprop A), X^T (wgrad B), dY (dgrad A), dY^T (wgrad A).
X_ROW, XT_ROW = _row("fprop", 1), _row("wgrad", 2)
DY_ROW, DYT_ROW = _row("dgrad", 1), _row("wgrad", 1)
_registered = False


def why_not_shared(recipe: Recipe, backend: str = "auto") -> str | None:
    """Why layers of this recipe and backend do not share their input's quantization (None: they do)."""
    why = why_not_traced(recipe, backend)
    if why is not None:
        return why
    if recipe.amax_history <= 0:
        return "sharing the input's quantization is for delayed scaling (amax_history > 0)"
    return None


def register_op() -> None:
    """Register `lowbit::quantize_shared_input_pair_delayed` once (lazily, as the traced path's ops)."""
    global _registered
    if _registered:
        return
    _register_op()

    @torch.library.custom_op(OP, mutates_args=("hist", "mirrors"))
    def quantize_shared_input_pair_delayed(
        x: torch.Tensor, hist: torch.Tensor, mirrors: list[torch.Tensor], fmt: str, fmt_t: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = _delayed_pair(x, hist, fmt, fmt_t, X_ROW, XT_ROW)
        for m in mirrors:  # the other layers reading X record what `hist` recorded
            m[X_ROW].copy_(hist[X_ROW])
            m[XT_ROW].copy_(hist[XT_ROW])
        return out

    @quantize_shared_input_pair_delayed.register_fake
    def _(x, hist, mirrors, fmt, fmt_t):  # noqa: ANN001, ANN202
        return _fake_pair(x, fmt, "tensor", fmt_t, "tensor", True, True)

    _registered = True


def quantize_shared_input(
    x2: torch.Tensor, hists: list[torch.Tensor], recipe: Recipe
) -> tuple[QTensor, QTensor]:
    """(X, X^T) of the 2-D input x2 as QTensors, on hists[0]'s rows, mirrored into the other hists."""
    register_op()
    fp, wg = recipe.fprop, recipe.wgrad
    d, s, d_t, s_t = torch.ops.lowbit.quantize_shared_input_pair_delayed(x2, hists[0], hists[1:], fp.a.fmt,
                                                                         wg.b.fmt)
    return _saved(d, s, fp.a, x2.dtype), _saved(d_t, s_t, wg.b, x2.dtype)


_FUNCTIONS: dict[tuple[Recipe, str, int], type[torch.autograd.Function]] = {}


def shared_input_function(recipe: Recipe, backend: str, n: int) -> type[torch.autograd.Function]:
    """The autograd Function of n layers sharing one input, for one (recipe, backend): apply(x,
    need_dgrad, keys, fresh, *weights, *histories, *pairs) -> n outputs (`fresh`, `pairs`:
    quant_linear_traced.prequantized_weights). One class per triple, closing over them
    (as lowbit.nn.quant_linear_traced.traced_function, for Dynamo)."""
    register_op()
    key = (recipe, backend, n)
    if key not in _FUNCTIONS:

        def forward(ctx, x, need_dgrad: bool, keys: tuple[int, ...], fresh: tuple[bool, ...], *tensors):  # noqa: ANN001
            return _forward(recipe, backend, ctx, x, need_dgrad, keys, tensors[:n], tensors[n:2 * n], fresh,
                            tensors[2 * n:])

        def backward(ctx, *dys):  # noqa: ANN001
            return _backward(recipe, backend, ctx, dys)

        methods = dict(forward=staticmethod(forward), backward=staticmethod(backward))
        _FUNCTIONS[key] = type(f"_SharedInput{n}_{recipe.name}", (torch.autograd.Function,), methods)
    return _FUNCTIONS[key]


def _forward(recipe: Recipe, backend: str, ctx, x, need_dgrad, keys, weights, hists, fresh, pre):  # noqa: ANN001
    fp, dg = recipe.fprop, recipe.dgrad
    out_dtype = output_dtype(x)
    outs, saved = [], []
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, x.shape[-1])
        qx, x_t = quantize_shared_input(x2, list(hists), recipe)
        saved += [x_t.data, x_t.scale]
        pairs = weight_pairs(weights, fresh, pre, hists, fp.b, dg.b if need_dgrad else None)
        for w, (qw, w_t) in zip(weights, pairs):
            outs.append(_gemm(qx, qw, fp, backend, out_dtype).reshape(*x.shape[:-1], w.shape[0]))
            if need_dgrad:
                saved += [w_t.data, w_t.scale]
    ctx.save_for_backward(*saved)
    ctx.keys, ctx.need_dgrad, ctx.n_pre = keys, need_dgrad, len(pre)
    ctx.dtypes = (x.dtype, *(w.dtype for w in weights))
    return tuple(outs)


def _backward(recipe: Recipe, backend: str, ctx, dys):  # noqa: ANN001
    xt_d, xt_s, *wts = ctx.saved_tensors
    dg, wg = recipe.dgrad, recipe.wgrad
    x_dtype, *w_dtypes = ctx.dtypes
    x_t = _saved(xt_d, xt_s, wg.b, x_dtype)
    want_dx = ctx.need_dgrad and ctx.needs_input_grad[0]
    dx, dws = None, []
    with torch.autocast(xt_d.device.type, enabled=False):
        for i, (dy, key) in enumerate(zip(dys, ctx.keys)):
            # The shared-input module runs only while every weight needs its gradient.
            dy2 = dy.reshape(-1, dy.shape[-1])
            # dY for dgrad only when dX is wanted: its row then records as the separate layers' does.
            qdy, qdy_t = _quantize_pair(dy2, dg.a if want_dx else None, wg.a, rows=(DY_ROW, DYT_ROW),
                                        owner=(key, xt_s))
            dws.append(_gemm(qdy_t, x_t, wg, backend, w_dtypes[i]))
            if want_dx:
                w_t = _saved(wts[2 * i], wts[2 * i + 1], dg.b, w_dtypes[i])
                part = _gemm(qdy, w_t, dg, backend, x_dtype)
                dx = part if dx is None else dx + part
        if dx is not None:
            dx = dx.reshape(*dys[0].shape[:-1], dx.shape[-1])
    return (dx, None, None, None, *dws, *([None] * (len(dws) + ctx.n_pre)))


def check_layers(owner: str, layers: list[QuantLinear], names: list[str], same_input: bool = True) -> None:
    """Raise ValueError unless `layers` are distinct bias-free QuantLinears of one recipe and backend
    that `why_not_shared` accepts (and with `same_input`, all reading inputs of one width)."""
    for name, layer in zip(names, layers):
        if not isinstance(layer, QuantLinear) or layer.bias is not None:
            raise ValueError(f"{owner}: {name} must be a QuantLinear without bias, got {layer}")
    if len({id(m) for m in layers}) != len(layers) or len({id(m.weight) for m in layers}) != len(layers):
        raise ValueError(f"{owner}: {', '.join(names)} must be distinct layers with distinct weights")
    if len({(m.recipe, m.backend) for m in layers}) != 1:
        raise ValueError(f"{owner}: {', '.join(names)} must share one recipe and GEMM backend")
    if same_input and len({m.in_features for m in layers}) != 1:
        raise ValueError(f"{owner}: {', '.join(names)} must read inputs of one width, "
                         f"got {[m.in_features for m in layers]}")
    why = why_not_shared(layers[0].recipe, layers[0].backend)
    if why is not None:
        name = layers[0].recipe.name
        raise ValueError(f"{owner}: recipe {name} cannot share the input's quantization: {why}")


def hooked(m: torch.nn.Module) -> bool:
    """Whether calling m's forward would run hooks of m's own (DeepSpeed ZeRO-3's among them, which
    gather a partitioned weight in its layer's pre-forward hook): the shared and fused paths never
    call their layers' forward, so such layers run on their own, and convert_model leaves a module
    with hooks as it is (replacing it would drop them)."""
    return bool(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        or any(getattr(p, "ds_id", None) is not None for p in m.parameters(recurse=False))
    )


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)


def runs_shared(layers: list[QuantLinear], x: torch.Tensor) -> bool:
    """Whether a call on x runs the shared path (else each layer on its own): with grad, every
    weight trainable, telemetry off, no hooks (`hooked`, nor global module hooks), a non-empty
    float input."""
    return (torch.is_grad_enabled() and x.numel() > 0 and x.dtype.is_floating_point and not _global_hooks()
            and all(m.weight.requires_grad and m.observer is None and not hooked(m) for m in layers))


class QuantAttention(Attention):
    """lowbit.nn.llama.Attention whose q, k and v projections (fp8 delayed-scaling QuantLinears)
    share their input's quantization (module docstring); built by convert_model from an Attention,
    keeping its layers, Parameters, buffers and state-dict names."""

    def __init__(self, attn: Attention) -> None:
        torch.nn.Module.__init__(self)
        if hooked(attn):
            raise ValueError("QuantAttention: the Attention has hooks, which replacing it would drop; "
                             "convert the model before registering hooks")
        layers = [attn.wq, attn.wk, attn.wv]
        check_layers("QuantAttention", layers, ["wq", "wk", "wv"])
        # Everything Attention.forward may read, taken over from `attn` (not rebuilt from a config):
        # plain attributes, its layers, any direct parameters and buffers.
        for name, value in vars(attn).items():
            if not name.startswith("_"):
                setattr(self, name, value)
        for name, child in attn.named_children():
            setattr(self, name, child)
        for name, p in attn.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in attn.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in attn._non_persistent_buffers_set)
        shared_input_function(attn.wq.recipe, attn.wq.backend, 3)  # now, not while Dynamo traces

    def __setstate__(self, state: dict) -> None:
        # Unpickled (or deep-copied): build the Function class now, not while Dynamo traces.
        super().__setstate__(state)
        shared_input_function(self.wq.recipe, self.wq.backend, 3)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layers = [self.wq, self.wk, self.wv]
        x = autocast_input(x)  # as each layer would (the fallback's layers then cast nothing)
        if not runs_shared(layers, x):
            return super().project_qkv(x)
        fn = shared_input_function(self.wq.recipe, self.wq.backend, 3)
        keys = tuple(m.history_key for m in layers)
        weights, hists = (m.weight for m in layers), (m.amax_history for m in layers)
        fresh, pre = prequantized_weights(layers)
        return fn.apply(x, x.requires_grad, keys, fresh, *weights, *hists, *pre)
