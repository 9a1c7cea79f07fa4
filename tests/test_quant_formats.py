"""Element formats and nearest rounding against independent oracles: torch's float8 dtypes,
ml_dtypes' float8/float6/float4/e8m0 types, numpy's round-half-even, the published NF4 table."""

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import FORMATS, get_format, round_to_format
from lowbit.quant.qtensor import decode, encode
from lowbit.quant.scaling import decode_e8m0, encode_e8m0

ML_DTYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}
TORCH_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def oracle_grid(name: str) -> np.ndarray:
    """All finite non-negative values of the format, by enumerating its bit patterns in ml_dtypes."""
    bits = FORMATS[name].bits
    v = np.arange(2**bits, dtype=np.uint8).view(ML_DTYPES[name]).astype(np.float64)
    v = v[np.isfinite(v) & (v >= 0)]
    return np.unique(v)


def probe_values(name: str) -> torch.Tensor:
    """Grid points, exact midpoints (ties), and points just beside midpoints, both signs."""
    g = oracle_grid(name)
    mids = (g[1:] + g[:-1]) / 2
    eps = np.diff(g).min() * 1e-3
    v = np.concatenate([g, mids, mids + eps, mids - eps, g[-1:] * 0.999])
    v = np.concatenate([v, -v]).astype(np.float32)
    return torch.from_numpy(v)


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_format_description_matches_oracle(name):
    fmt = FORMATS[name]
    g = oracle_grid(name)
    assert fmt.max == g[-1]
    assert fmt.min_subnormal == g[1]
    assert np.array_equal(fmt.grid().double().numpy(), g)
    normals = g[g >= fmt.min_normal]
    assert fmt.min_normal == float(ml_dtypes.finfo(ML_DTYPES[name]).smallest_normal)
    assert normals[0] == fmt.min_normal


def test_documented_constants():
    assert FORMATS["fp8_e4m3"].max == 448 and FORMATS["fp8_e5m2"].max == 57344
    assert FORMATS["fp4_e2m1"].grid().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert FORMATS["int4"].max == 7 and FORMATS["int8"].max == 127


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_nearest_matches_ml_dtypes(name):
    x = probe_values(name)
    got = round_to_format(x, name, "nearest")
    want = torch.from_numpy(x.numpy().astype(ML_DTYPES[name]).astype(np.float32))
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_nearest_matches_torch_float8_cast(name):
    gen = torch.Generator().manual_seed(0)
    fmt = FORMATS[name]
    x = torch.randn(50_000, generator=gen) * torch.exp2(
        torch.randint(-24, 16, (50_000,), generator=gen).float()
    )
    x = torch.cat([x.clamp(-fmt.max, fmt.max), probe_values(name)])
    assert torch.equal(round_to_format(x, name), x.to(TORCH_DTYPES[name]).float())


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_special_values_and_saturation(name):
    fmt = FORMATS[name]
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), fmt.max * 4, -1e30, 0.0, -0.0])
    q = round_to_format(x, name)
    assert torch.isnan(q[0])
    if fmt.has_inf:
        assert q[1] == float("inf") and q[2] == -float("inf")
    else:
        assert q[1] == fmt.max and q[2] == -fmt.max
    assert q[3] == fmt.max and q[4] == -fmt.max
    assert q[5] == 0 and q[6] == 0 and torch.signbit(q[6])


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_subnormals_and_underflow(name):
    fmt = FORMATS[name]
    s = fmt.min_subnormal
    x = torch.tensor([s, 2 * s, fmt.min_normal, s / 2, s * 0.49, s * 0.51, 1.5 * s], dtype=torch.float32)
    q = round_to_format(x, name)
    # s/2 is a tie between 0 and s: even is 0. 1.5·s ties between s and 2s: even mantissa is 2s.
    assert q.tolist() == [s, 2 * s, fmt.min_normal, 0.0, 0.0, s, 2 * s]
    assert torch.equal(q, torch.from_numpy(x.numpy().astype(ML_DTYPES[name]).astype(np.float32)))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_int_nearest_is_half_even_and_symmetric(name):
    qmax = FORMATS[name].max
    x = torch.linspace(-qmax - 3, qmax + 3, 4001)
    x = torch.cat([x, torch.arange(-qmax, qmax + 1) + 0.5])
    want = np.clip(np.round(x.numpy()), -qmax, qmax)  # numpy rounds half to even
    assert np.array_equal(round_to_format(x, name).numpy(), want)


