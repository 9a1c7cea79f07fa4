"""QuantLinear: forward and all gradients against an fp64 reference, per recipe; bf16 is nn.Linear."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn import QuantLinear
from lowbit.quant import RECIPES, quantized_gemm

M, K, N = 128, 64, 96
# Relative Frobenius error bounds (y, dx, dw) vs fp64; about 1.5× what the recipes measure.
BOUNDS = {
    "fp8_tensorwise": (0.06, 0.09, 0.09),
    "fp8_delayed": (0.06, 0.09, 0.09),
    "fp8_rowwise": (0.055, 0.055, 0.055),
    "fp8_blockwise": (0.055, 0.055, 0.055),
    "mxfp8": (0.065, 0.065, 0.065),
    "mxfp4": (0.25, 0.35, 0.35),
    "nvfp4": (0.23, 0.27, 0.26),
    "int8": (0.013, 0.013, 0.014),
    "int4": (0.23, 0.24, 0.26),
    "int4_hq": (0.23, 0.17, 0.75),  # dw: leverage sampling keeps half the terms (unbiased, noisy)
}


# Tiny tensors: extra OpenMP threads only add barrier waits (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(M, K, generator=g),
        torch.randn(N, K, generator=g) * 0.1,
        torch.randn(M, N, generator=g),
    )


def _run(layer, x, gy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(gy)
    return y, x.grad, layer.weight.grad


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(BOUNDS))
def test_forward_and_gradients_vs_fp64(name):
    x, w, gy = _data()
    layer = QuantLinear(K, N, bias=False, recipe=name, seed=1)
    with torch.no_grad():
        layer.weight.copy_(w)
    y, dx, dw = _run(layer, x, gy)
    xd, wd, gd = x.double(), w.double(), gy.double()
    errs = (_rel(y, xd @ wd.t()), _rel(dx, gd @ wd), _rel(dw, gd.t() @ xd))
    assert all(e <= b for e, b in zip(errs, BOUNDS[name])), (name, errs)
    assert all(e > 0 for e in errs)  # it really quantized


def test_bf16_recipe_is_nn_linear_exactly():
    x, w, gy = _data()
    ref = nn.Linear(K, N)
    q = QuantLinear(K, N, recipe="bf16")
    q.load_state_dict(ref.state_dict())
    y_ref, dx_ref, dw_ref = _run(ref, x, gy)
    y, dx, dw = _run(q, x, gy)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref) and torch.equal(dw, dw_ref)
    assert torch.equal(q.bias.grad, ref.bias.grad)


def test_bias_gradient_and_3d_input():
    layer = QuantLinear(K, N, bias=True, recipe="mxfp8")
    x = torch.randn(2, 16, K, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 16, N)
    y.sum().backward()
    assert torch.allclose(layer.bias.grad, torch.full((N,), 32.0))
    assert x.grad.shape == x.shape


def test_mxfp4_backward_is_unbiased():
    # Random Hadamard + stochastic rounding on both backward operands: E[dW] = dY^T X exactly.
    x, w, gy = _data(3)
    layer = QuantLinear(K, N, bias=False, recipe="mxfp4", seed=5)
    with torch.no_grad():
        layer.weight.copy_(w)
    dws = _sampled_wgrads(layer, x, gy)
    ref = gy.double().t() @ x.double()
    single = _rel(dws[0], ref)
    assert _rel(torch.stack(dws).mean(0), ref) < single / 5


def _sampled_wgrads(layer: QuantLinear, x: torch.Tensor, gy: torch.Tensor, n: int = 150) -> list:
    """dW of `n` backward passes; each draws fresh Hadamard signs / SR noise / samples."""
    dws = []
    for _ in range(n):
        layer.weight.grad = None
        _run(layer, x, gy)
        dws.append(layer.weight.grad)
    return dws


def test_int4_hq_leverage_sampling_is_unbiased():
    x, w, gy = _data(4)
    layer = QuantLinear(K, N, bias=False, recipe="int4_hq", seed=6)
    dws = _sampled_wgrads(layer, x, gy)
    ref = gy.double().t() @ x.double()
    assert _rel(torch.stack(dws).mean(0), ref) < 0.15 < _rel(dws[0], ref)


def test_hadamard_rescues_outlier_channel_in_int4():
    x, w, gy = _data(5)
    x[:, 7] *= 40  # an outlier channel: per-row int4 without a rotation loses the rest of the row
    plain, hq = QuantLinear(K, N, False, "int4"), QuantLinear(K, N, False, "int4_hq")
    with torch.no_grad():  # fixed weights: the layers' own init would follow the global RNG
        plain.weight.copy_(w)
    hq.load_state_dict(plain.state_dict())
    ref = x.double() @ plain.weight.detach().double().t()
    assert _rel(hq(x), ref) < 0.8 * _rel(plain(x), ref)


def test_saves_quantized_activation_only():
    x = torch.randn(M, K, requires_grad=True)
    layer = QuantLinear(K, N, bias=False, recipe="mxfp4")
    y = layer(x)
    saved = y.grad_fn.x_wgrad
    assert len(y.grad_fn.saved_tensors) == 0  # X and W are kept only in quantized form
    assert saved.parts[0].data.dtype == torch.uint8
    assert y.grad_fn.w_dgrad.parts[0].data.dtype == torch.uint8  # W^T for dgrad: fp4 codes
    assert saved.nbytes() <= x.numel() // 2 + x.numel() // 32 * 4  # fp4 codes + one scale per 32
    layer_fp8 = QuantLinear(K, N, bias=False, recipe="fp8_tensorwise")
    assert layer_fp8(x).grad_fn.x_wgrad.parts[0].data.dtype == torch.float8_e4m3fn


def test_no_wgrad_operand_without_grad():
    layer = QuantLinear(K, N, bias=False, recipe="mxfp4")
    x = torch.randn(M, K, requires_grad=True)
    with torch.no_grad():
        layer(x)  # no graph, and the X^T copy for wgrad is not even built
    layer.weight.requires_grad_(False)  # frozen base weight (QLoRA): dX only
    y = layer(x)
    assert y.grad_fn.x_wgrad is None
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is None
    layer.weight.requires_grad_(True)  # an input that needs no gradient: no W^T for dgrad
    y = layer(torch.randn(M, K))
    assert y.grad_fn.w_dgrad is None and y.grad_fn.x_wgrad is not None
    y.sum().backward()
    assert layer.weight.grad is not None


def test_reproducible_with_seed():
    x, w, gy = _data()
    outs = []
    for _ in range(2):
        layer = QuantLinear(K, N, bias=False, recipe="nvfp4", seed=42)
        with torch.no_grad():
            layer.weight.copy_(w)
        outs.append(_run(layer, x, gy))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_autocast_output_dtype_and_fp32_grads():
    layer = QuantLinear(K, N, recipe="fp8_rowwise")
    x = torch.randn(4, K, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


@pytest.mark.parametrize("recipe", ["fp8_tensorwise", "fp8_delayed", "mxfp4"])
def test_autocast_quantizes_the_input_in_the_autocast_dtype(recipe):
    # Under autocast nn.Linear computes with bf16(x) (TE and torchao quantize that too): so does
    # QuantLinear. An fp32 input gives what its bf16 cast gives, bit for bit, and its gradient is
    # that input's bf16 gradient widened (the dgrad GEMM writes bf16, half the bytes of fp32).
    import copy

    layer = QuantLinear(K, N, recipe=recipe, seed=3)
    twin = copy.deepcopy(layer)  # the same generator state and histories
    gen = torch.Generator().manual_seed(5)
    x, gy = torch.randn(8, K, generator=gen), torch.randn(8, N, generator=gen)
    grads = []
    for mod, inp in ((layer, x), (twin, x.to(torch.bfloat16))):
        inp = inp.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mod(inp)
        y.backward(gy.to(y.dtype))
        grads.append((y.detach(), inp.grad, mod.weight.grad))
    (y32, gx32, gw32), (y16, gx16, gw16) = grads
    assert torch.equal(y32, y16) and torch.equal(gw32, gw16)
    assert gx32.dtype == torch.float32 and gx16.dtype == torch.bfloat16
    assert torch.equal(gx32, gx16.float())


def test_delayed_scaling_uses_history():
    layer = QuantLinear(K, N, bias=False, recipe="fp8_delayed")
    x = torch.randn(M, K)
    y1 = layer(x)
    y2 = layer(10 * x)  # scale from history (amax of x): 10·x saturates at the old amax
    ref = F.linear(10 * x, layer.weight)
    assert _rel(y1 * 10, ref.double()) < 0.06
    assert _rel(y2, ref.double()) > 0.5
    assert layer.amax_history[0, 0] == pytest.approx((10 * x).abs().max().item())


_EMPTY_RECIPES = ["fp8_delayed", "fp8_tensorwise", "mxfp4", "nvfp4", "int4_hq"]


@pytest.mark.parametrize("recipe", _EMPTY_RECIPES)
def test_a_call_without_tokens_gives_empty_outputs_and_zero_weight_grads(recipe):
    _check_call_without_tokens(recipe, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe", _EMPTY_RECIPES)
def test_gpu_a_call_without_tokens(recipe):
    _check_call_without_tokens(recipe, "cuda")


def _check_call_without_tokens(recipe, device):
    # A batch with no tokens (e.g. an expert that was routed none): empty output and input grad,
    # a zero weight grad, and delayed scaling's histories of X and dY as they were (no amax of
    # nothing).
    layer = QuantLinear(K, N, recipe=recipe, device=device)
    if recipe == "fp8_delayed":
        layer(torch.randn(M, K, device=device))
    history = layer.amax_history.clone() if recipe == "fp8_delayed" else None
    x = torch.randn(0, K, device=device, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, N) and x.grad.shape == (0, K)
    assert not layer.weight.grad.any() and not layer.bias.grad.any()
    if history is not None:  # rows (GEMM, operand): X and dY's as they were; W's record W's amax
        data_rows = [0, 2, 4, 5]  # fprop A, dgrad A, wgrad A and B
        assert torch.equal(layer.amax_history[data_rows], history[data_rows])
        assert layer.amax_history[1, 0] == layer.weight.detach().abs().max()


def test_delayed_scaling_history_stays_fp32_when_the_layer_is_cast():
    layer = QuantLinear(K, N, bias=False, recipe="fp8_delayed").to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.amax_history.dtype == torch.float32
    x = torch.randn(M, K, dtype=torch.bfloat16)
    layer(x)
    assert layer.amax_history[0, 0] == x.float().abs().max()  # recorded exactly, not rounded


def test_scaled_mm_backend_matches_emulation():
    x, w, _ = _data()
    cases = [("fp8_tensorwise", 1e-6)]
    if torch.cuda.is_available():
        x, w = x.cuda(), w.cuda()
        # cuBLAS's fast accumulation (the tensorwise fprop's) keeps partial sums in the tensor
        # cores' reduced precision; per-row scales are cuBLAS only, with a bf16 output.
        cases = [("fp8_tensorwise", 2e-3), ("fp8_rowwise", 1e-2)]
    for name, tol in cases:
        spec = RECIPES[name].fprop
        emu = quantized_gemm(x, w, spec, backend="emulate")
        fast = quantized_gemm(x, w, spec, backend="scaled_mm")
        err = _rel(fast, emu.double())
        print(f"{name}: relative error {err:.2e}")
        assert err < tol, (name, err)
    with pytest.raises(ValueError, match="scaled_mm.*fp8"):
        quantized_gemm(x, w, RECIPES["mxfp4"].fprop, backend="scaled_mm")
    with pytest.raises(ValueError, match="cublas.*valid choices"):
        quantized_gemm(x, w, RECIPES["mxfp4"].fprop, backend="cublas")


def test_quantize_backend_seam():
    from lowbit.quant import gemm, quantize, register_quantize_backend

    calls = []

    def counting_quantize(*args, **kwargs):
        calls.append(args[1])
        return quantize(*args, **kwargs)

    x, w, gy = _data()

    def layer():
        q = QuantLinear(K, N, bias=False, recipe="mxfp4", seed=2)
        with torch.no_grad():
            q.weight.copy_(w)
        return q

    ref = _run(layer(), x, gy)
    register_quantize_backend(counting_quantize, "cpu")
    try:
        got = _run(layer(), x, gy)
    finally:
        gemm._QUANTIZERS.pop("cpu")
    assert len(calls) == 6  # X, W (fprop), X^T (wgrad, saved), dY, W^T (dgrad), dY^T (wgrad)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_torch_compile_leaves_quantized_gemms_eager():
    layer = QuantLinear(K, N, recipe="mxfp4", seed=0)
    ref = QuantLinear(K, N, recipe="mxfp4", seed=0)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(8, K)
    assert torch.equal(torch.compile(layer, backend="aot_eager")(x), ref(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_emulation():
    x, w, gy = _data()
    for name in ("mxfp4", "nvfp4", "fp8_tensorwise"):
        res = []
        for dev in ("cpu", "cuda"):
            layer = QuantLinear(K, N, bias=False, recipe=name, seed=3, backend="emulate").to(dev)
            with torch.no_grad():
                layer.weight.copy_(w)
            res.append([t.cpu() for t in _run(layer, x.to(dev), gy.to(dev))])
        for a, b in zip(*res):
            assert _rel(a, b.double()) < 1e-5


def test_with_overrides_takes_a_bare_gemm_name_as_one_element_list():
    r = RECIPES["mxfp8"]
    assert r.with_overrides(hadamard="wgrad") == r.with_overrides(hadamard=["wgrad"])
    assert r.with_overrides(hadamard="wgrad").wgrad.hadamard == 32
    assert r.with_overrides(hadamard="wgrad").fprop.hadamard == 0
    sr = r.with_overrides(stochastic_rounding="dgrad")
    assert sr == r.with_overrides(stochastic_rounding=["dgrad"])
    with pytest.raises(ValueError, match=r"'wgard'.*fprop, dgrad, wgrad"):
        r.with_overrides(hadamard="wgard")


def test_unknown_backend_is_refused_when_the_layer_is_built():
    # One clear error naming the valid choices, before any forward (it used to come at the first one).
    with pytest.raises(ValueError, match=r"backend 'bogus'; valid choices: auto, emulate.*triton"):
        QuantLinear(64, 32, recipe="fp8_tensorwise", backend="bogus")
