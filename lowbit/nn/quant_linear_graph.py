"""QuantLinear's kernels inside a compiled graph: the layer's forward and backward as two graph ops.

Used when the compiled model runs as CUDA graphs: the trainer selects the "opaque" form for
train.compile_mode=reduce_overhead or max_autotune on CUDA (`select_mode`);
LOWBIT_GRAPH_OPS=0|recorded|opaque overrides that. Otherwise off: without CUDA graphs the eager
layers were faster inside a compiled 1b model on the H100 (docs/BENCHMARKS.md, eighth and ninth
passes).

The fp8 tensor/row recipes are traced by lowbit.nn.quant_linear_traced. The others (MX, NVFP4,
int8/int4, fp8 blockwise, and any recipe with Hadamard signs or stochastic rounding) run eagerly
inside a compiled model: their per-call seeds are drawn on the host, and each layer is a graph
break whose Python (plans, checks, ~15 kernel launches) costs more host time than the GPU's work
(H100, mxfp4 1b: 498 ms wall against 338 ms of GPU time a step; docs/BENCHMARKS.md, run 65).

Here a layer's fwd is one op, `lowbit::qlinear_forward` (quantize X/X^T and W/W^T, the fprop
GEMM; X^T and W^T are returned for backward), and its bwd another, `lowbit::qlinear_backward`
(quantize dY/dY^T, the dgrad and wgrad GEMMs). Their bodies are the eager layer's own building
blocks (lowbit.quant.gemm.prepare_operand_pair and gemm_operands, with lowbit.kernels behind
them on CUDA). Two forms:
  - "recorded": on CUDA the ops are `torch.library.triton_op`s; their Python runs once, while the
    graph is traced, every kernel launch is recorded (lowbit.kernels.launch), and Inductor
    launches the kernels from its generated code. One compiled layer ran 1.1-1.3x faster than the
    eager layer (mxfp4 0.58x / 0.77x / 0.76x BF16 on the Llama-3-8B shapes), but a compiled 1b
    model had not reached its first step after 5 minutes: Inductor analyses and compiles each of
    its ~1300 recorded launches (the analysis is memoized, lowbit.kernels.launch; the rest is not).
  - "opaque": custom ops whose Python runs on every call (no graph break). The 1b model compiles
    in ~3 minutes. Replayed as CUDA graphs (torch.compile mode "reduce-overhead"), the Python runs
    only while a graph is recorded: mxfp4 1b trained at 0.66x BF16 against 0.56x with the eager
    layers, GPU-bound (335.8 ms of wall time a step for 334.0 of GPU time). Without CUDA graphs
    its step was 573 ms against the eager layers' 498.
Under TRITON_INTERPRET=1 (CPU tests) both are opaque custom ops running the same body: interpreted
kernels cannot be recorded.

Where X and X^T need no seed (`shares_input`: mxfp8, fp8_blockwise, int8, int4), the forward is two
ops instead: `lowbit::qlinear_input_pair` quantizes X and X^T from X alone, and
`lowbit::qlinear_forward_quantized` runs the rest. Layers that read one input (q/k/v, w1/w3) then
make identical input-pair calls, which AOTAutograd's common-subexpression pass merges, so X is
quantized and its X^T saved once per input rather than once per layer.

Seeds: a graph cannot draw from the layer's host generator, so the traced layer keeps a call
counter on the device (`QuantLinear.graph_calls`) and hashes (layer seed, rank, call, GEMM) into
the three GEMM seeds (`next_graph_seeds`), passed to the ops as an int64 table of every seed and
hash offset the layer's kernels use (lowbit.quant.rounding.seed_table); the kernels read their
offsets from it (lowbit.kernels.launch.seed_args). Given the same seeds, the ops' outputs are
the eager layer's bit for bit; the compiled and the eager layer draw different seed streams, and
the trainer's checkpoints save both the generator and this counter.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from lowbit.kernels.launch import shapes_only
from lowbit.kernels.quantize import interpret, triton_runs_on
from lowbit.nn import quant_linear_values as values
from lowbit.quant.formats import FORMATS
from lowbit.quant.gemm import Operand, OperandPlan, gemm_backends, gemm_operands, prepare_operand_pair
from lowbit.quant.qtensor import QTensor
from lowbit.quant.quantize import QuantSpec
from lowbit.quant.recipes import GEMMS, GemmSpec, Recipe
from lowbit.quant.rounding import DERIVED_STREAMS, DeviceSeed, lowbias32, lowbias32_int, seed_table
from lowbit.quant.scale_fold import FOLD_BLOCK

if TYPE_CHECKING:
    from lowbit.nn.quant_linear import QuantLinear

# Backends whose kernels launch through lowbit.kernels.launch (a user-registered backend may launch
# its own kernels directly, which a traced graph cannot record).
GRAPH_BACKENDS = ("auto", "emulate", "reference", "scaled_mm", "triton")
# LOWBIT_GRAPH_OPS (read at import; the trainer keeps the user's choice): "0" (the default unless
# the trainer selects another, `select_mode`) these recipes stay eager under torch.compile; "recorded"
# triton_ops on CUDA (Inductor launches the kernels); "opaque" custom ops whose Python runs per
# call, or once per CUDA-graph recording (module docstring).
MODES = ("0", "recorded", "opaque")
MODE = os.environ.get("LOWBIT_GRAPH_OPS", "0")
if MODE not in MODES:
    raise ValueError(f"LOWBIT_GRAPH_OPS={MODE!r}; valid choices: {', '.join(MODES)}")


def mode_from_env() -> str | None:
    """The mode the user chose by LOWBIT_GRAPH_OPS (None: unset); the trainer then uses it."""
    return os.environ.get("LOWBIT_GRAPH_OPS")


def select_mode(mode: str) -> None:
    """Use graph ops of this form from now on (`MODES`), in every QuantLinear built afterwards and
    every layer's next compiled call (layers read the module's mode when traced). Both forms can
    live in one process: each registers ops of its own names (`graph_ops`).

    The trainer selects "opaque" when the compiled model replays CUDA graphs: replayed as CUDA
    graphs the ops' Python no longer runs per call (H100, 1b mxfp4: 0.66x BF16 against the eager
    layers' 0.56x; docs/BENCHMARKS.md, ninth pass)."""
    global MODE
    if mode not in MODES:
        raise ValueError(f"graph-op mode {mode!r}; valid choices: {', '.join(MODES)}")
    MODE = mode


