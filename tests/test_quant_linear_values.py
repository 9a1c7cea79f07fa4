"""MX layers' operands written as BF16 values by the pair kernel (lowbit.nn.quant_linear_values,
lowbit.kernels.pair_quantize.quantize_pair_values): the values are the reference quantizer's
dequantized values bit for bit, the codes side is the reference's codes, and graph ops taking the
values path compute what the building blocks compute (on CUDA bit for bit: the same cuBLAS call)."""

import pytest
import torch
from conftest import import_with_env

from lowbit.kernels.pair_quantize import quantize_pair_values, why_not_values
from lowbit.nn import QuantLinear, quant_linear_graph, quant_linear_values
from lowbit.nn.quant_linear_graph import input_ops, recipe_key
from lowbit.quant import RECIPES, QuantSpec, quantize
from lowbit.quant.rounding import seed_table
from tests.test_quant_linear_graph import CUDA, INTERPRETED, _bits, _building_blocks

MX = QuantSpec("fp8_e4m3", 32, "e8m0")


def _on_device(device: str) -> pytest.MarkDecorator:
    return CUDA if device == "cuda" else INTERPRETED


def _same_bits(got: torch.Tensor, ref: torch.Tensor) -> bool:
    # bf16 tensors equal bit for bit, any NaN matching any NaN (payloads differ between devices).
    nan = torch.isnan(ref)
    return torch.equal(torch.isnan(got), nan) and torch.equal(
        got[~nan].view(torch.int16), ref[~nan].view(torch.int16))


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=INTERPRETED), pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize(
    "spec", [MX, QuantSpec("fp8_e5m2", 32, "e8m0_up"), QuantSpec("fp8_e4m3", 16, "e8m0")],
    ids=["mxfp8", "e5m2_up", "e4m3_g16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_values_are_the_reference_dequantized(device, spec, dtype):
    gen = torch.Generator().manual_seed(1)
    for r, c in ((64, 256), (40, 200)):  # ragged: partial tiles and groups
        x = torch.randn(r, c, generator=gen) * torch.logspace(-4, 4, c)
        x[3, 5], x[7, :32] = 0.0, 0.0  # a zero element and a zero group
        x[9, 40] = float("nan")
        x = x.to(device, dtype)
        for values in ((True, True), (True, False), (False, True)):
            got = quantize_pair_values(x, spec, spec, values)
            for side, (v, q) in enumerate(zip(values, got)):
                ref = quantize(x if side == 0 else x.t(), spec)
                if v:
                    assert q.dtype == torch.bfloat16 and q.shape == ref.shape
                    assert _same_bits(q, ref.dequantize().to(torch.bfloat16)), (r, c, values, side)
                else:
                    assert torch.equal(_bits(q.data), _bits(ref.data)), (r, c, values, side)
                    torch.testing.assert_close(q.scale, ref.scale, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("spec, reason", [
    (QuantSpec("fp8_e4m3", 16, "e4m3"), "e4m3 scales is not supported"),
    (QuantSpec("fp8_e4m3", 128, "e8m0"), "groups of up to 32"),
    (QuantSpec("fp8_e4m3", 32, "e8m0", "stochastic"), "nearest rounding"),
    (QuantSpec("int8", 32), "power-of-two scales"),
])
@INTERPRETED
def test_values_decline_what_they_cannot_write(spec, reason):
    x = torch.randn(64, 128)
    assert reason in why_not_values(x, spec, spec)
    with pytest.raises(ValueError, match=reason):
        quantize_pair_values(x, spec, spec, (True, False))


def test_values_setting_is_on_by_default_and_accepts_only_0_or_1():
    module = "lowbit.nn.quant_linear_values"
    out = import_with_env(module, "LOWBIT_PAIR_VALUES", "yes")
    assert out.returncode != 0 and "LOWBIT_PAIR_VALUES='yes'; valid choices: 0, 1" in out.stderr
    for value, on in ((None, True), ("0", False), ("1", True)):
        out = import_with_env(module, "LOWBIT_PAIR_VALUES", value, f"assert {module}.ON is {on}")
        assert out.returncode == 0, out.stderr


def test_which_recipes_take_the_values_path():
    takes = {name for name, r in RECIPES.items() if quant_linear_values.values_recipe(r)}
    assert takes == {"mxfp8"}


@INTERPRETED
def test_values_path_is_off_on_the_cpu_unless_forced(monkeypatch):
    x = torch.randn(4, 64)
    assert not quant_linear_values.uses_values(RECIPES["mxfp8"], x)
    monkeypatch.setattr(quant_linear_values, "FORCE_INTERPRETED", True)
    assert quant_linear_values.uses_values(RECIPES["mxfp8"], x)
    assert not quant_linear_values.uses_values(RECIPES["fp8_blockwise"], x)
    monkeypatch.setattr(quant_linear_values, "ON", False)  # LOWBIT_PAIR_VALUES=0
    assert not quant_linear_values.uses_values(RECIPES["mxfp8"], x)


def _split_ops(layer, x2, gy, seeds, dtype):
    key, w = recipe_key(layer.recipe), layer.weight.detach()
    b = None if layer.bias is None else layer.bias.detach()
    input_op, forward_op = input_ops()
    _, backward_op = quant_linear_graph.graph_ops()
    a_data, a_scale, a_tscale, *x_t = input_op(x2, key, True, True)
    y, *w_t = forward_op(a_data, a_scale, a_tscale, w, b, seeds, key, layer.backend, True, dtype, x2.dtype)
    t, k = x2.shape
    dx, dw = backward_op(gy, *x_t, *w_t, seeds, key, layer.backend, True, True, t, k, dtype, w.dtype, True)
    return a_data, y, dx, dw, x_t, w_t


@pytest.mark.usefixtures("single_thread", "graph_ops_on")
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=INTERPRETED),
                                    pytest.param("cuda", marks=[CUDA, pytest.mark.gpu])])
