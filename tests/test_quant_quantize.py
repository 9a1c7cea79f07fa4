"""Scales (fp32, OCP MX e8m0, round-up e8m0, NVFP4 e4m3 + fp32), granularity, special blocks."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from lowbit.quant import QuantSpec, quantize
from lowbit.quant.scaling import compute_scale

# Tiny tensors: extra OpenMP threads only add barrier waits (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_public_api_example_roundtrip():
    x = torch.randn(8, 64, generator=_gen(), dtype=torch.bfloat16)
    q = quantize(x, QuantSpec(fmt="fp4_e2m1", block=32, scale="e8m0", rounding="nearest"), axis=-1)
    x_hat = q.dequantize()
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    assert q.data.dtype == torch.uint8 and q.data.numel() == x.numel() // 2  # two fp4 codes a byte


def test_mx_scale_rule_and_oracle_elements():
    # OCP MX: scale = 2^(floor(log2 amax) - emax_elem); elements = fp4 of x / scale.
    x = torch.randn(4, 96, generator=_gen(1)) * 3
    q = quantize(x, QuantSpec("fp4_e2m1", 32, "e8m0"))
    amax = x.abs().unflatten(-1, (3, 32)).amax(-1)
    want_scale = torch.exp2(torch.floor(torch.log2(amax)) - 2)
    assert torch.equal(q.scale, want_scale)
    y = (x.unflatten(-1, (3, 32)) / want_scale[..., None]).flatten(-2)
    elems = np.clip(y.numpy(), -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert torch.equal(q.values(), torch.from_numpy(elems))


def test_mx_floor_rule_saturates_and_round_up_does_not():
    # amax = 7: floor(log2 7) - 2 = 0 -> scale 1 -> 7 saturates to 6. e8m0_up picks scale 2.
    x = torch.tensor([[7.0] + [0.1] * 31])
    q = quantize(x, QuantSpec("fp4_e2m1", 32, "e8m0"))
    assert q.scale.item() == 1 and q.dequantize()[0, 0] == 6
    q_up = quantize(x, QuantSpec("fp4_e2m1", 32, "e8m0_up"))
    assert q_up.scale.item() == 2 and q_up.dequantize()[0, 0] == 8  # nearest of 3.5 is 4 (even)


def test_fp32_scale_maps_amax_to_max():
    x = torch.randn(16, 64, generator=_gen(2))
    for fmt, qmax in (("fp8_e4m3", 448), ("int8", 127), ("int4", 7)):
        q = quantize(x, QuantSpec(fmt, "row"))
        assert torch.allclose(q.scale, x.abs().amax(-1) / qmax)
        assert torch.equal(q.values().abs().amax(-1), torch.full((16,), float(qmax)))


def test_nvfp4_two_level_scales():
    x = torch.randn(8, 64, generator=_gen(3))
    q = quantize(x, QuantSpec("fp4_e2m1", 16, "e4m3"))
    t = x.abs().amax() / (448 * 6)
    assert torch.allclose(q.tensor_scale, t)
    raw = (x.abs().unflatten(-1, (4, 16)).amax(-1) / 6) / t
    want = torch.from_numpy(raw.numpy().astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    assert torch.equal(q.scale, want)
    rel = (q.dequantize() - x).norm() / x.norm()
    assert rel < 0.15


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("fp8_e4m3", "tensor"),
        QuantSpec("fp8_e5m2", "row"),
        QuantSpec("fp8_e4m3", 128),
        QuantSpec("fp8_e4m3", (128, 128)),
        QuantSpec("fp4_e2m1", (16, 16), "e4m3"),
        QuantSpec("int8", "row"),
        QuantSpec("nf4", 64),
        QuantSpec("fp6_e3m2", 32, "e8m0"),
    ],
    ids=str,
)
def test_granularities_and_ragged_shapes(spec):
    x = torch.randn(40, 200, generator=_gen(4)) * 5  # 200 is not a multiple of 16/32/64/128
    q = quantize(x, spec)
    xh = q.dequantize()
    assert xh.shape == x.shape
    rel = ((xh - x).norm() / x.norm()).item()
    assert rel < (0.12 if spec.format.bits <= 6 else 0.08)
    if spec.block == "tensor":
        assert q.scale.numel() == 1
    elif spec.block == "row":
        assert q.scale.shape == (40,)
    elif isinstance(spec.block, int):
        assert q.scale.shape == (40, math.ceil(200 / spec.block))
    else:
        assert q.scale.shape == (math.ceil(40 / spec.block[0]), math.ceil(200 / spec.block[1]))


def test_2d_tiles_of_w_are_tiles_of_w_transposed():
    w = torch.randn(48, 80, generator=_gen(5))
    spec = QuantSpec("fp8_e4m3", (16, 16))
    assert torch.equal(quantize(w, spec).dequantize().t(), quantize(w.t(), spec).dequantize())


def test_axis_argument():
    x = torch.randn(64, 8, generator=_gen(6))
    q0 = quantize(x, QuantSpec("fp4_e2m1", 32, "e8m0"), axis=0)
    q1 = quantize(x.t().contiguous(), QuantSpec("fp4_e2m1", 32, "e8m0"), axis=-1)
    assert torch.equal(q0.dequantize(), q1.dequantize().t())


@pytest.mark.parametrize(
    "spec",
    [QuantSpec("fp4_e2m1", 32, "e8m0"), QuantSpec("int4", 32), QuantSpec("fp4_e2m1", 16, "e4m3")],
    ids=str,
)
def test_zero_and_nonfinite_blocks(spec):
    x = torch.randn(3, 64, generator=_gen(7))
    x[0] = 0.0  # an all-zero row: both blocks zero
    x[1, 5] = float("nan")  # poisons block 0 of row 1 only
    x[2, 40] = float("inf")  # poisons block 1 of row 2 only
    xh = quantize(x, spec).dequantize()
    if spec.scale == "e4m3":
        assert torch.isnan(xh).all()  # the fp32 tensor scale sees the NaN/Inf: whole tensor NaN
        return
    assert torch.equal(xh[0], torch.zeros(64))
    assert torch.isnan(xh[1, :32]).all() and torch.isfinite(xh[1, 32:]).all()
    assert torch.isnan(xh[2, 32:]).all() and torch.isfinite(xh[2, :32]).all()


def test_delayed_amax_override_saturates():
    x = torch.tensor([1.0, 2.0, 100.0])
    q = quantize(x, QuantSpec("fp8_e4m3"), amax=torch.tensor(10.0))
    assert q.scale.item() == pytest.approx(10 / 448)
    assert q.dequantize()[2].item() == pytest.approx(10.0)
    with pytest.raises(ValueError, match="block='tensor'"):
        quantize(x, QuantSpec("fp8_e4m3", 32), amax=torch.tensor(1.0))


def test_compute_scale_zero_amax():
    s, _ = compute_scale(torch.zeros(2), "fp8_e4m3", "fp32")
    assert torch.equal(s, torch.ones(2))
    s, _ = compute_scale(torch.zeros(2), "fp4_e2m1", "e8m0")
    assert torch.equal(s, torch.full((2,), 2.0**-127))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fmt="fp9"), "fp9.*valid choices"),
        (dict(fmt="int4", scale="e8m0"), "e8m0.*float element format"),
        (dict(scale="e3m3"), "e3m3.*valid choices.*e8m0"),
        (dict(block=0), "block=0.*valid choices"),
        (dict(block="col"), "col.*valid choices"),
        (dict(rounding="up"), "up.*valid choices.*stochastic"),
    ],
)
def test_bad_specs_name_value_and_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_2d_block_needs_matrix():
    with pytest.raises(ValueError, match="needs a matrix"):
        quantize(torch.randn(2, 3, 4), QuantSpec("fp8_e4m3", (2, 2)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("fp4_e2m1", 32, "e8m0"),
        QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic"),
        QuantSpec("fp4_e2m1", 16, "e4m3", "stochastic"),
        QuantSpec("fp4_e2m1", (16, 16), "e4m3"),
        QuantSpec("fp8_e4m3", "row"),
        QuantSpec("fp8_e5m2", "tensor", "fp32", "stochastic"),
        QuantSpec("fp8_e4m3", 128),
        QuantSpec("int8", "row", "fp32", "stochastic"),
        QuantSpec("int4", 32),
        QuantSpec("nf4", 64, "fp32", "stochastic"),
        QuantSpec("fp6_e3m2", 32, "e8m0"),
    ],
    ids=str,
)
def test_cuda_reference_is_bitwise_cpu_reference(spec):
    # The same reference code on both devices: identical elements and scales, bit for bit.
    x = torch.randn(96, 256, generator=_gen(8)) * torch.exp2(torch.randint(-8, 8, (96, 1), generator=_gen(9)))
    cpu, gpu = quantize(x, spec, seed=3), quantize(x.cuda(), spec, seed=3)
    as_bits = lambda t: t.view(torch.uint8) if t.dtype != torch.int8 else t  # noqa: E731
    assert torch.equal(as_bits(gpu.data).cpu(), as_bits(cpu.data))
    assert torch.equal(gpu.scale.cpu(), cpu.scale)
    assert torch.equal(gpu.dequantize().cpu(), cpu.dequantize())


def test_non_integer_tile_sizes_are_rejected_not_truncated():
    for block in ((16.5, 16), [16, 16.0], (128, 1.9), 32.5):
        with pytest.raises(ValueError, match="invalid block=") as info:
            QuantSpec("fp8_e4m3", block)
        assert repr(block) in str(info.value)
    assert QuantSpec("fp8_e4m3", [16, 16]).block == (16, 16)
    assert QuantSpec("fp8_e4m3", (np.int64(16), 16)).block == (16, 16)