def _form(mode: str) -> str:
    # What `mode` registers: triton_ops only where kernels are recorded (CUDA), else custom ops.
    return "recorded" if mode == "recorded" and not interpret() else "opaque"


_PACKED = ("fp4_e2m1", "int4")


def why_not_graph(recipe: Recipe, backend: str = "auto") -> str | None:
    """Why a layer with this recipe and backend does not run as graph ops under torch.compile
    (None: it does, on a device where Triton runs; lowbit.nn.quant_linear_traced goes first)."""
    if MODE == "0":
        return "graph ops are off (mode '0': the trainer's choice without CUDA graphs; LOWBIT_GRAPH_OPS)"
    if backend not in GRAPH_BACKENDS:
        return f"backend={backend!r} is a user-registered GEMM backend"
    if recipe.amax_history > 0:
        return "delayed scaling is traced for per-tensor scales (quant_linear_traced), else eager"
    unquantized = [g for g in GEMMS if None in (getattr(recipe, g).a, getattr(recipe, g).b)]
    if unquantized:
        return f"{unquantized[0]}: an operand kept in high precision"
    return None


_RECIPES: dict[str, Recipe] = {}


def _layout_tag() -> str:
    # What decides the saved operands' shapes besides the recipe: X^T and W^T written folded (e4m3,
    # K bytes a row) or as codes (K/2). It is part of the key, so that a compiled graph cached on
    # disk (Inductor's FX graph cache, keyed by the graph) is not reused under the other layout.
    from lowbit.kernels import column_quantize, scale_fold

    return "|folded" if column_quantize.FOLD_ENABLED and scale_fold.ENABLED else ""


def recipe_key(recipe: Recipe) -> str:
    """The string the ops name `recipe` by (op arguments are tensors, numbers and strings)."""
    tag = _layout_tag()
    for key, r in _RECIPES.items():
        if r == recipe and key.endswith(tag) and (tag or "|" not in key):
            return key
    key = f"{recipe.name}#{len(_RECIPES)}{tag}"
    _RECIPES[key] = recipe
    return key


