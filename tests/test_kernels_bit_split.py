"""The bit split's residual kernel vs lowbit.quant's two fp32 ops, bit for bit (interpreter on CPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import lowbit.quant.gemm as qg  # noqa: E402
from lowbit.kernels.bit_split import residual  # noqa: E402
from lowbit.nn.quant_linear import QuantLinear  # noqa: E402
from lowbit.quant import QuantSpec, quantize  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _t(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rows = torch.exp2(torch.randint(-8, 9, (shape[0], 1), generator=g).float())
    return (torch.randn(shape, generator=g) * rows).to(DEV, dtype)


def _bits(x):
    return x.view(torch.int32)


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("shape", [(37, 290), (1, 2), (64, 512)])
def test_residual_is_the_reference_bit_for_bit(fmt, shape):
    t = _t(shape, 1)
    q = quantize(t, QuantSpec(fmt, "row"))
    got = residual(t, q)
    assert got is not None and got.dtype == torch.float32
    assert torch.equal(_bits(got), _bits(t - q.dequantize_lastdim()))


def test_bf16_strided_and_nonfinite_inputs():
    t = _t((96, 40), 2, torch.bfloat16).t()  # a transposed view (dY^T for wgrad), bf16
    t[3, 7] = float("nan")
    t[5, 1] = float("inf")
    q = quantize(t, QuantSpec("int4", "row"))
    got, ref = residual(t, q), t.float() - q.dequantize_lastdim()
    assert torch.equal(got.isnan(), ref.isnan()) and got[3].isnan().all()
    assert torch.equal(_bits(got[~ref.isnan()]), _bits(ref[~ref.isnan()]))


def test_declines_other_scalings():
    t = _t((8, 64), 3)
    for spec in (QuantSpec("int4", 32), QuantSpec("fp4_e2m1", 32, "e8m0"), QuantSpec("fp8_e4m3")):
        assert residual(t, quantize(t, spec)) is None
    assert residual(t[:, :63], quantize(t[:, :63], QuantSpec("int4", "row"))) is None  # odd K: unpacked


@pytest.mark.skipif(DEV != "cpu", reason="CPU tensors through the interpreter")
def test_int4_hq_layer_is_unchanged_by_the_kernel(monkeypatch):
    def grads():
        torch.manual_seed(0)
        layer = QuantLinear(64, 48, bias=False, recipe="int4_hq", backend="emulate", seed=3)
        x = _t((40, 64), 8).requires_grad_(True)
        layer(x).backward(torch.linspace(-1, 1, 40 * 48).reshape(40, 48))
        return x.grad, layer.weight.grad

    calls = []

    def counted(t, q):
        calls.append(1)
        return residual(t, q)

    monkeypatch.delitem(qg._RESIDUALS, "cpu", raising=False)
    ref = grads()
    monkeypatch.setitem(qg._RESIDUALS, "cpu", counted)  # CUDA's registration, for CPU tensors
    got = grads()
    assert len(calls) == 2  # dY for dgrad, dY^T for wgrad
    for g, r in zip(got, ref):
        assert torch.equal(g, r)
