"""The split-operand GEMM (a bit split's two parts against B): its epilogue under the interpreter,
and the cuBLAS products on CUDA, against the fp32 emulation."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from lowbit.kernels.leverage import int4_as_fp8  # noqa: E402
from lowbit.kernels.parts_gemm import combine, parts_gemm  # noqa: E402
from lowbit.quant import QuantSpec, quantize  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
I4, I8 = QuantSpec("int4", "row"), QuantSpec("int8", "row")


def _split(m, k, spec, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.exp2(torch.randint(-5, 6, (m, 1), generator=g).float())
    t = (torch.randn(m, k, generator=g) * rows).to(DEV)
    hi = quantize(t, spec)
    return [hi, quantize(t - hi.dequantize_lastdim(), spec)]


def _emulated(parts, qb, bias=None):
    out = sum(p.dequantize_lastdim().double() for p in parts) @ qb.dequantize_lastdim().double().t()
    return (out if bias is None else out + bias.double()).float()


def _assert_close(got, ref, rtol=1e-5):
    torch.testing.assert_close(got.float(), ref, rtol=rtol, atol=rtol * ref.abs().max().item())


@pytest.mark.parametrize("n_parts", [1, 2])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_epilogue_applies_every_scale_and_the_bias(n_parts, out_dtype):
    parts, qb = _split(37, 64, I4, 0)[:n_parts], _split(45, 64, I4, 1)[0]
    raw = [(p.values().double() @ qb.values().double().t()).to(torch.int32) for p in parts]  # exact
    bias = torch.linspace(-3, 3, 45, device=DEV)
    got = combine(raw, parts, qb, out_dtype, bias)
    assert got.dtype == out_dtype
    _assert_close(got, _emulated(parts, qb, bias), 1e-5 if out_dtype == torch.float32 else 8e-3)


@pytest.mark.skipif(DEV != "cpu", reason="the CPU answer")
def test_cpu_tensors_are_left_to_the_triton_gemm():
    parts, qb = _split(32, 64, I4, 2), _split(32, 64, I4, 3)[0]
    assert parts_gemm(parts, qb) is None


@pytest.mark.skipif(DEV != "cuda", reason="cuBLAS needs CUDA")
@pytest.mark.parametrize("spec", [I4, I8])
def test_gpu_int_parts_on_cublas(spec):
    parts, qb = _split(256, 512, spec, 4), _split(384, 512, spec, 5)[0]
    _assert_close(parts_gemm(parts, qb), _emulated(parts, qb))
    assert parts_gemm(parts, _split(383, 512, spec, 6)[0]) is None  # N % 8: the Triton GEMM


@pytest.mark.skipif(DEV != "cuda", reason="cuBLAS needs CUDA")
def test_gpu_fp8_gain_scaled_parts_on_cublas():
    parts, qb = _split(256, 1024, I4, 7), _split(128, 1024, I4, 8)[0]
    g = torch.Generator().manual_seed(9)  # seeded: the draws were once left to the global RNG
    gains = torch.exp2(torch.randint(0, 14, (2, 1024), generator=g).float()).to(DEV)
    gains[torch.rand(2, 1024, generator=g).to(DEV) < 0.5] = 0
    a8 = [int4_as_fp8(p, g) for p, g in zip(parts, gains)]
    b8 = int4_as_fp8(qb)
    sampled = sum((p.dequantize_lastdim() * g).double() for p, g in zip(parts, gains))
    ref = sampled @ qb.dequantize_lastdim().double().t()
    # cuBLAS promotes its fp8 sums into fp32 (no fast accumulation), but sums each K step's products
    # at less than fp32 precision: gains spanning 2^0..2^13 put one output of 32768 at 7.4e-4 of
    # the largest in run 266 (docs/BENCHMARKS.md). The tolerance is the cuBLAS fp8 path's.
    _assert_close(parts_gemm(a8, b8), ref.float(), 2e-3)