def next_graph_seeds(layer: QuantLinear) -> torch.Tensor:
    """The seed table (lowbit.quant.rounding.seed_table) of the layer's next call's three GEMM
    seeds (fprop, dgrad, wgrad; rows 0-2), on the device; advances the layer's call counter.

    One opaque op reads and advances the counter: with plain graph ops, AOTAutograd's partitioner
    may recompute the seeds in the backward graph from the counter, which the forward graph has
    advanced by then (seen on the H100: the backward's Hadamard signs then differed from the
    saved X^T's and W^T's)."""
    from lowbit.nn.quant_linear import _rank

    _register_seeds()
    # Per layer and rank (a Python int; the constant keeps layer 0 / rank 0 off the hash's fixed point 0).
    stream = lowbias32_int(layer.seed * 0x10001 + _rank() * 0x3F1 + 0x5EED)
    return torch.ops.lowbit.next_graph_seeds(layer.graph_calls, stream)


def _seeds_of(calls: torch.Tensor, stream: int) -> torch.Tensor:
    idx = calls * 3 + torch.arange(3, device=calls.device) + stream
    return seed_table(lowbias32(lowbias32(idx) + stream) & 0x7FFFFFFF)


# --- the ops ----------------------------------------------------------------------------------

# Op names per form: a process may register both (a "recorded" benchmark, then a CUDA-graph run).
_OP_NAMES = {
    "opaque": ("qlinear_forward", "qlinear_backward", "qlinear_input_pair", "qlinear_forward_quantized"),
    "recorded": (
        "qlinear_forward_recorded", "qlinear_backward_recorded", "qlinear_input_pair_recorded",
        "qlinear_forward_quantized_recorded",
    ),
}
_SEEDS = "lowbit::next_graph_seeds"
_ops: dict[str, tuple[torch._ops.OpOverloadPacket, ...]] = {}
_seeds_registered = False


def _plan(spec: QuantSpec, gemm: GemmSpec, seed: DeviceSeed, role: int, want: bool) -> OperandPlan | None:
    return OperandPlan(spec, gemm, seed, role) if want else None


def _flat(op: Operand | None, like: torch.Tensor) -> list[torch.Tensor]:
    # (data, scale, tensor scale) of a saved one-part operand; empty placeholders when absent.
    if op is None:
        return [like.new_empty(0, dtype=torch.uint8), like.new_empty(0), like.new_empty(0)]
    q = op.parts[0]
    return [q.data, q.scale, q.tensor_scale if q.tensor_scale is not None else like.new_empty(0)]


def _operand(
    data: torch.Tensor,
    scale: torch.Tensor,
    tscale: torch.Tensor,
    spec: QuantSpec,
    gemm: GemmSpec,
    rows: int,
    k: int,
    dtype: torch.dtype,
) -> Operand:
    # The saved operand rebuilt: `k` is the GEMM's K before the Hadamard's padding (prepare_operand
    # pads K to a multiple of the block, and a rotated operand dequantizes to fp32).
    if gemm.hadamard:
        k, dtype = k + (-k) % gemm.hadamard, torch.float32
    if data.dtype == torch.float8_e4m3fn and spec.fmt == "fp4_e2m1":
        # saved folded by the column quantizer (lowbit.kernels.column_quantize.column_fold_for):
        # e4m3 values with a scale a 1 x 128 chunk (scales a row) or a 128 x 128 tile
        block = FOLD_BLOCK if scale.shape[0] == rows else (FOLD_BLOCK, FOLD_BLOCK)
        return Operand([QTensor(data, scale, FORMATS["fp8_e4m3"], block, torch.Size((rows, k)), 1, dtype)])
    packed = spec.fmt in _PACKED and k % 2 == 0
    ts = tscale if tscale.numel() else None
    return Operand(
        [QTensor(data, scale, spec.format, spec.block, torch.Size((rows, k)), 1, dtype, packed, ts)]
    )


# The forward op's outputs: Y, then X^T's and W^T's (codes, scales, tensor scale).
_T = torch.Tensor
_Outputs = tuple[_T, _T, _T, _T, _T, _T, _T]
_Outputs6 = tuple[_T, _T, _T, _T, _T, _T]
_Outputs4 = tuple[_T, _T, _T, _T]


