"""QuantLinear's path inside torch.compile: the layer traced into the graph, no graph break.

Under torch.compile the eager path (lowbit.nn.quant_linear) is a graph break: it draws seeds and
costs host time on every call, and a model has hundreds of these layers, each break
cutting Inductor's fusion at the layer's edges. Recipes that need no host state (nearest
rounding, no Hadamard signs, fp8 with per-tensor or per-row scales, or delayed scaling of
per-tensor scales; `why_not_traced`) are traced instead:
  - each operand pair (X and X^T, W and W^T, dY and dY^T) is quantized by one custom op,
    `lowbit::quantize_operand_pair`, whose body is the eager path's own
    lowbit.quant.gemm.prepare_operand_pair (lowbit.kernels' fused pair quantizer on CUDA, the
    reference elsewhere), or on CUDA for fp8 tensor scaling the same amax and pair kernels
    launched directly (lowbit.kernels.pair_quantize_op: less host time per call). So the compiled
    layer's codes are the eager layer's, bit for bit. (Letting Inductor compile the reference
    quantizer instead was measured slower on the H100, and its division by the constant fp8 max
    differs from IEEE division in the last bit of the scale.)
    With LOWBIT_TRITON_OP=1 the fp8 tensor-scaled pair on CUDA is `lowbit::fp8_tensor_pair`
    instead, a `torch.library.triton_op` around the same kernels, which Inductor launches from its
    generated code without any Python per call: a lone 4096 x 4096 layer at 8192 tokens went from
    0.43x to 0.75-0.84x BF16 (host-bound). Off by default because a model lost by it (1b, H100,
    run 49: 195.8 against 187.3 ms of GPU time per step): AOTAutograd's CSE merges the opaque op's
    identical calls (q/k/v and gate/up quantize the same X once), but not triton kernel calls,
    whose output buffers are fresh `empty`s, so those pairs ran 3 and 2 times.
  - delayed scaling (fp8_delayed): X's and W's pairs are `lowbit::quantize_operand_pair_delayed`,
    given the layer's amax-history buffer and the two operands' rows, and dY's pair is
    `lowbit::quantize_gradient_pair_delayed`. Their body is the eager path's prepare_operand_pair
    with those histories (on CUDA, when both sides are made, the same kernels launched directly:
    pair_quantize_op.fp8_tensor_pair_delayed_direct), so the choice of amax (the history's max,
    the tensor's own while the history is all zeros) and the recording happen on the device, in
    the pair kernels on CUDA: no host state, no sync, the same in CUDA graphs. The forward op
    declares that it writes the buffer (AOTAutograd then keeps every call, in order, like
    BatchNorm's running statistics). The
    backward op finds the buffer through the layer's `history_key` (`history_owner`) and writes
    it without declaring it: declared, AOTAutograd would have to functionalize a buffer mutated in
    the backward graph, and as a saved tensor the buffer would reach backward through saved-tensor
    hooks (activation offloading), which may hand over a copy. Each backward op is also given a
    tensor its own forward call saved (`token`), so that two calls of one layer in a graph are
    never merged by CSE; the backward ops of such calls may run in another order than eager
    mode's, which changes which of them sees the other's amax. Known limits: the key is an int
    Dynamo specializes on, so compiling each block separately recompiles once per block (past
    torch's recompile limit the rest run eagerly, or fullgraph=True fails); compile the whole
    model, as the trainer does. Under torch.utils.checkpoint inside a compiled model the
    partitioner recomputes the forward op in backward, from the history the forward already
    recorded into (X^T then gets another scale than X had), and a call between that forward and
    its backward makes autograd refuse the backward; eager layers are not recomputed. The
    registry holds layers weakly: a layer must outlive its backward.
  - the GEMMs (torch._scaled_mm on CUDA, the fp32 emulation elsewhere) are traced as they are.
As in eager mode only the quantized X^T and W^T are saved for backward.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from typing import TYPE_CHECKING

import torch

from lowbit.env_flags import env_flag
from lowbit.kernels import pair_quantize_op
from lowbit.kernels.quantize import triton_available
from lowbit.quant.gemm import (
    AmaxHistory,
    Operand,
    OperandPlan,
    _emulate,
    _finish,
    _scaled_mm,
    _scaled_mm_ok,
    prepare_operand_pair,
)
from lowbit.quant.qtensor import QTensor
from lowbit.quant.quantize import QuantSpec
from lowbit.quant.recipes import GEMMS, GemmSpec, Recipe

if TYPE_CHECKING:
    from lowbit.nn.quant_linear import QuantLinear

# LOWBIT_TRITON_OP=1: the fp8 tensor pair as a triton_op (module docstring: for host-bound runs).
USE_TRITON_OP = env_flag("LOWBIT_TRITON_OP", False)
TRACED_BACKENDS = ("auto", "emulate", "reference", "scaled_mm")
_FP8_FORMATS = ("fp8_e4m3", "fp8_e5m2")


def why_not_traced(recipe: Recipe, backend: str = "auto") -> str | None:
    """Why a layer with this recipe and GEMM backend runs eagerly under torch.compile (None: traced)."""
    if backend not in TRACED_BACKENDS:
        return f"backend={backend!r} is a registered kernel backend"
    for g in GEMMS:
        gemm: GemmSpec = getattr(recipe, g)
        if gemm.hadamard or gemm.bit_split or gemm.leverage_sampling:
            return f"{g}: Hadamard rotation, bit split or leverage sampling draw per-call seeds"
        for spec in (gemm.a, gemm.b):
            if (spec is None or spec.fmt not in _FP8_FORMATS or spec.block not in ("tensor", "row")
                    or spec.scale != "fp32"):
                return f"{g}: {spec} is not fp8 with per-tensor or per-row fp32 scales"
            if spec.rounding != "nearest":
                return f"{g}: stochastic rounding draws per-call seeds"
            if recipe.amax_history > 0 and spec.block != "tensor":
                return f"{g}: delayed scaling of {spec} (per-tensor scales only)"
    return None


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would return for x: the autocast dtype when autocast is on."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x as nn.Linear computes with it: cast to the autocast dtype when autocast is on (as TE and
    torchao also do before quantizing). The quantized layers take their input through this, so an
    fp32 activation (the residual stream's RMSNorm output) is quantized from, and its gradient
    returned in, bf16: half the bytes of fp32 on both sides, and the cast's own backward (fused by
    Inductor into RMSNorm's) widens the gradient again."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(dev)
        if x.dtype != dtype:
            return x.to(dtype)
    return x


def traced_quant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: QuantLinear
) -> torch.Tensor:
    """The layer's output through its recipe's traced Function (the caller checked `why_not_traced`)."""
    grad = torch.is_grad_enabled()
    need_wgrad, need_dgrad = grad and weight.requires_grad, grad and x.requires_grad
    delayed = layer.recipe.amax_history > 0
    hist = layer.amax_history if delayed else None
    key = layer.history_key if delayed else -1
    fn = traced_function(layer.recipe, layer.backend)
    return fn.apply(x, weight, bias, hist, key, need_wgrad, need_dgrad, *prequantized_weights([layer])[1])


# The buffers of a weight whose fp8 pair the optimizer step writes (lowbit.trainer.weight_pair_step),
# in the order the traced Functions take them.
WEIGHT_PAIR_BUFFERS = ("weight_pair_codes", "weight_pair_scale", "weight_pair_codes_t", "weight_pair_scale_t")


def prequantized_weights(layers: list[QuantLinear]) -> tuple[tuple[bool, ...], tuple[torch.Tensor, ...]]:
    """Which of `layers` take their weight's pair from the last optimizer step (their
    `weight_pair_fresh`, a plain bool that Dynamo guards on: one compiled graph for each value),
    and those layers' WEIGHT_PAIR_BUFFERS, in order."""
    fresh = tuple(bool(getattr(m, "weight_pair_fresh", False)) for m in layers)
    return fresh, tuple(getattr(m, b) for m, f in zip(layers, fresh) if f for b in WEIGHT_PAIR_BUFFERS)