@pytest.mark.parametrize("bias", [False, True])
def test_values_path_ops_are_the_building_blocks(device, bias):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k, n, t = (256, 384, 500) if device == "cuda" else (64, 96, 40)  # tokens not a multiple of 32
    layer = QuantLinear(k, n, bias=bias, recipe="mxfp8", device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    x2 = torch.randn(t, k, generator=gen).to(device, dtype)
    gy = torch.randn(t, n, generator=gen).to(device, dtype)
    host_seeds = [11, 2**31 - 5, 123456789]
    seeds = seed_table(torch.tensor(host_seeds, device=device))
    a_data, y, dx, dw, x_t, w_t = _split_ops(layer, x2, gy, seeds, dtype)
    assert a_data.dtype == torch.bfloat16 and a_data.shape == x2.shape  # the values path was taken
    ref_y, ref_dx, ref_dw, ref_x_t, ref_w_t = _building_blocks(layer, x2, gy, host_seeds)
    # The saved operands are codes, as before: the same memory for backward.
    for name, got, ref in (("X^T codes", x_t[0], ref_x_t.data), ("X^T scales", x_t[1], ref_x_t.scale),
                           ("W^T codes", w_t[0], ref_w_t.data), ("W^T scales", w_t[1], ref_w_t.scale)):
        assert got.dtype == ref.dtype and torch.equal(_bits(got), _bits(ref)), name
    for name, got, ref in (("y", y, ref_y), ("dx", dx, ref_dx), ("dw", dw, ref_dw)):
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        if device == "cuda":  # the same BF16 operands through the same cuBLAS call
            assert torch.equal(got, ref), name
        else:  # an fp32 torch matmul against the interpreted Triton GEMM: the order of the sums
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=name)


@INTERPRETED
@pytest.mark.usefixtures("single_thread", "graph_ops_on")
def test_compiled_values_path_is_the_uncompiled_ops(monkeypatch):
    # The ops' fake (shapes-only) outputs must be the values path's too: bf16 X, codes for X^T. The
    # choice is an argument of the traced ops, so a cached graph traced the other way (an earlier
    # test's: same model, values off) is not reused for this one (CI met that: a size assertion).
    from lowbit.nn.quant_linear_graph import graph_quant_linear
    from tests.test_quant_linear_graph_shared_input import K, T, _ThreeHeads

    monkeypatch.setattr(quant_linear_values, "FORCE_INTERPRETED", True)
    torch._dynamo.reset()
    model, same = _ThreeHeads("mxfp8"), _ThreeHeads("mxfp8")
    same.load_state_dict(model.state_dict())
    x = torch.randn(2, T // 2, K)
    xa, xb = (x.clone().requires_grad_(True) for _ in range(2))
    torch.compile(model, fullgraph=True)(xa).sum().backward()
    sum(graph_quant_linear(xb, h.weight, None, h).sum(-1) for h in same.heads).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    for h, g in zip(model.heads, same.heads):
        torch.testing.assert_close(h.weight.grad, g.weight.grad, rtol=1e-5, atol=1e-5)