def _forward_body(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seeds: torch.Tensor,
    key: str,
    backend: str,
    need_wgrad: bool,
    need_dgrad: bool,
    out_dtype: torch.dtype,
) -> _Outputs:
    r = _RECIPES[key]
    s_f, s_d, s_w = (DeviceSeed(seeds, i) for i in range(3))
    a, x_t = prepare_operand_pair(
        x2, _plan(r.fprop.a, r.fprop, s_f, 1, True), _plan(r.wgrad.b, r.wgrad, s_w, 2, need_wgrad)
    )
    b, w_t = prepare_operand_pair(
        weight, _plan(r.fprop.b, r.fprop, s_f, 2, True), _plan(r.dgrad.b, r.dgrad, s_d, 2, need_dgrad)
    )
    y = gemm_operands(a, b, r.fprop, s_f, backend, out_dtype=out_dtype, bias=bias)
    return (y, *_flat(x_t, x2), *_flat(w_t, weight))


def shares_input(recipe: Recipe) -> bool:
    """Whether X's two operands (X for fprop, X^T for wgrad) need no seed: both rounded to nearest,
    no rotation and no bit split of X. Such layers quantize X in an op of its own that takes X alone
    (`_input_pair_body`), so that layers reading one input (q/k/v, w1/w3) make one identical call,
    which AOTAutograd's common-subexpression pass merges: X is quantized and saved once."""
    fp, wg = recipe.fprop, recipe.wgrad
    return (
        fp.a is not None and wg.b is not None and fp.a.rounding == wg.b.rounding == "nearest"
        and not fp.hadamard and not wg.hadamard and not fp.bit_split
    )


def _input_pair_body(x2: torch.Tensor, key: str, need_wgrad: bool, as_values: bool) -> _Outputs6:
    # X for fprop and X^T for wgrad, (codes, scales, tensor scale) each, for a `shares_input` recipe
    # (nearest rounding: the seed is not read). as_values (quant_linear_values.uses_values, decided
    # by the caller so that it is part of the traced graph, and of its cache key): X as bf16 values.
    r = _RECIPES[key]
    if as_values:  # X as bf16 values for the GEMM, X^T as codes
        if not need_wgrad:
            raise ValueError("as_values needs need_wgrad (X^T is saved from the same pass)")
        a16, x_t = values.pair(x2, r.fprop.a, r.wgrad.b, (True, False))
        return (a16, x2.new_empty(0), x2.new_empty(0), *_flat(Operand([x_t]), x2))
    a, x_t = prepare_operand_pair(
        x2, _plan(r.fprop.a, r.fprop, 0, 1, True), _plan(r.wgrad.b, r.wgrad, 0, 2, need_wgrad)
    )
    return (*_flat(a, x2), *_flat(x_t, x2))


def _forward_quantized_body(
    a_data: torch.Tensor,
    a_scale: torch.Tensor,
    a_tscale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seeds: torch.Tensor,
    key: str,
    backend: str,
    need_dgrad: bool,
    out_dtype: torch.dtype,
    x_dtype: torch.dtype,
) -> _Outputs4:
    # _forward_body from X already quantized by _input_pair_body: Y, then W^T's (codes, scales,
    # tensor scale).
    r = _RECIPES[key]
    if a_data.dtype == torch.bfloat16:  # X came as values (quant_linear_values): W likewise
        w16, w_t = values.pair(weight, r.fprop.b, r.dgrad.b, (True, False))
        y = values.matmul(a_data, w16, bias, out_dtype)
        return (y, *_flat(Operand([w_t]) if need_dgrad else None, weight))
    s_f, s_d = DeviceSeed(seeds, 0), DeviceSeed(seeds, 1)
    a = _operand(a_data, a_scale, a_tscale, r.fprop.a, r.fprop, a_data.shape[0], weight.shape[1], x_dtype)
    b, w_t = prepare_operand_pair(
        weight, _plan(r.fprop.b, r.fprop, s_f, 2, True), _plan(r.dgrad.b, r.dgrad, s_d, 2, need_dgrad)
    )
    y = gemm_operands(a, b, r.fprop, s_f, backend, out_dtype=out_dtype, bias=bias)
    return (y, *_flat(w_t, weight))


