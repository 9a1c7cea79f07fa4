"""The quantizers' division by a group's scale (_quant_math_triton._div_scale: a reciprocal per
group and one fma correction per element) against numpy's IEEE fp32 division, under the Triton
interpreter (its fma rounds once, as the GPU's). benchmarks/div_scale_check.py checks every pair
of fp32 significands on a GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lowbit.kernels._quant_math_triton import _div_scale  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TINY = 2.0**-20  # below this a quotient rounds to a zero code in every format; only its sign counts


@triton.jit
def _div_rows_kernel(x_ptr, d_ptr, y_ptr, BR: tl.constexpr, BC: tl.constexpr, DIV: tl.constexpr):
    # One program per BR rows; row i is divided by d[i].
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    offs = rows[:, None] * BC + tl.arange(0, BC)[None, :]
    d = tl.load(d_ptr + rows)[:, None]
    tl.store(y_ptr + offs, _div_scale(tl.load(x_ptr + offs), d, DIV))


def _divide(x: np.ndarray, d: np.ndarray, div: int, rows_per_program: int) -> np.ndarray:
    xt = torch.from_numpy(x).to(DEV)
    dt = torch.from_numpy(d).to(DEV)
    y = torch.empty_like(xt)
    grid = (x.shape[0] // rows_per_program,)
    _div_rows_kernel[grid](xt, dt, y, BR=rows_per_program, BC=x.shape[1], DIV=div)
    return y.cpu().numpy()


def _f32(sig: np.ndarray, exp: np.ndarray, neg: np.ndarray) -> np.ndarray:
    # fp32 values from 23-bit significands, unbiased exponents (normal range) and signs.
    bits = (neg.astype(np.uint32) << 31) | ((exp + 127).astype(np.uint32) << 23) | sig.astype(np.uint32)
    return bits.view(np.float32)


def _hard_case(rng: np.random.Generator, rows: int, cols: int, qexp: tuple[int, int]):
    # Divisors with random, all-ones and near-one significands over 2^-64..2^100 (exponents), and
    # dividends whose quotients' exponents lie in qexp (subnormal dividends included where small).
    dsig = rng.integers(0, 1 << 23, rows)
    dsig[::4] = (1 << 23) - 1 - rng.integers(0, 4, dsig[::4].shape)  # significand ~ 2 - ulp
    dsig[1::4] = rng.integers(0, 4, dsig[1::4].shape)  # ~ 1 + ulp
    dexp = rng.integers(-64, 101, rows)
    d = _f32(dsig, dexp, np.zeros(rows, bool))
    xsig = rng.integers(0, 1 << 23, (rows, cols))
    xexp = np.clip(dexp[:, None] + rng.integers(qexp[0], qexp[1] + 1, (rows, cols)), -126, 127)
    x = _f32(xsig, xexp, rng.random((rows, cols)) < 0.5)
    return x, d


def _assert_as_division(got: np.ndarray, x: np.ndarray, d: np.ndarray) -> None:
    ref = x / d[:, None]  # numpy: IEEE fp32 division, rounded to nearest even
    big = np.abs(ref) >= TINY
    gb, rb = got.view(np.uint32), ref.view(np.uint32)
    bad = big & (gb != rb) & ~(np.isnan(ref) & np.isnan(got))
    dd = np.broadcast_to(d[:, None], x.shape)
    assert not bad.any(), f"{bad.sum()} quotients differ, e.g. {x[bad][:3]} / {dd[bad][:3]}"
    small = ~big & ~np.isnan(ref)
    assert (np.abs(got[small]) < 2 * TINY).all()
    assert (np.signbit(got[small]) == np.signbit(ref[small])).all()


@pytest.mark.parametrize("div", [1, 2, 3])
def test_reciprocal_division_rounds_as_ieee_division(div: int) -> None:
    rng = np.random.default_rng(7 + div)
    x, d = _hard_case(rng, 256, 1024, (-24, 12))
    got = _divide(x, d, div, rows_per_program=32)
    _assert_as_division(got, x, d)
    # The correction is what makes it exact: the bare product x * (1/d) is off in many places.
    naive = x * (np.float32(1.0) / d)[:, None]
    assert ((naive != x / d[:, None]) & (np.abs(x / d[:, None]) >= TINY)).mean() > 0.05


def test_divisors_below_the_range_and_large_quotients_fall_back_to_the_division() -> None:
    rng = np.random.default_rng(3)
    x, d = _hard_case(rng, 64, 256, (-8, 8))
    # Program 0: divisors under 2^-64, subnormal ones among them; the rest of the rows are fine.
    d[:8] = np.array([2.0**-65, 2.0**-100, 2.0**-126, 2.0**-130, 2.0**-149, 3.0 * 2.0**-140, 1e-30, 5e-39],
                     np.float32)
    x[:8] = (rng.standard_normal((8, 256)) * 1e-37).astype(np.float32)
    x[:8, :4] = np.float32(3e-39)  # subnormal dividends with quotients near 1
    # Program 1: quotients far past 2^100 and overflowing ones (an amax from outside the data).
    d[8:16] = np.float32(2.0**-60)
    x[8:16, :] = (rng.standard_normal((8, 256)) * 1e38).astype(np.float32)
    # Program 2: non-finite dividends; program 3: a NaN divisor.
    x[16, :3] = [np.inf, -np.inf, np.nan]
    d[24] = np.nan
    got = _divide(x, d, 2, rows_per_program=8)
    _assert_as_division(got, x, d)
    assert np.isinf(got[8:16]).any() and np.isnan(got[24]).all()
    assert got[16, 0] == np.inf and got[16, 1] == -np.inf and np.isnan(got[16, 2])
    # Divisors below the range with bounded quotients: DIV 3 takes the division as well, DIV 1
    # scales them up instead.
    for div in (1, 3):
        _assert_as_division(_divide(x[:8], d[:8], div, rows_per_program=8), x[:8], d[:8])


@pytest.mark.parametrize("div", [1, 2, 3])
def test_signed_zeros_keep_their_sign(div: int) -> None:
    # x / d of +0 and -0 is +0 and -0 (d > 0), bit for bit as the IEEE division: quantizers then
    # give -0's code as the reference does. The fma correction's residual once turned -0 into +0.
    rng = np.random.default_rng(5)
    x, d = _hard_case(rng, 32, 64, (-4, 4))
    x[:, :2] = np.array([0.0, -0.0], np.float32)
    got = _divide(x, d, div, rows_per_program=32)
    assert (got[:, :2].view(np.uint32) == x[:, :2].view(np.uint32)).all()
    _assert_as_division(got, x, d)


@pytest.mark.parametrize("div", [1, 3])
def test_bounded_quotients_of_tiny_divisors(div: int) -> None:
    # DIV 1 and 3 (quotients bounded by the format's max, the scale being the values' own amax /
    # max): divisors under 2^-64, subnormal ones down to the least, are scaled up by 2^100 with
    # their dividends (DIV 1) or take the division (DIV 3); the quotients, 2^-22 .. 2^16 with random
    # significands, as numpy's division. Subnormal dividends included (d subnormal, quotient < 1).
    rng = np.random.default_rng(11)
    rows, cols = 64, 256
    dexp = rng.integers(-149, -55, rows).astype(np.float64)
    d = (np.exp2(dexp) * rng.uniform(1.0, 2.0, rows)).astype(np.float32)
    d[d == 0] = np.float32(2.0**-149)
    d[:4] = np.array([2.0**-149, 3 * 2.0**-149, 2.0**-64, np.nextafter(np.float32(2.0**-64), np.float32(0))],
                     np.float32)
    q = np.exp2(rng.uniform(-22, 16, (rows, cols))) * np.where(rng.random((rows, cols)) < 0.5, -1, 1)
    x = (q * d[:, None].astype(np.float64)).astype(np.float32)
    x[:, :2] = np.array([0.0, -0.0], np.float32)
    assert (np.abs(x[4:]) < np.float32(2.0**-126)).any(), "some dividends are subnormal"
    got = _divide(x, d, div, rows_per_program=8)
    _assert_as_division(got, x, d)
    assert (got[:, :2].view(np.uint32) == x[:, :2].view(np.uint32)).all()
    assert (np.abs(x / d[:, None]) >= 1.0).mean() > 0.4  # most quotients are ones that give codes