def weight_pairs(weights: tuple[torch.Tensor, ...], fresh: tuple[bool, ...], pre: tuple[torch.Tensor, ...],
                 hists: tuple[torch.Tensor, ...], spec: QuantSpec, spec_t: QuantSpec | None,
                 ) -> list[tuple[QTensor, QTensor | None]]:
    """(W, W^T) of each weight for fprop and dgrad (spec_t None: no W^T): the optimizer step's
    pair where `fresh` says so (`pre` holds those, 4 tensors each), else quantized now on the
    weight's history rows (delayed scaling)."""
    out, k = [], 0
    for w, f, h in zip(weights, fresh, hists):
        if f:
            d, s, d_t, s_t = pre[4 * k: 4 * k + 4]
            k += 1
            q_t = None if spec_t is None else _saved(d_t, s_t, spec_t, w.dtype)
            out.append((_saved(d, s, spec, w.dtype), q_t))
        else:
            out.append(_quantize_pair(w, spec, spec_t, h, (_row("fprop", 2), _row("dgrad", 2))))
    return out


_FUNCTIONS: dict[tuple[Recipe, str], type[torch.autograd.Function]] = {}


def traced_function(recipe: Recipe, backend: str) -> type[torch.autograd.Function]:
    """The autograd Function of the traced path for one (recipe, backend).

    One class per pair, whose forward/backward close over them: apply() then takes only tensors
    and bools, the arguments every supported torch's Dynamo traces (2.11's did not trace a
    Recipe passed to apply). QuantLinear makes its class when
    it is built; a class first made while Dynamo traces costs a graph break.
    """
    _register_op()
    if USE_TRITON_OP and triton_available():
        pair_quantize_op.register()
    key = (recipe, backend)
    if key not in _FUNCTIONS:

        def forward(ctx, x, weight, bias, hist, key: int, need_wgrad: bool, need_dgrad: bool, *pre):  # noqa: ANN001
            return _forward(recipe, backend, ctx, x, weight, bias, hist, key, need_wgrad, need_dgrad, pre)

        def backward(ctx, grad_out):  # noqa: ANN001
            return _backward(recipe, backend, ctx, grad_out)

        methods = dict(forward=staticmethod(forward), backward=staticmethod(backward))
        _FUNCTIONS[key] = type(f"_Traced_{recipe.name}", (torch.autograd.Function,), methods)
    return _FUNCTIONS[key]


_FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_OP = "lowbit::quantize_operand_pair"
_OP_DELAYED = "lowbit::quantize_operand_pair_delayed"
_OP_DELAYED_BWD = "lowbit::quantize_gradient_pair_delayed"
_op_registered = False


@functools.cache
def _plan(fmt: str, block: str, want: bool) -> OperandPlan | None:
    # The op's operand plans, built once per format: they hold no state (no history, observer or
    # seed), and building them (QuantSpec validation) is host time on every call.
    return OperandPlan(QuantSpec(fmt, block), GemmSpec(), 0, 1) if want else None


def _register_op() -> None:
    """Register `lowbit::quantize_operand_pair` once (lazily: `import lowbit.nn` stays light)."""
    global _op_registered
    if _op_registered:
        return

    @torch.library.custom_op(_OP, mutates_args=())
    def quantize_operand_pair(
        x: torch.Tensor,
        amax: torch.Tensor | None,
        fmt: str,
        block: str,
        fmt_t: str,
        block_t: str,
        want: bool,
        want_t: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.is_cuda and _direct_pair(x, amax, fmt, block, fmt_t, block_t, want, want_t):
            return pair_quantize_op.fp8_tensor_pair_direct(x, fmt)
        plans = (_plan(fmt, block, want), _plan(fmt_t, block_t, want_t))
        return _flat_pair(x, prepare_operand_pair(x, *plans, amax=amax))

    @quantize_operand_pair.register_fake
    def _(x, amax, fmt, block, fmt_t, block_t, want, want_t):  # noqa: ANN001, ANN202
        return _fake_pair(x, fmt, block, fmt_t, block_t, want, want_t)

    # Scale by and record into hist's rows `row` and `row_t` (-1: that side not made).
    @torch.library.custom_op(_OP_DELAYED, mutates_args=("hist",))
    def quantize_operand_pair_delayed(
        x: torch.Tensor, hist: torch.Tensor, fmt: str, fmt_t: str, row: int, row_t: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _delayed_pair(x, hist, fmt, fmt_t, row, row_t)

    @quantize_operand_pair_delayed.register_fake
    def _(x, hist, fmt, fmt_t, row, row_t):  # noqa: ANN001, ANN202
        return _fake_pair(x, fmt, "tensor", fmt_t, "tensor", row >= 0, row_t >= 0)

    # The same for dY in backward, on the history of layer `owner`, written without declaring it;
    # `token` only ties the call to its forward call (module docstring).
    @torch.library.custom_op(_OP_DELAYED_BWD, mutates_args=())
    def quantize_gradient_pair_delayed(
        g: torch.Tensor, owner: int, token: torch.Tensor, fmt: str, fmt_t: str, row: int, row_t: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _delayed_pair(g, history_owner(owner).amax_history, fmt, fmt_t, row, row_t)

    @quantize_gradient_pair_delayed.register_fake
    def _(g, owner, token, fmt, fmt_t, row, row_t):  # noqa: ANN001, ANN202
        return _fake_pair(g, fmt, "tensor", fmt_t, "tensor", row >= 0, row_t >= 0)

    _op_registered = True
    # The bf16 cast of an fp32 dY folded into its pair quantizer in compiled graphs.
    from lowbit.nn import gradient_cast_fold

    gradient_cast_fold.install()


def _delayed_pair(x: torch.Tensor, hist: torch.Tensor, fmt: str, fmt_t: str, row: int,
                  row_t: int) -> tuple[torch.Tensor, ...]:
    if x.is_cuda and _direct_delayed_pair(x, hist, fmt, fmt_t, row, row_t):
        return pair_quantize_op.fp8_tensor_pair_delayed_direct(x, fmt, hist[row], hist[row_t])
    def plan(f: str, i: int, role: int) -> OperandPlan | None:
        return None if i < 0 else OperandPlan(QuantSpec(f, "tensor"), GemmSpec(), 0, role,
                                              history=AmaxHistory(hist[i]))

    return _flat_pair(x, prepare_operand_pair(x, plan(fmt, row, 1), plan(fmt_t, row_t, 2)))


# Delayed-scaling layers by `history_key`: the backward op's way to the layer's history buffer.
_HISTORY_OWNERS: dict[int, weakref.ref] = {}
_history_keys = itertools.count()


def register_history_owner(layer: torch.nn.Module) -> int:
    """A new key under which `history_owner` finds `layer` (held weakly); QuantLinear takes one
    when built with a delayed-scaling recipe, and a new one when copied or unpickled."""
    key = next(_history_keys)
    _HISTORY_OWNERS[key] = weakref.ref(layer, lambda _ref, key=key: _HISTORY_OWNERS.pop(key, None))
    return key


def history_owner(key: int) -> torch.nn.Module:
    """The layer registered under `key` (register_history_owner)."""
    layer = _HISTORY_OWNERS.get(key)
    layer = layer() if layer is not None else None
    if layer is None:
        raise RuntimeError(f"no live delayed-scaling layer has history key {key}")
    return layer


def _flat_pair(x: torch.Tensor, ops: tuple) -> tuple[torch.Tensor, ...]:
    # (data, scale, data_t, scale_t) of prepare_operand_pair's operands; empty placeholders for a
    # side not asked for (custom ops return tensors).
    out: list[torch.Tensor] = []
    for op in ops:
        if op is None:
            out += [x.new_empty(0, dtype=torch.uint8), x.new_empty(0, dtype=torch.float32)]
        else:
            out += [op.parts[0].data, op.parts[0].scale]
    # Outputs of a custom op may not alias: the pair quantizer shares one tensor scale.
    if out[3].data_ptr() == out[1].data_ptr() and out[1].numel():
        out[3] = out[3].clone()
    return tuple(out)


def _fake_pair(x: torch.Tensor, fmt: str, block: str, fmt_t: str, block_t: str, want: bool,
               want_t: bool) -> tuple[torch.Tensor, ...]:
    r, c = x.shape
    out: list[torch.Tensor] = []
    for f, b, w, (rows, cols) in ((fmt, block, want, (r, c)), (fmt_t, block_t, want_t, (c, r))):
        if not w:
            out += [x.new_empty(0, dtype=torch.uint8), x.new_empty(0, dtype=torch.float32)]
            continue
        out.append(x.new_empty((rows, cols), dtype=_FP8_DTYPES[f]))
        out.append(x.new_empty(() if b == "tensor" else (rows,), dtype=torch.float32))
    return tuple(out)


def _direct_pair(x: torch.Tensor, amax: torch.Tensor | None, fmt: str, block: str, fmt_t: str,
                 block_t: str, want: bool, want_t: bool) -> bool:
    # The op's common case on CUDA (fp8 tensorwise training): both sides, one fp8 format, tensor
    # scales (fp32: why_not_traced) from x's own amax. Its kernels are launched without the generic
    # path's host work (fp8_tensor_pair_direct), or by Inductor with LOWBIT_TRITON_OP=1.
    return (
        want and want_t and amax is None and fmt == fmt_t and fmt in pair_quantize_op.FORMATS
        and block == block_t == "tensor" and x.dtype in pair_quantize_op.DTYPES
        and x.numel() > 0 and triton_available()
    )


def _direct_delayed_pair(x: torch.Tensor, hist: torch.Tensor, fmt: str, fmt_t: str, row: int,
                         row_t: int) -> bool:
    # The delayed ops' common case on CUDA: both sides, one fp8 format, the history buffer as
    # QuantLinear keeps it (fp32, contiguous, on x's device). Same kernels as the generic path.
    return (
        row >= 0 and row_t >= 0 and row != row_t and hist.dtype == torch.float32 and hist.is_contiguous()
        and hist.device == x.device and _direct_pair(x, None, fmt, "tensor", fmt_t, "tensor", True, True)
    )


def _quantize_pair(
    t: torch.Tensor,
    spec: QuantSpec | None,
    spec_t: QuantSpec | None,
    hist: torch.Tensor | None = None,
    rows: tuple[int, int] = (-1, -1),
    owner: tuple[int, torch.Tensor] | None = None,
) -> tuple[QTensor | None, QTensor | None]:
    """(t quantized along its last axis by `spec`, t^T by `spec_t`) through the custom op;
    delayed scaling from (and into) `rows`, one per side, of `hist` (forward) or of the history of
    `owner` = (history key, token) (backward; module docstring)."""
    a, b = spec or spec_t, spec_t or spec  # placeholders for a side not asked for
    # Tensor scaling: the op reads t's amax itself (on CUDA with lowbit.kernels' amax kernel, at
    # ~3 TB/s). Computed as graph ops instead, Inductor fused it into t's producer, which turned
    # those kernels into slower reductions: on the H100 (1b, fp8, docs/BENCHMARKS.md runs 50, 56)
    # Inductor's kernels took 12.7 ms more per step and the amax kernel takes 10.3 ms; alone,
    # Inductor's amax of a bf16 8192 x 14336 tensor took 438 us against our kernel's 76 us.
    want, want_t = spec is not None, spec_t is not None
    picked = (rows[0] if want else -1, rows[1] if want_t else -1)
    if hist is not None:
        d, s, d_t, s_t = torch.ops.lowbit.quantize_operand_pair_delayed(t, hist, a.fmt, b.fmt, *picked)
    elif owner is not None:
        d, s, d_t, s_t = torch.ops.lowbit.quantize_gradient_pair_delayed(t, *owner, a.fmt, b.fmt, *picked)
    elif USE_TRITON_OP and t.is_cuda and _direct_pair(t, None, a.fmt, a.block, b.fmt, b.block, want, want_t):
        d, d_t, s, _ = pair_quantize_op.fp8_tensor_pair(t, None, a.fmt)
        s_t = s
    else:
        d, s, d_t, s_t = torch.ops.lowbit.quantize_operand_pair(
            t, None, a.fmt, a.block, b.fmt, b.block, want, want_t
        )
    q = None if spec is None else QTensor(d, s, spec.format, spec.block, d.shape, 1, t.dtype)
    q_t = None if spec_t is None else QTensor(d_t, s_t, spec_t.format, spec_t.block, d_t.shape, 1, t.dtype)
    return q, q_t


def _gemm(
    a: QTensor,
    b: QTensor,
    gemm: GemmSpec,
    backend: str,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    oa, ob = Operand([a]), Operand([b])
    # gemm_operands' choice for the traced backends (why_not_traced), without its runtime
    # fallbacks: no try/except around cuBLAS and no registered Triton GEMM inside a traced graph.
    # cuBLAS for backend='auto' on CUDA and for 'scaled_mm' anywhere, else the fp32 emulation.
    cublas = backend == "scaled_mm" or (backend == "auto" and a.data.is_cuda)
    if cublas and _scaled_mm_ok(oa, ob, gemm):
        return _scaled_mm(oa, ob, gemm, out_dtype, bias)
    if backend == "scaled_mm":
        raise ValueError(
            f"backend='scaled_mm' cannot run {gemm} with shapes {tuple(a.shape)} x {tuple(b.shape)}"
        )
    return _finish(_emulate(oa, ob, gemm, 0), out_dtype, bias)


def _saved(
    data: torch.Tensor | None, scale: torch.Tensor | None, spec: QuantSpec, dtype: torch.dtype
) -> QTensor | None:
    # A QTensor saved for backward, rebuilt from its tensors: fp8 (one byte per element, never
    # packed), quantized along its last axis (the operands were 2-D, so axis 1).
    return None if data is None else QTensor(data, scale, spec.format, spec.block, data.shape, 1, dtype)


def _row(gemm: str, role: int) -> int:
    # The operand's row of QuantLinear.amax_history (QuantLinear.history: GEMMS × (A, B) order).
    return GEMMS.index(gemm) * 2 + role - 1


def _forward(recipe: Recipe, backend: str, ctx, x, weight, bias, hist, key: int, need_wgrad: bool,  # noqa: ANN001
             need_dgrad: bool, pre: tuple[torch.Tensor, ...] = ()):
    out_dtype = output_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, x.shape[-1])
        qx, x_t = _quantize_pair(x2, recipe.fprop.a, recipe.wgrad.b if need_wgrad else None,
                                 hist, (_row("fprop", 1), _row("wgrad", 2)))
        # pre: the pair the optimizer step wrote (hist None only without delayed scaling, never with pre)
        # (len(), not bool(): torch 2.11's Dynamo cannot take bool() of a tuple and breaks the graph)
        [(qw, w_t)] = weight_pairs((weight,), (len(pre) > 0,), pre, (hist,), recipe.fprop.b,
                                   recipe.dgrad.b if need_dgrad else None)
        y = _gemm(qx, qw, recipe.fprop, backend, out_dtype, bias)
    ctx.save_for_backward(
        None if x_t is None else x_t.data,
        None if x_t is None else x_t.scale,
        None if w_t is None else w_t.data,
        None if w_t is None else w_t.scale,
    )
    ctx.history_key, ctx.n_pre = key, len(pre)
    ctx.x_dtype, ctx.w_dtype, ctx.has_bias = x.dtype, weight.dtype, bias is not None
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _backward(recipe: Recipe, backend: str, ctx, grad_out):  # noqa: ANN001
    xt_data, xt_scale, wt_data, wt_scale = ctx.saved_tensors
    x_t = _saved(xt_data, xt_scale, recipe.wgrad.b, ctx.x_dtype)
    w_t = _saved(wt_data, wt_scale, recipe.dgrad.b, ctx.w_dtype)
    need_dx = ctx.needs_input_grad[0] and w_t is not None
    need_dw = ctx.needs_input_grad[1] and x_t is not None
    dx = dw = db = None
    with torch.autocast(grad_out.device.type, enabled=False):
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if need_dx or need_dw:  # (only the bias may need a gradient: then dY is not quantized)
            # Delayed scaling: the layer's history by its key, tied to this call by a tensor its
            # forward saved (module docstring).
            owner = None
            if ctx.history_key >= 0:
                owner = (ctx.history_key, xt_scale if xt_scale is not None else wt_scale)
            qg, qg_t = _quantize_pair(
                g2, recipe.dgrad.a if need_dx else None, recipe.wgrad.a if need_dw else None,
                rows=(_row("dgrad", 1), _row("wgrad", 1)), owner=owner,
            )
            if need_dx:
                dx = _gemm(qg, w_t, recipe.dgrad, backend, ctx.x_dtype)
                dx = dx.reshape(*grad_out.shape[:-1], dx.shape[-1])
            if need_dw:
                dw = _gemm(qg_t, x_t, recipe.wgrad, backend, ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0, dtype=torch.float32).to(ctx.w_dtype)
    return dx, dw, db, None, None, None, None, *([None] * ctx.n_pre)