def test_nf4_table_is_the_normal_quantile_code():
    # Re-derive QLoRA's construction independently: quantiles of N(0,1), exact zero, max-normalized.
    delta = 0.5 * (1 / 32 + 1 / 30)
    pos = torch.special.ndtri(torch.linspace(1 - delta, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(1 - delta, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    v = (v / v.abs().max()).sort().values
    table = torch.tensor(FORMATS["nf4"].codebook, dtype=torch.float64)
    assert len(table) == 16 and table[0] == -1 and table[-1] == 1 and table[7] == 0
    assert torch.allclose(table, v, atol=1e-6)


def test_nf4_nearest_is_argmin():
    table = torch.tensor(FORMATS["nf4"].codebook)
    x = torch.linspace(-1.2, 1.2, 10_001)
    brute = table[(x[:, None].clamp(-1, 1) - table[None]).abs().argmin(1)]
    assert torch.equal(round_to_format(x, "nf4"), brute)


def test_fp4_codes_are_ocp_e2m1_bits():
    g = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -6, -0.0, 3])
    data, packed = encode(g, FORMATS["fp4_e2m1"])
    assert packed and data.numel() == 6
    codes = torch.stack((data & 0xF, data >> 4), -1).flatten()
    oracle = g.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    assert np.array_equal(codes.numpy(), oracle)
    assert torch.equal(decode(data, FORMATS["fp4_e2m1"], packed), g)


@pytest.mark.parametrize("name", ["int4", "nf4", "fp8_e5m2", "fp6_e2m3", "int8"])
def test_storage_round_trip(name):
    fmt = FORMATS[name]
    vals = fmt.grid()
    vals = torch.cat([vals, -vals])[:20] if fmt.kind != "codebook" else torch.tensor(fmt.codebook)
    data, packed = encode(vals, fmt)
    assert torch.equal(decode(data, fmt, packed), vals)


def test_e8m0_codes_match_ml_dtypes():
    k = torch.arange(-127, 128)
    s = torch.ldexp(torch.ones(255), k.to(torch.int32))
    s = torch.cat([s, torch.tensor([float("nan")])])
    ours = encode_e8m0(s).numpy()
    oracle = s.numpy().astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)
    assert np.array_equal(ours, oracle)
    back = decode_e8m0(torch.from_numpy(oracle.copy()))
    assert torch.equal(back[:-1], s[:-1]) and torch.isnan(back[-1])


def test_unknown_format_names_valid_choices():
    with pytest.raises(ValueError, match="fp5.*valid choices.*fp4_e2m1"):
        get_format("fp5")


def test_exp2i_exact_over_fp32_range():
    from lowbit.quant.rounding import exp2i

    k = torch.arange(-149, 128)
    want = torch.from_numpy(np.ldexp(np.float32(1), k.numpy()).astype(np.float32))
    assert torch.equal(exp2i(k), want)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=64))
def test_property_nearest_matches_ml_dtypes_for_any_fp32(values):
    x = torch.tensor(values, dtype=torch.float32)
    for name, dt in ML_DTYPES.items():
        m = FORMATS[name].max
        xi = x.clamp(-m, m)  # ml_dtypes and torch overflow to NaN/Inf; we saturate (tested above)
        want = torch.from_numpy(xi.numpy().astype(dt).astype(np.float32))
        assert torch.equal(round_to_format(xi, name), want), name
