"""The residual add and RMSNorm before a shared-input fp8_delayed pair, fused with it in compiled graphs.

In a Llama block each RMSNorm reads the residual stream right after an add (`x = x + attention(..)`),
and its bf16 output is the input of q/k/v (or w1/w3), which `lowbit::quantize_shared_input_pair_delayed`
quantizes once. Inductor fuses the add and the norm into one kernel that writes the new residual
(fp32) and y (bf16); the pair kernel then reads y back and writes X's and X^T's codes. This module
adds an Inductor post-grad rewrite (run by lowbit.nn.gradient_cast_fold's pass) of that pattern,

    add(a, b) -> pow 2 -> mean(-1) -> + eps -> rsqrt -> mul(add, rsqrt) -> mul(w) -> bf16 -> views
      -> quantize_shared_input_pair_delayed

into `lowbit::add_rms_norm_pair_delayed(a, b, w, eps, ...)`, whose kernels (lowbit/kernels/
_norm_pair_triton.py) write the residual, rstd (which the backward graph reads) and the codes
without y ever reaching memory. The codes, scales and histories are the pair's for that y; y
itself is the norm computed by that kernel (sum of squares in its own order, a correctly rounded
square root and division), so it may differ from Inductor's kernel in the last bit of rstd, as
two compilations of the norm may. Off CUDA, or for formats the kernels do not take, the op runs the
same steps in torch and the pair's own path.

LOWBIT_FOLD_NORM_PAIR=0 leaves graphs as they are.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from lowbit.env_flags import env_flag

OP = "lowbit::add_rms_norm_pair_delayed"
ENABLED = env_flag("LOWBIT_FOLD_NORM_PAIR", True)
_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}

# Rewrites made so far in this process (tests read it to see that the pass ran).
FOLDED = [0]
_registered = False


def reference(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """(s, rstd, y) of the fused op in torch: s = a + b, rstd = 1 / sqrt(mean(s^2) + eps) per row
    ([M, 1]), y = ((s * rstd) * w) in bf16."""
    s = a.float() + b.float()
    rstd = 1.0 / torch.sqrt(s.square().mean(-1, keepdim=True) + eps)
    return s, rstd, ((s * rstd) * w.float()).to(torch.bfloat16)


def _direct(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, fmt: str, fmt_t: str) -> bool:
    # The fused kernels on CUDA (tests run `fused` itself on the CPU, in Triton's interpreter).
    from lowbit.kernels._norm_pair_triton import MAX_WIDTH
    from lowbit.kernels.quantize import triton_available

    return (triton_available() and a.is_cuda and fmt == fmt_t and fmt in _FP8 and a.dtype == torch.float32
            and w.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
            and b.is_floating_point() and 2 <= a.shape[1] <= MAX_WIDTH)


def register_op() -> None:
    """Register `lowbit::add_rms_norm_pair_delayed` once (lowbit.nn.gradient_cast_fold.install)."""
    global _registered
    if _registered:
        return
    from lowbit.nn import quant_shared_input as qsi
    from lowbit.nn.quant_linear_traced import _delayed_pair, _fake_pair

    @torch.library.custom_op(OP, mutates_args=("hist", "mirrors"))
    def add_rms_norm_pair_delayed(
        a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float, hist: torch.Tensor,
        mirrors: list[torch.Tensor], fmt: str, fmt_t: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # (s, rstd, then quantize_shared_input_pair_delayed's outputs for y), a and b M x D.
        if _direct(a, b, w, fmt, fmt_t):
            out = fused(a, b, w, eps, hist, fmt)
        else:
            s, rstd, y = reference(a, b, w, eps)
            out = (s, rstd, *_delayed_pair(y, hist, fmt, fmt_t, qsi.X_ROW, qsi.XT_ROW))
        for m in mirrors:  # the other layers reading y record what `hist` recorded
            m[qsi.X_ROW].copy_(hist[qsi.X_ROW])
            m[qsi.XT_ROW].copy_(hist[qsi.XT_ROW])
        return out

    @add_rms_norm_pair_delayed.register_fake
    def _(a, b, w, eps, hist, mirrors, fmt, fmt_t):  # noqa: ANN001, ANN202
        m, d = a.shape
        y = a.new_empty((m, d), dtype=torch.bfloat16)
        pair = _fake_pair(y, fmt, "tensor", fmt_t, "tensor", True, True)
        return (a.new_empty((m, d), dtype=torch.float32), a.new_empty((m, 1), dtype=torch.float32), *pair)

    _registered = True


def fused(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float, hist: torch.Tensor,
          fmt: str) -> tuple[torch.Tensor, ...]:
    """The op's kernel path (no mirrors): (s, rstd, X codes, scale, X^T codes, scale) for fp32 a,
    float b (M x D, contiguous), fp32 w, recording y's amax in `hist`'s X and X^T rows."""
    from lowbit.kernels._norm_pair_triton import launch_norm_pair
    from lowbit.kernels._pair_quantize_triton import delayed_words, launch_roll
    from lowbit.nn.quant_shared_input import X_ROW, XT_ROW
    from lowbit.quant.formats import get_format

    m, d = a.shape
    dev = a.device
    s = torch.empty((m, d), dtype=torch.float32, device=dev)
    rstd = torch.empty((m, 1), dtype=torch.float32, device=dev)
    data = torch.empty((m, d), dtype=torch.uint8, device=dev)
    data_t = torch.empty((d, m), dtype=torch.uint8, device=dev)
    scale = torch.empty((1, 1), dtype=torch.float32, device=dev)
    scale_t = torch.empty((1, 1), dtype=torch.float32, device=dev)
    parts, rec = delayed_words(dev)
    launch_norm_pair(a, b, w.contiguous(), eps, get_format(fmt), 0 if fmt == "fp8_e4m3" else 1, hist[X_ROW],
                     s, rstd, data, data_t, scale, scale_t, parts, rec)
    launch_roll(rec, hist[X_ROW], hist[XT_ROW])
    dt = _FP8[fmt]
    return s, rstd, data.view(dt), scale.reshape(()), data_t.view(dt), scale_t.reshape(())


def _max_width() -> int:
    # Rows the fused kernels take (0 without Triton: no rewrite).
    try:
        from lowbit.kernels._norm_pair_triton import MAX_WIDTH
    except ImportError:
        return 0
    return MAX_WIDTH


def _call(node: Any, target: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target


def _only_user(node: torch.fx.Node, user: torch.fx.Node) -> bool:
    return len(node.users) == 1 and user in node.users


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _pair_call(q: torch.fx.Node, op: Any) -> tuple[Any, str, str] | None:
    """(x, fmt, fmt_t) of a shared-input pair node. Custom post-grad passes run before Inductor
    re-inplaces mutations, so the mutating op stands there inside auto_functionalized_v2."""
    hop = getattr(torch.ops.higher_order, "auto_functionalized_v2", None)
    if hop is not None and _call(q, hop) and q.args[0] is op and not q.args[1:]:
        return q.kwargs.get("x"), q.kwargs.get("fmt"), q.kwargs.get("fmt_t")
    return None


def _match(q: torch.fx.Node, x: Any, fmt: str, fmt_t: str) -> dict | None:
    """The pattern's nodes ending at the shared-input pair `q` reading `x` (see the module
    docstring), or None."""
    aten, prims = torch.ops.aten, torch.ops.prims
    if fmt != fmt_t or fmt not in _FP8:
        return None
    from lowbit.nn.gradient_cast_fold import _view_like  # the views the cast fold walks through too

    views, cur, user = [], x, q
    while isinstance(cur, torch.fx.Node) and _view_like(cur) and _only_user(cur, user):
        views.append(cur)
        cur, user = cur.args[0], cur
    cast = cur
    if not (_call(cast, prims.convert_element_type.default) and cast.args[1] == torch.bfloat16
            and _only_user(cast, user)):
        return None
    mul_w = cast.args[0]
    if not (_call(mul_w, aten.mul.Tensor) and _only_user(mul_w, cast)):
        return None
    mul_r, w = mul_w.args
    wv = _val(w)
    if not (isinstance(wv, torch.Tensor) and wv.dtype == torch.float32 and wv.dim() == 1):
        return None
    if not (_call(mul_r, aten.mul.Tensor) and _only_user(mul_r, mul_w)):
        return None
    add, rsqrt = mul_r.args
    if not _call(rsqrt, aten.rsqrt.default):
        return None
    add_eps = rsqrt.args[0]
    if not (_call(add_eps, aten.add.Tensor) and _only_user(add_eps, rsqrt)
            and isinstance(add_eps.args[1], float) and not add_eps.kwargs):
        return None
    mean = add_eps.args[0]
    if not (_call(mean, aten.mean.dim) and _only_user(mean, add_eps) and not mean.kwargs):
        return None
    keep = len(mean.args) > 2 and mean.args[2] is True
    if not (keep and list(mean.args[1]) in ([-1], [_val(mean.args[0]).dim() - 1])):
        return None
    pow_ = mean.args[0]
    if not (_call(pow_, aten.pow.Tensor_Scalar) and pow_.args[0] is add and pow_.args[1] == 2
            and _only_user(pow_, mean)):
        return None
    if not (_call(add, aten.add.Tensor) and len(add.args) == 2 and not add.kwargs):
        return None
    a, b = add.args
    av, bv, sv = _val(a), _val(b), _val(add)
    if not all(isinstance(v, torch.Tensor) for v in (av, bv, sv)):
        return None
    if not (av.dtype == torch.float32 and bv.is_floating_point() and av.shape == bv.shape == sv.shape
            and sv.dtype == torch.float32 and av.is_contiguous() and bv.is_contiguous()
            and wv.shape[0] == sv.shape[-1] and 2 <= sv.shape[-1] <= _max_width()):
        return None
    return dict(q=q, views=views, cast=cast, mul_w=mul_w, mul_r=mul_r, rsqrt=rsqrt, add_eps=add_eps,
                mean=mean, pow=pow_, add=add, a=a, b=b, w=w, eps=add_eps.args[1])


def _fake(x: Any) -> Any:
    # A node argument as its fake value (lists element by element), for running an op on them.
    if isinstance(x, (list, tuple)):
        return type(x)(_fake(i) for i in x)
    return x.meta["val"] if isinstance(x, torch.fx.Node) else x


def fold_norm_pairs(graph: torch.fx.Graph) -> int:
    """Rewrite each add + RMSNorm + bf16 cast feeding only a shared-input fp8 pair (its views and
    cast used once, the add and rsqrt free to have other users) into the fused op; returns how many
    were rewritten."""
    from torch._guards import detect_fake_mode

    if not hasattr(torch.ops.lowbit, "quantize_shared_input_pair_delayed"):
        return 0
    register_op()
    op = torch.ops.lowbit.quantize_shared_input_pair_delayed.default
    fused_op = torch.ops.lowbit.add_rms_norm_pair_delayed.default
    aten = torch.ops.aten
    count = 0
    hop = getattr(torch.ops.higher_order, "auto_functionalized_v2", None)
    for q in list(graph.nodes):
        call = _pair_call(q, op)
        if call is None:
            continue
        p = _match(q, *call)
        if p is None or not all(_call(u, operator.getitem) for u in q.users):
            continue
        # The residual and rstd are read later through the op's outputs: every other reader must
        # come after it in the graph.
        order = {n: i for i, n in enumerate(graph.nodes)}
        inner = {p["pow"], p["mul_r"]}
        if any(order[u] < order[q] for u in (*p["add"].users, *p["rsqrt"].users) if u not in inner):
            continue
        sv, rv = _val(p["add"]), _val(p["rsqrt"])
        d = sv.shape[-1]
        m = sv.numel() // d

        def node(target: Any, args: tuple, val: Any, meta: dict, kwargs: dict | None = None) -> torch.fx.Node:
            n = graph.call_function(target, args, kwargs or {})
            n.meta.update(meta)
            n.meta.pop("eager_input_vals", None)  # the pair's arguments, not these
            n.meta["val"] = val
            return n

        with graph.inserting_before(q):
            a2 = node(aten.reshape.default, (p["a"], [m, d]), _val(p["a"]).reshape(m, d), p["add"].meta)
            b2 = node(aten.reshape.default, (p["b"], [m, d]), _val(p["b"]).reshape(m, d), p["add"].meta)
            # The same mutable arguments (hist, mirrors) and bases as the pair's; its outputs come
            # from the operator itself, run on the graph's fake tensors: six, then the bases.
            kw = {k: v for k, v in q.kwargs.items() if k != "x"}
            kw.update(a=a2, b=b2, w=p["w"], eps=p["eps"])
            with detect_fake_mode([a2.meta["val"]]):
                outs = tuple(hop(fused_op, **{k: _fake(v) for k, v in kw.items()}))
            fused = node(hop, (fused_op,), outs, q.meta, kw)
            items = [node(operator.getitem, (fused, i), outs[i], q.meta) for i in range(len(outs))]
            s_view = node(aten.reshape.default, (items[0], list(sv.shape)), outs[0].reshape(sv.shape),
                          p["add"].meta)
            r_view = node(aten.reshape.default, (items[1], list(rv.shape)), outs[1].reshape(rv.shape),
                          p["rsqrt"].meta)
        for u in list(q.users):  # the pair's outputs (and bases) sit two places further on
            u.replace_all_uses_with(items[2 + u.args[1]])
            graph.erase_node(u)
        graph.erase_node(q)
        for dead in (*p["views"], p["cast"], p["mul_w"], p["mul_r"]):
            graph.erase_node(dead)
        p["rsqrt"].replace_all_uses_with(r_view)
        graph.erase_node(p["rsqrt"])
        for dead in (p["add_eps"], p["mean"], p["pow"]):
            graph.erase_node(dead)
        p["add"].replace_all_uses_with(s_view)
        graph.erase_node(p["add"])
        count += 1
    FOLDED[0] += count
    return count