def _backward_body(
    g2: torch.Tensor,
    xt_data: torch.Tensor,
    xt_scale: torch.Tensor,
    xt_tscale: torch.Tensor,
    wt_data: torch.Tensor,
    wt_scale: torch.Tensor,
    wt_tscale: torch.Tensor,
    seeds: torch.Tensor,
    key: str,
    backend: str,
    need_dx: bool,
    need_dw: bool,
    tokens: int,
    in_features: int,
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
    as_values: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    r = _RECIPES[key]
    s_d, s_w = DeviceSeed(seeds, 1), DeviceSeed(seeds, 2)
    out_features = g2.shape[1]
    if as_values:  # dY and dY^T as bf16 values
        if not (need_dx and need_dw):
            raise ValueError("as_values needs both dX and dW (dY and dY^T come from one pass)")
        g16, gt16 = values.pair(g2, r.dgrad.a, r.wgrad.a, (True, True))
        w_t = _operand(wt_data, wt_scale, wt_tscale, r.dgrad.b, r.dgrad, in_features, out_features, w_dtype)
        x_t = _operand(xt_data, xt_scale, xt_tscale, r.wgrad.b, r.wgrad, in_features, tokens, x_dtype)
        dx = values.matmul(g16, values.dequantized(w_t.parts[0]), None, x_dtype)
        dw = values.matmul(gt16, values.dequantized(x_t.parts[0]), None, w_dtype)
        return dx, dw
    a, a_t = prepare_operand_pair(
        g2, _plan(r.dgrad.a, r.dgrad, s_d, 1, need_dx), _plan(r.wgrad.a, r.wgrad, s_w, 1, need_dw)
    )
    dx = dw = g2.new_empty(0)
    if need_dx:
        w_t = _operand(wt_data, wt_scale, wt_tscale, r.dgrad.b, r.dgrad, in_features, out_features, w_dtype)
        dx = gemm_operands(a, w_t, r.dgrad, s_d, backend, out_dtype=x_dtype)
        if dx.shape[1] != in_features:
            dx = dx[:, :in_features].contiguous()
    if need_dw:
        x_t = _operand(xt_data, xt_scale, xt_tscale, r.wgrad.b, r.wgrad, in_features, tokens, x_dtype)
        dw = gemm_operands(a_t, x_t, r.wgrad, s_w, backend, out_dtype=w_dtype)
    return dx, dw


def graph_ops(mode: str | None = None) -> tuple[torch._ops.OpOverloadPacket, torch._ops.OpOverloadPacket]:
    """The (forward, backward) ops of the form `mode` gives (default: the current mode's),
    registered on first use: "recorded" on CUDA is a pair of triton_ops, anything else a pair of
    opaque custom ops (under TRITON_INTERPRET=1 "recorded" is opaque too)."""
    return _ops_of(mode)[:2]


def input_ops(mode: str | None = None) -> tuple[torch._ops.OpOverloadPacket, torch._ops.OpOverloadPacket]:
    """The ops `shares_input` recipes run instead of the forward op, of the form `mode` gives:
    (X's pair alone from X, the forward from X's quantized operand)."""
    return _ops_of(mode)[2:]


def _ops_of(mode: str | None) -> tuple[torch._ops.OpOverloadPacket, ...]:
    # Every op of the form `mode` gives (default: the current mode's), registered on first use.
    form = _form(MODE if mode is None else mode)
    if form not in _ops:
        _register(form)
    return _ops[form]


def _register_seeds() -> None:
    global _seeds_registered
    if _seeds_registered:
        return
    from torch.library import custom_op

    @custom_op(_SEEDS, mutates_args=("calls",))
    def next_seeds(calls: torch.Tensor, stream: int) -> torch.Tensor:
        if triton_runs_on(calls):  # one kernel instead of ~24 tiny torch ops (same bits)
            from lowbit.kernels._graph_seeds_triton import graph_seed_table

            return graph_seed_table(calls, stream)
        seeds = _seeds_of(calls, stream)
        calls.add_(1)
        return seeds

    @next_seeds.register_fake
    def _(calls, stream):  # noqa: ANN001, ANN202
        return calls.new_empty((2, 3, DERIVED_STREAMS))

    _seeds_registered = True


def _register(form: str) -> None:
    """Define the forward and backward ops of one form: triton_ops where Triton kernels are
    recorded (CUDA), else opaque custom ops whose fake (shape) implementation runs the same body
    on fake tensors. Once recorded ops exist, every launch goes through wrap_triton
    (lowbit.kernels.launch.enable_recording), which outside a triton_op launches the kernel as
    before at a few microseconds more host time."""
    from torch.library import custom_op, triton_op

    recorded = form == "recorded"
    if recorded:
        from lowbit.kernels.launch import cache_kernel_analysis, enable_recording

        enable_recording()
        cache_kernel_analysis()
    define = (
        (lambda name, fn: triton_op(name, fn, mutates_args=()))
        if recorded
        else (lambda name, fn: custom_op(name, fn, mutates_args=()))
    )

    # The bodies themselves are the ops (their annotations give the schemas).
    names = _OP_NAMES[form]
    bodies = (_forward_body, _backward_body, _input_pair_body, _forward_quantized_body)
    for name, body in zip(names, bodies):
        op = define(f"lowbit::{name}", body)
        if not recorded:
            op.register_fake(_shapes_only(body))
    _register_seeds()
    _ops[form] = tuple(getattr(torch.ops.lowbit, name) for name in names)


def _shapes_only(body):  # noqa: ANN001, ANN202
    # An op's fake (shape) implementation: its body on fake tensors, launching no kernel.
    def fake(*args):  # noqa: ANN002, ANN202
        with shapes_only():
            return body(*args)

    return fake


def graph_quant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: QuantLinear
) -> torch.Tensor:
    """The layer's output through the graph ops (the caller checked `usable`)."""
    grad = torch.is_grad_enabled()
    need_wgrad, need_dgrad = grad and weight.requires_grad, grad and x.requires_grad
    seeds = next_graph_seeds(layer)
    fn = graph_function(layer.recipe, layer.backend)
    return fn.apply(x, weight, bias, seeds, need_wgrad, need_dgrad)


