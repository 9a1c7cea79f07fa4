"""MXFP4 group scales folded into fp8 values with a scale a row: the reference (lowbit.quant.scale_fold)
against the dequantized operand, the Triton fold bit for bit against the reference (interpreter on
CPU, and CUDA where there is one), and the fp8 GEMM it feeds against the fp32 emulation (CUDA)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest  # noqa: E402
import torch  # noqa: E402

from lowbit.quant import QuantSpec, quantize  # noqa: E402
from lowbit.quant.scale_fold import HEADROOM, exact_range_log2, fold_group_scales  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MX4 = QuantSpec("fp4_e2m1", 32, "e8m0")
MX4_SR = QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic")
E5, E4 = torch.float8_e5m2, torch.float8_e4m3fn


def _groups(rows, k, spread, seed, device="cpu"):
    """(rows, k) data whose 32-wide groups have magnitudes 2^u, u uniform in [-spread, spread]."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.exp2(torch.randint(-spread, spread + 1, (rows, -(-k // 32)), generator=g).float())
    return (torch.randn(rows, k, generator=g) * mags.repeat_interleave(32, 1)[:, :k]).to(device)


@pytest.mark.parametrize("dtype", [E5, E4])
def test_fold_is_exact_within_the_range_and_rounds_beyond_it(dtype):
    lim = -exact_range_log2(dtype)
    assert lim == {E5: 28, E4: 14}[dtype]
    q = quantize(_groups(40, 256, lim // 2 - 1, 0), MX4)  # every row spans < 2^lim
    f = fold_group_scales(q, dtype)
    assert f.data.dtype == dtype and f.block == "row" and f.scale.shape == (40,)
    assert torch.equal(f.dequantize_lastdim(), q.dequantize_lastdim())
    # A row's largest group carries E2M1's 6 at 6 * 2^HEADROOM: at most the format's maximum.
    assert f.data.float().abs().max() <= torch.finfo(dtype).max
    top = torch.tensor([[6.0] * 32 + [1.5] * 32])  # a group of 6s and one of 1.5s...
    for shift, exact in ((lim, True), (lim + 1, False)):  # ...2^-lim, then 2^-(lim+1), below it
        x = top * torch.cat([torch.ones(32), torch.full((32,), 2.0**-shift)])
        qx = quantize(x, MX4)
        fx = fold_group_scales(qx, dtype)
        assert torch.equal(fx.dequantize_lastdim(), qx.dequantize_lastdim()) == exact
        # Beyond the range the error is under half the format's smallest subnormal times the row scale.
        err = (fx.dequantize_lastdim() - qx.dequantize_lastdim()).abs().max()
        half_subnormal = torch.finfo(dtype).smallest_normal * 2.0 ** -({E5: 2, E4: 3}[dtype] + 1)
        assert 0 < err <= half_subnormal * fx.scale[0] if not exact else err == 0


def test_fold_of_nan_and_zero_rows():
    x = _groups(4, 64, 3, 1)
    x[1, 40] = float("nan")
    x[2] = 0.0
    q = quantize(x, MX4)
    f = fold_group_scales(q, E5)
    assert f.dequantize_lastdim()[1].isnan().all() and f.scale[1].isnan()
    assert torch.equal(f.dequantize_lastdim()[2], torch.zeros(64)) and f.scale[2] > 0
    keep = torch.tensor([0, 3])
    assert torch.equal(f.dequantize_lastdim()[keep], q.dequantize_lastdim()[keep])


def test_fold_refuses_what_it_cannot_fold():
    x = _groups(4, 64, 3, 2)
    with pytest.raises(ValueError, match="fp8_e4m3"):
        fold_group_scales(quantize(x, QuantSpec("fp8_e4m3", 32, "e8m0")), E4)
    with pytest.raises(ValueError, match="tensor scale"):
        fold_group_scales(quantize(x, QuantSpec("fp4_e2m1", 16, "e4m3")), E4)
    with pytest.raises(ValueError, match="valid choices"):
        fold_group_scales(quantize(x, MX4), torch.bfloat16)


# --- the Triton fold and the fp8 GEMM ---------------------------------------------------------

triton = pytest.importorskip("triton")
kernels_run = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not kernels_run, reason="needs CUDA or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLAS fp8 runs on CUDA")


def _same_bits(a, b):
    an, bn = a.float().isnan(), b.float().isnan()
    assert torch.equal(an, bn)
    assert torch.equal(torch.where(an, 0, a.view(torch.uint8)), torch.where(bn, 0, b.view(torch.uint8)))


@needs_kernels
@pytest.mark.parametrize("dtype", [E5, E4])
@pytest.mark.parametrize("shape,spread,spec",
                         [((45, 80), 40, MX4), ((9, 1000), 10, MX4_SR), ((64, 64), 2, MX4),
                          ((8, 512), 30, QuantSpec("fp4_e2m1", 256, "e8m0"))])
def test_triton_fold_matches_the_reference_bit_for_bit(dtype, shape, spread, spec):
    from lowbit.kernels.scale_fold import fold_group_scales as fold_triton

    x = _groups(*shape, spread, 3, DEV)
    x[3, 7] = float("nan")
    x[5] = 0.0
    x[6, 1] = float("inf")
    q = quantize(x, spec, seed=11)
    ref, got = fold_group_scales(q, dtype), fold_triton(q, dtype)
    assert got.data.dtype == dtype and got.block == "row"
    _same_bits(got.data, ref.data)
    torch.testing.assert_close(got.scale, ref.scale, rtol=0, atol=0, equal_nan=True)
    assert HEADROOM[dtype] in (6, 13)


@needs_kernels
def test_triton_fold_refuses_unpacked_codes():
    from lowbit.kernels.scale_fold import fold_group_scales as fold_triton

    q = quantize(_groups(4, 33, 2, 4, DEV), MX4)  # odd K: one code a byte
    assert not q.packed
    with pytest.raises(ValueError, match="unpacked"):
        fold_triton(q)


F32, BF16 = torch.float32, torch.bfloat16


@needs_cuda
@pytest.mark.parametrize("out_dtype,bias_dtype", [(F32, F32), (BF16, BF16), (BF16, F32)])
def test_folded_gemm_matches_the_emulation(out_dtype, bias_dtype):
    from lowbit.kernels.scale_fold import folded_gemm

    qa = quantize(_groups(256, 512, 6, 5, DEV), MX4_SR, seed=3)
    qb = quantize(_groups(192, 512, 6, 6, DEV), MX4)
    bias = torch.randn(192, device=DEV).to(bias_dtype)  # bf16 with bf16: cuBLAS's row scales and bias
    out = folded_gemm(qa, qb, out_dtype, bias)
    assert out is not None and out.dtype == out_dtype
    ref = qa.dequantize_lastdim().double() @ qb.dequantize_lastdim().double().t() + bias.double()
    # The fp8 MMA sums a K step at less than fp32 precision, which shows on these widely spread
    # groups (run 267: 3e-4 of the largest output); the tolerance is the cuBLAS fp8 path's (2e-3).
    tol = 2e-3 if out_dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())
    # Groups of one magnitude in both operands (randn data): the fp8 sums are as exact as fp32's.
    narrow = quantize(_groups(256, 512, 0, 8, DEV), MX4_SR, seed=4)
    narrow_b = quantize(_groups(192, 512, 0, 9, DEV), MX4)
    exact = narrow.dequantize_lastdim().double() @ narrow_b.dequantize_lastdim().double().t() + bias.double()
    got = folded_gemm(narrow, narrow_b, out_dtype, bias)
    tol = 2e-5 if out_dtype == torch.float32 else tol
    torch.testing.assert_close(got.float(), exact.float(), rtol=tol, atol=tol * exact.abs().max().item())
    ragged = quantize(_groups(200, 512, 6, 7, DEV), MX4)  # 200 rows: not a multiple of 16
    assert folded_gemm(qa, ragged, out_dtype) is None
