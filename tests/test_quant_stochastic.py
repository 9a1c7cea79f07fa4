"""Stochastic rounding: unbiased inside the range, neighbours only, reproducible, portable hash."""

import pytest
import torch

from lowbit.quant import FORMATS, QuantSpec, hash_bits, lowbias32, quantize, round_to_format, uniform_noise

# Tiny tensors: extra OpenMP threads only add barrier waits (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


def _lowbias32_python(x: int) -> int:
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_hash_matches_python_big_int_reference():
    xs = [0, 1, 2, 255, 123456789, 2**31, 2**32 - 1, 0xDEADBEEF]
    assert lowbias32(torch.tensor(xs)).tolist() == [_lowbias32_python(v) for v in xs]
    seed = 1234
    want = [_lowbias32_python(i + seed * 0x9E3779B9) for i in range(64)]
    assert hash_bits(seed, 64).tolist() == want


def test_noise_is_exact_24_bit_uniform():
    u = uniform_noise(7, (100_000,))
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(u * 2**24, torch.floor(u * 2**24))
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp4_e2m1", "int4", "int8", "nf4"])
def test_sr_mean_converges_to_x(name):
    fmt = FORMATS[name]
    gen = torch.Generator().manual_seed(0)
    n_vals, draws = 64, 4000
    x = (torch.rand(n_vals, generator=gen) * 2 - 1) * fmt.max * 0.9
    xs = x.repeat(draws, 1)  # every element gets its own hash index: independent draws
    q = round_to_format(xs, name, "stochastic", seed=11)
    grid = fmt.grid()
    full = torch.cat([-grid, grid]).unique()  # signed grid, ascending
    if fmt.kind == "codebook":
        full = torch.tensor(fmt.codebook)
    lo = full[torch.bucketize(x, full, right=True) - 1]
    hi = full[torch.bucketize(x, full)]
    assert ((q == hi) | (q == lo)).all()  # only the two neighbours
    p = ((x - lo) / (hi - lo).clamp_min(1e-30)).clamp(0, 1)
    sigma = (hi - lo) * torch.sqrt(p * (1 - p) / draws) + 1e-7
    assert ((q.mean(0) - x).abs() <= 5 * sigma).all()


def test_sr_reproducible_and_seed_dependent():
    x = torch.randn(256)
    a = round_to_format(x, "fp4_e2m1", "stochastic", seed=3)
    b = round_to_format(x, "fp4_e2m1", "stochastic", seed=3)
    c = round_to_format(x, "fp4_e2m1", "stochastic", seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    spec = QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic")
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(
        quantize(x, spec, generator=g1).dequantize(), quantize(x, spec, generator=g2).dequantize()
    )


def test_sr_grid_points_stay_and_range_saturates():
    g = FORMATS["fp4_e2m1"].grid()
    assert torch.equal(round_to_format(g, "fp4_e2m1", "stochastic", seed=1), g)
    assert torch.equal(
        round_to_format(torch.full((8,), 9.0), "fp4_e2m1", "stochastic", seed=1), torch.full((8,), 6.0)
    )
    assert torch.isnan(round_to_format(torch.tensor([float("nan")]), "fp4_e2m1", "stochastic", seed=1)).all()


def test_sr_quantize_unbiased_with_round_up_scale():
    # With e8m0_up nothing saturates, so blockwise SR is unbiased end to end (scale included).
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 32, generator=gen)
    spec = QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic")
    mean = torch.stack([quantize(x, spec, seed=s).dequantize() for s in range(1500)]).mean(0)
    scale = quantize(x, spec, seed=0).scale.item()
    assert (mean - x).abs().max() < 5 * scale * 2 / 1500**0.5  # grid step <= 2·scale


def test_sr_needs_seed_or_noise():
    with pytest.raises(ValueError, match="seed"):
        round_to_format(torch.ones(2), "fp4_e2m1", "stochastic")