def usable(layer: QuantLinear, x: torch.Tensor) -> bool:
    """Whether this call runs as graph ops: the recipe allows it and Triton runs on x's device."""
    return why_not_graph(layer.recipe, layer.backend) is None and triton_runs_on(x)


_FUNCTIONS: dict[tuple[Recipe, str, str], type[torch.autograd.Function]] = {}


def graph_function(recipe: Recipe, backend: str) -> type[torch.autograd.Function]:
    """The autograd Function around the current mode's two ops for one (recipe, backend);
    QuantLinear makes it when built (a class first made while Dynamo traces costs a graph break)."""
    if backend not in gemm_backends():
        raise ValueError(f"unknown GEMM backend {backend!r}; valid choices: {', '.join(gemm_backends())}")
    form = _form(MODE)
    forward_op, backward_op = graph_ops(MODE)
    fkey = (recipe, backend, form)
    if fkey in _FUNCTIONS:
        return _FUNCTIONS[fkey]
    key = recipe_key(recipe)

    shared = shares_input(recipe)
    input_op, forward_quantized_op = input_ops(MODE)

    def forward(ctx, x, weight, bias, seeds, need_wgrad: bool, need_dgrad: bool):  # noqa: ANN001
        from lowbit.nn.quant_linear_traced import output_dtype

        out_dtype = output_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            if shared:  # X's pair in an op of its own, merged across layers that read one x
                as_values = need_wgrad and values.uses_values(recipe, x2)
                a_data, a_scale, a_tscale, *x_t = input_op(x2, key, need_wgrad, as_values)
                y, *w_t = forward_quantized_op(
                    a_data, a_scale, a_tscale, weight, bias, seeds, key, backend, need_dgrad, out_dtype,
                    x2.dtype,
                )
                saved = [*x_t, *w_t]
            else:
                y, *saved = forward_op(
                    x2, weight, bias, seeds, key, backend, need_wgrad, need_dgrad, out_dtype
                )
        ctx.save_for_backward(*saved, seeds)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.has_bias, ctx.need = bias is not None, (need_dgrad, need_wgrad)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    def backward(ctx, grad_out):  # noqa: ANN001
        *saved, seeds = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0] and ctx.need[0]
        need_dw = ctx.needs_input_grad[1] and ctx.need[1]
        db = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            as_values = need_dx and need_dw and values.uses_values(recipe, g2)
            dx, dw = backward_op(
                g2,
                *saved,
                seeds,
                key,
                backend,
                need_dx,
                need_dw,
                g2.shape[0],
                ctx.x_shape[-1],
                ctx.x_dtype,
                ctx.w_dtype,
                as_values,
            )
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = g2.sum(0, dtype=torch.float32).to(ctx.w_dtype)
        return (dx.reshape(ctx.x_shape) if need_dx else None, dw if need_dw else None, db, None, None, None)

    methods = dict(forward=staticmethod(forward), backward=staticmethod(backward))
    _FUNCTIONS[fkey] = type(f"_Graph_{form}_{recipe.name}", (torch.autograd.Function,), methods)
    return _FUNCTIONS[fkey]
