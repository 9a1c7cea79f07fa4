"""The leverage-sampled GEMM (int4_hq's wgrad) on fp8 kernels vs lowbit.quant's fp32 emulation.

Runs under the Triton interpreter on CPU (small, ragged shapes) and on CUDA where there is one."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import lowbit.quant.leverage as lev  # noqa: E402
from lowbit.kernels.leverage import column_norms, int4_as_fp8, leverage_gemm, why_not_leverage  # noqa: E402
from lowbit.nn.quant_linear import QuantLinear  # noqa: E402
from lowbit.quant import QuantSpec, quantize  # noqa: E402
from lowbit.quant.gemm import _emulate, derive_seed, prepare_operand  # noqa: E402
from lowbit.quant.recipes import get_recipe  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
I4 = QuantSpec("int4", "row")


def _rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.exp2(torch.randint(-6, 7, (shape[0], 1), generator=g).float())  # rows of many scales
    return (torch.randn(shape, generator=g) * rows).to(DEV)


def test_codes_times_power_of_two_gains_are_exact_fp8():
    q = quantize(_rand((70, 66), 0), I4)
    gains = torch.exp2(torch.randint(0, lev.MAX_GAIN_LOG2 + 1, (66,)).float()).to(DEV)
    gains[::5] = 0  # dropped terms
    want = q.values() * gains  # int4 codes times the gains, exact in fp32
    a8 = int4_as_fp8(q, gains)
    assert a8.data.dtype == torch.float8_e5m2
    # Independent oracle: torch's own fp8 casts of those exact values (bits, not just values).
    assert torch.equal(a8.data.view(torch.uint8), want.to(torch.float8_e5m2).view(torch.uint8))
    b8 = int4_as_fp8(q)
    assert b8.data.dtype == torch.float8_e4m3fn
    assert torch.equal(b8.data.view(torch.uint8), q.values().to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(b8.dequantize_lastdim(), q.dequantize_lastdim())  # same row scales
    top = torch.full((1, 66), 7.0, device=DEV)  # 7 x 2^13 = 57344, e5m2's largest finite value
    full = int4_as_fp8(quantize(top, I4), torch.full((66,), 2.0**13, device=DEV))
    assert torch.equal(full.data.float(), torch.full((1, 66), 57344.0, device=DEV))


@pytest.mark.parametrize("shape", [(70, 66), (1, 2), (130, 260)])
def test_column_norms_match_torch(shape):
    q = quantize(_rand(shape, 1), I4)
    ref = q.dequantize_lastdim().double().norm(dim=0).float()
    torch.testing.assert_close(column_norms(q), ref, rtol=2e-6, atol=0)


def test_gains_are_powers_of_two_near_the_proportional_choice():
    g = torch.Generator().manual_seed(2)
    norms_a = torch.rand(2, 4096, generator=g) ** 3
    norms_b = torch.rand(4096, generator=g)
    norms_a[0, :4] = 1e6  # terms that saturate at probability 1 (gain 1)
    norms_a[1, 8:12] = 0  # zero columns: never kept
    gains = lev.leverage_gains(norms_a, norms_b, 7)
    kept = gains[gains > 0]
    assert torch.equal(kept, torch.exp2(torch.log2(kept).round()))  # powers of two
    assert kept.min() >= 1 and kept.max() <= 2.0**lev.MAX_GAIN_LOG2
    assert torch.all(gains[0, :4] == 1) and torch.all(gains[1, 8:12] == 0)
    # Each term's probability (1/gain where kept) lies within sqrt(2) of the water-filled one.
    w = norms_a * norms_b
    c = 4096 / w.sum()
    for _ in range(8):
        sat = c * w >= 1
        c = (4096 - sat.sum()) / w.masked_fill(sat, 0).sum()
    prob = (c * w).clamp(max=1)
    above = prob[gains > 0] >= 2.0**-lev.MAX_GAIN_LOG2  # below, it is raised to 2^-13
    ratio = (prob[gains > 0] * kept)[above]
    assert above.sum() > 1000 and ratio.min() > 0.7071 and ratio.max() < 1.4143
    # About K of the 2K terms are kept, and each expectation is the term itself: 1.
    assert abs(int((gains > 0).sum()) - 4096) < 4 * 4096**0.5
    means = torch.stack([lev.leverage_gains(norms_a, norms_b, s) for s in range(400)]).mean(0)
    assert abs(means[:, 200:].mean().item() - 1) < 0.05


def _wgrad_operands(rows_a, rows_b, k, seed=0, nan=False):
    wg = get_recipe("int4_hq").wgrad
    ta, tb = _rand((rows_a, k), 3 + seed), _rand((rows_b, k), 4 + seed)
    if nan:
        ta[2, 5] = float("nan")
    return wg, prepare_operand(ta, wg.a, wg, seed, 1), prepare_operand(tb, wg.b, wg, seed, 2)


@pytest.mark.parametrize("dims", [(48, 40, 96), (33, 70, 160)])
def test_matches_the_fp32_emulation(dims):
    wg, a, b = _wgrad_operands(*dims)
    assert why_not_leverage(a, b) is None and len(a.parts) == 2
    seed = 11
    got = leverage_gemm(a, b, derive_seed(seed, 4))
    ref = _emulate(a, b, wg, seed)
    assert (ref != 0).any()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    # The kernels' norms give the emulation's gains (the noise is the same; sums in another order).
    norms = torch.stack([column_norms(q) for q in a.parts])
    ref_norms = torch.stack([q.dequantize_lastdim().norm(dim=0) for q in a.parts])
    s4 = derive_seed(seed, 4)
    b_norms, b_ref = column_norms(b.parts[0]), b.parts[0].dequantize_lastdim().norm(dim=0)
    assert torch.equal(lev.leverage_gains(norms, b_norms, s4), lev.leverage_gains(ref_norms, b_ref, s4))
    bias = torch.linspace(-1, 1, dims[1], device=DEV)
    out = leverage_gemm(a, b, s4, torch.bfloat16, bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (got + bias).bfloat16().float())


def test_a_nan_reaches_the_product_as_in_the_emulation():
    wg, a, b = _wgrad_operands(16, 24, 64, nan=True)
    got, ref = leverage_gemm(a, b, derive_seed(5, 4)), _emulate(a, b, wg, 5)
    assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().any()


def test_declines_what_it_does_not_run():
    wg, a, b = _wgrad_operands(16, 24, 64)
    fp8 = get_recipe("fp8_rowwise").wgrad
    t = _rand((16, 64), 9)
    assert "packed int4" in why_not_leverage(prepare_operand(t, fp8.a, fp8, 0, 1), b)
    assert "split into parts" in why_not_leverage(b, a)
    wg_hp = prepare_operand(t, None, wg, 0, 1)
    assert "high precision" in why_not_leverage(wg_hp, b)


def _wgrad(backend):
    torch.manual_seed(0)
    layer = QuantLinear(64, 48, bias=False, recipe="int4_hq", backend=backend, seed=3)
    x = _rand((40, 64), 8).cpu().requires_grad_(True)
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return layer.weight.grad


@pytest.mark.skipif(DEV != "cpu", reason="CPU tensors through the interpreter")
def test_layer_wgrad_goes_through_the_registered_backend(monkeypatch):
    calls = []

    def counted(*args):
        calls.append(1)
        return leverage_gemm(*args)

    monkeypatch.setitem(lev._BACKENDS, "cpu", counted)  # CUDA's registration, for CPU tensors
    ref = _wgrad("emulate")  # backend="emulate" never asks it
    assert not calls
    got = _wgrad("auto")
    assert len(calls) == 1
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
