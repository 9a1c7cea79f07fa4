"""The bf16 cast of an fp32 gradient folded into its fp8_delayed pair quantizer, in compiled graphs.

In a Llama block the residual stream is fp32 (fp32 embeddings), while the layers writing into it
(attention's output projection, the feed-forward's down projection) return bf16 under autocast.
Autograd hands such a layer the residual's fp32 gradient cast to bf16, so the compiled backward
graph holds `quantize_gradient_pair_delayed(convert_element_type(g, bf16), ...)`: one pass reads g
(4 bytes an element) and writes the bf16 copy (2), and the pair kernel reads that copy back (2).
The 1b model's fp8_delayed step on the H100 spent 2.0 ms on those casts (docs/BENCHMARKS.md, run
188).

This module adds an Inductor post-grad pass that rewrites that pattern (the cast, then only views,
each used once, of a g that other nodes read too or that is the graph's input) into
`lowbit::quantize_gradient_pair_delayed_bf16(g, ...)`. Its pair kernel reads
the fp32 g and rounds each element to bf16 (round to nearest even, on the bits) before anything
else, so its codes, scales and recorded amax are bit for bit those of the cast's output; off CUDA
the op casts and runs the unfused body. Eager layers are not affected. The same pass also runs
lowbit.nn.norm_pair_fold's rewrite (the residual add and RMSNorm fused with the shared-input pair).

The pass is installed (`install`) when the traced ops are registered, as
torch._inductor.config.post_grad_custom_post_pass; a pass already set there runs first. It
leaves graphs as they are with LOWBIT_FOLD_GRAD_CAST=0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from lowbit.env_flags import env_flag
from lowbit.nn import norm_pair_fold

OP = "lowbit::quantize_gradient_pair_delayed_bf16"
ENABLED = env_flag("LOWBIT_FOLD_GRAD_CAST", True)

# Nodes a gradient may pass through between the cast and the quantizer (QuantLinear's backward
# flattens dY to 2-D).
_VIEWS = ("view.default", "reshape.default", "_unsafe_view.default")


def _is_target(node: torch.fx.Node, op: Any) -> bool:
    return node.op == "call_function" and node.target is op


def _view_like(node: torch.fx.Node) -> bool:
    t = node.target
    return (node.op == "call_function" and isinstance(t, torch._ops.OpOverload)
            and t.namespace == "aten" and f"{t._opname}.{t._overloadname}" in _VIEWS)


def _fp32_to_bf16_cast(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is torch.ops.prims.convert_element_type.default:
        to = node.args[1]
    elif node.target is torch.ops.aten._to_copy.default:
        to = node.kwargs.get("dtype")
        if set(node.kwargs) - {"dtype"}:  # a layout or device change too
            return False
    else:
        return False
    src = node.args[0]
    val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
    return to == torch.bfloat16 and isinstance(val, torch.Tensor) and val.dtype == torch.float32


def fold_gradient_casts(graph: torch.fx.Graph) -> int:
    """Rewrite each `quantize_gradient_pair_delayed(view*(bf16 cast of fp32 g))` whose cast and views
    feed only it, and whose g is a graph input or has other users (so it is in memory anyway), into
    the bf16-rounding op on g itself; returns how many were rewritten."""
    op = torch.ops.lowbit.quantize_gradient_pair_delayed.default
    folded = torch.ops.lowbit.quantize_gradient_pair_delayed_bf16.default
    count = 0
    for node in list(graph.nodes):
        if not _is_target(node, op):
            continue
        chain, cur = [], node.args[0]
        while isinstance(cur, torch.fx.Node) and _view_like(cur) and len(cur.users) == 1:
            chain.append(cur)
            cur = cur.args[0]
        if not (isinstance(cur, torch.fx.Node) and _fp32_to_bf16_cast(cur) and len(cur.users) == 1):
            continue
        src = cur.args[0]
        if src.op != "placeholder" and len(src.users) == 1:
            # Computed only to be cast: Inductor writes just the bf16 result (the cast fused into
            # its producer), and reading it in fp32 instead would move more bytes, not fewer.
            continue
        # The same views, on the fp32 gradient; one that its strides refuse: no rewrite.
        vals = [src.meta["val"]]
        try:
            for view in reversed(chain):
                vals.append(view.target(vals[-1], *view.args[1:], **view.kwargs))
        except RuntimeError:
            continue
        with graph.inserting_before(node):
            for view, val in zip(reversed(chain), vals[1:]):
                new = graph.call_function(view.target, (src, *view.args[1:]), dict(view.kwargs))
                new.meta.update(view.meta)
                new.meta["val"] = val
                src = new
            repl = graph.call_function(folded, (src, *node.args[1:]), dict(node.kwargs))
        repl.meta.update(node.meta)
        node.replace_all_uses_with(repl)
        graph.erase_node(node)
        for dead in (*chain, cur):
            graph.erase_node(dead)
        count += 1
    FOLDED[0] += count
    return count


# Rewrites made so far in this process (tests read it to see that the pass ran).
FOLDED = [0]


class _FoldPass(CustomGraphPass):
    def __init__(self, before: Any = None) -> None:
        self.before = before

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.before is not None:
            self.before(graph)
        if ENABLED:
            fold_gradient_casts(graph)
        if norm_pair_fold.ENABLED:
            norm_pair_fold.fold_norm_pairs(graph)

    def uuid(self) -> Any:
        # Part of Inductor's cache key: this file's and norm_pair_fold's text (its rewrite runs here
        # too), both switches, and the pass run before. A
        # plain callable set before has no identity to key on: None, so Inductor does not cache
        # (as it would not for that callable alone).
        if self.before is None:
            before = None
        elif isinstance(self.before, CustomGraphPass):
            before = self.before.uuid()
            if before is None:
                return None
        else:
            return None
        files = (__file__, norm_pair_fold.__file__)
        return (get_hash_for_files(files), ENABLED, norm_pair_fold.ENABLED, before)


_registered = False


def install() -> None:
    """Register the op and set the post-grad pass (once). The pass rewrites graphs compiled while
    ENABLED is true (LOWBIT_FOLD_GRAD_CAST, default 1)."""
    global _registered
    if _registered:
        return
    from torch._inductor import config

    _register_op()
    norm_pair_fold.register_op()  # lowbit/nn/norm_pair_fold.py's rewrite runs in the same pass
    current = config.post_grad_custom_post_pass
    if not isinstance(current, _FoldPass):
        config.post_grad_custom_post_pass = _FoldPass(current)
    _registered = True


def _register_op() -> None:
    from lowbit.kernels import pair_quantize_op
    from lowbit.nn.quant_linear_traced import _delayed_pair, _direct_delayed_pair, _fake_pair, history_owner

    @torch.library.custom_op(OP, mutates_args=())
    def quantize_gradient_pair_delayed_bf16(
        g: torch.Tensor, owner: int, token: torch.Tensor, fmt: str, fmt_t: str, row: int, row_t: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # lowbit::quantize_gradient_pair_delayed of g.to(torch.bfloat16), bit for bit.
        hist = history_owner(owner).amax_history
        if g.is_cuda and g.dtype == torch.float32 and _direct_delayed_pair(g, hist, fmt, fmt_t, row, row_t):
            return pair_quantize_op.fp8_tensor_pair_delayed_direct(g, fmt, hist[row], hist[row_t],
                                                                   round_bf16=True)
        return _delayed_pair(g.to(torch.bfloat16), hist, fmt, fmt_t, row, row_t)

    @quantize_gradient_pair_delayed_bf16.register_fake
    def _(g, owner, token, fmt, fmt_t, row, row_t):  # noqa: ANN001, ANN202
        return _fake_pair(g, fmt, "tensor", fmt_t, "tensor", row >= 0, row_t >= 0)
