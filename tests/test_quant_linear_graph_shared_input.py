"""Graph-op layers whose X needs no seed quantize X in an op of its own (lowbit.nn.quant_linear_graph
`shares_input`): the split ops compute what the eager layer's building blocks compute, bit for bit,
and layers that read one input (q/k/v, w1/w3) quantize it once in a compiled graph."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from lowbit.nn import QuantLinear, quant_linear_graph
from lowbit.nn.quant_linear_graph import graph_quant_linear, input_ops, recipe_key, shares_input
from lowbit.quant import RECIPES
from lowbit.quant.rounding import seed_table
from tests.test_quant_linear_graph import INTERPRETED, _bits, _building_blocks

pytestmark = pytest.mark.usefixtures("single_thread", "graph_ops_on")
K, N, T = 64, 96, 48
SHARED = ["mxfp8", "fp8_blockwise", "int8", "int4"]


def test_which_recipes_quantize_their_input_alone():
    shared = {name for name, r in RECIPES.items() if not r.is_identity and shares_input(r)}
    assert set(SHARED) <= shared
    # A seed is needed where X or X^T is rotated by random signs or rounded stochastically.
    for name in ("mxfp4", "nvfp4", "int4_hq"):
        assert name not in shared


@pytest.mark.parametrize("recipe", SHARED)
def test_split_ops_are_the_building_blocks(recipe):
    layer = QuantLinear(K, N, recipe=recipe)
    gen = torch.Generator().manual_seed(3)
    x2, gy = torch.randn(T, K, generator=gen), torch.randn(T, N, generator=gen)
    host_seeds = [11, 2**31 - 5, 123456789]
    seeds = seed_table(torch.tensor(host_seeds))
    key, w = recipe_key(layer.recipe), layer.weight.detach()
    b = layer.bias.detach()
    input_op, forward_op = input_ops()
    _, backward_op = quant_linear_graph.graph_ops()
    a_data, a_scale, a_tscale, *x_t = input_op(x2, key, True, False)
    y, *w_t = forward_op(a_data, a_scale, a_tscale, w, b, seeds, key, layer.backend, True, torch.float32,
                         x2.dtype)
    dx, dw = backward_op(gy, *x_t, *w_t, seeds, key, layer.backend, True, True, T, K, torch.float32, w.dtype,
                         False)
    ref_y, ref_dx, ref_dw, ref_x_t, ref_w_t = _building_blocks(layer, x2, gy, host_seeds)
    for name, got, ref in (
        ("y", y, ref_y), ("dx", dx, ref_dx), ("dw", dw, ref_dw), ("X^T codes", x_t[0], ref_x_t.data),
        ("X^T scales", x_t[1], ref_x_t.scale), ("W^T codes", w_t[0], ref_w_t.data),
    ):
        assert got.dtype == ref.dtype and torch.equal(_bits(got), _bits(ref)), name


class _ThreeHeads(nn.Module):
    # q/k/v-like: three layers on one input.
    def __init__(self, recipe: str) -> None:
        super().__init__()
        self.heads = nn.ModuleList(QuantLinear(K, n, bias=False, recipe=recipe, seed=i)
                                   for i, n in enumerate((N, N + 32, N + 64)))

    def forward(self, x):  # noqa: ANN001, ANN201
        return sum(h(x).sum(-1) for h in self.heads)


def _count_input_pairs(monkeypatch) -> list[int]:
    # Real (not fake) pair quantizations of a (T, K) tensor: X's, whichever layer asks.
    calls = [0]
    original = quant_linear_graph.prepare_operand_pair

    def counted(t, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if tuple(t.shape) == (T, K) and not is_fake(t):
            calls[0] += 1
        return original(t, *args, **kwargs)

    monkeypatch.setattr(quant_linear_graph, "prepare_operand_pair", counted)
    return calls


@INTERPRETED
@pytest.mark.parametrize("recipe", ["mxfp8", "mxfp4"])
def test_compiled_layers_on_one_input_quantize_it_once(recipe, monkeypatch):
    torch._dynamo.reset()
    model, same = _ThreeHeads(recipe), _ThreeHeads(recipe)
    same.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, T // 2, K)
    xa, xb = (x.clone().requires_grad_(True) for _ in range(2))
    compiled(xa).sum().backward()  # compiles; the count starts with the next call
    sum(graph_quant_linear(xb, h.weight, None, h).sum(-1) for h in same.heads).sum().backward()
    calls = _count_input_pairs(monkeypatch)
    for h in (*model.heads, *same.heads):
        h.zero_grad(set_to_none=True)
    xa.grad = xb.grad = None
    compiled(xa).sum().backward()
    # mxfp4 rotates X^T by random signs drawn per layer and call, so each layer quantizes its own.
    assert calls[0] == (1 if shares_input(RECIPES[recipe]) else 3)
    sum(graph_quant_linear(xb, h.weight, None, h).sum(-1) for h in same.heads).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    for h, g in zip(model.heads, same.heads):
        assert torch.equal(h.weight.grad, g.weight.grad)
