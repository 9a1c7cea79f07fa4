"""Fused Triton quantize kernel vs lowbit.quant.quantize, bit for bit, under the Triton interpreter."""

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lowbit.kernels import quantize as kq  # noqa: E402
from lowbit.kernels._quant_math_triton import _e2m1_codes, _e2m1_codes_sr, _int_codes  # noqa: E402
from lowbit.quant import QuantSpec, quantize  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _bytes(q) -> torch.Tensor:
    return q.data.view(torch.uint8) if q.data.element_size() == 1 else q.data


def check_same_qtensor(ref, got) -> None:
    """Equal storage bytes and scales; a NaN may differ only in its sign bit (CPU vs GPU NaNs)."""
    assert got.packed == ref.packed and got.block == ref.block and got.shape == ref.shape
    assert got.axis == ref.axis and got.dtype == ref.dtype and got.fmt == ref.fmt
    assert got.data.dtype == ref.data.dtype and got.data.shape == ref.data.shape
    rb, gb = _bytes(ref).cpu(), _bytes(got).cpu()
    if ref.data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        nan = torch.isnan(ref.data.float().cpu())
        assert torch.equal(nan, torch.isnan(got.data.float().cpu()))
        rb, gb = rb[~nan], gb[~nan]
    mism = (rb != gb).nonzero()
    assert mism.numel() == 0, f"{mism.shape[0]} bytes differ, first at {mism[:4].tolist()}"
    torch.testing.assert_close(got.scale.cpu(), ref.scale.cpu(), rtol=0, atol=0, equal_nan=True)
    assert got.scale.shape == ref.scale.shape
    if ref.tensor_scale is None:
        assert got.tensor_scale is None
    else:
        torch.testing.assert_close(got.tensor_scale.cpu(), ref.tensor_scale.cpu(), rtol=0, atol=0,
                                   equal_nan=True)


def _x(shape, seed=0, dtype=torch.float32, outliers=True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-6, 6, shape, generator=g).float())
    if outliers:  # wide dynamic range, exact zeros, values at the saturation edge
        flat = x.view(-1)
        flat[:: 7] = 0.0
        flat[3:: 11] *= 300.0
    return x.to(dtype)


# (fmt, block, scale): every storage path and every scale rule, 1-D / row / tensor / 2-D tiles.
SPECS = [
    ("fp8_e4m3", 32, "e8m0"),  # MXFP8
    ("fp4_e2m1", 32, "e8m0"),  # MXFP4, packed
    ("fp4_e2m1", 32, "e8m0_up"),
    ("fp4_e2m1", 16, "e4m3"),  # NVFP4
    ("fp4_e2m1", (16, 16), "e4m3"),  # NVFP4 weight tiles
    ("fp8_e4m3", 128, "fp32"),  # 1x128 blockwise
    ("fp8_e4m3", (32, 32), "fp32"),  # 128x128-style tiles, scaled down
    ("fp8_e4m3", "tensor", "fp32"),
    ("fp8_e5m2", "tensor", "fp32"),
    ("fp8_e4m3", "row", "fp32"),
    ("int8", "row", "fp32"),
    ("int4", "row", "fp32"),  # packed two's complement
    ("int4", 32, "fp32"),
    ("fp6_e3m2", 32, "e8m0"),
    ("fp6_e2m3", 32, "e8m0"),
]


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("fmt,block,scale", SPECS)
def test_matches_reference_bitwise(fmt, block, scale, rounding):
    spec = QuantSpec(fmt, block, scale, rounding)
    x = _x((40, 96), seed=hash((fmt, str(block), scale)) % 1000)
    ref = quantize(x, spec, seed=123)
    got = kq.quantize(x.to(DEV), spec, seed=123)
    assert kq.supports(x.to(DEV), spec)
    check_same_qtensor(ref, got)


@pytest.mark.parametrize(
    "shape,spec",
    [
        ((5, 50), QuantSpec("fp4_e2m1", 32, "e8m0")),  # short last block, rows < tile
        ((7, 33), QuantSpec("fp4_e2m1", 16, "e4m3", "stochastic")),  # odd K: one code per byte
        ((3, 37), QuantSpec("int4", "row", "fp32", "stochastic")),
        ((9, 3000), QuantSpec("fp8_e4m3", "row")),  # one 4096-wide tile per row, masked
        ((19, 21), QuantSpec("fp4_e2m1", (16, 16), "e4m3")),  # ragged 2-D tiles
        ((2, 3, 40), QuantSpec("fp8_e5m2", 32, "e8m0", "stochastic")),  # N-D input
    ],
)
def test_ragged_shapes(shape, spec):
    x = _x(shape, seed=7)
    check_same_qtensor(quantize(x, spec, seed=9), kq.quantize(x.to(DEV), spec, seed=9))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("spec", "dtype"), [(QuantSpec("fp8_e4m3", "row"), torch.float32),
                                             (QuantSpec("int4", "row", "fp32", "stochastic"), torch.float32),
                                             (QuantSpec("int4", "row"), torch.bfloat16)])  # read as words
def test_rows_longer_than_one_tile_loop_over_chunks(spec, dtype, reverse, monkeypatch):
    # Rows over ROW_CHUNK elements take the two-read loop (amax, then quantize), ragged end; the
    # second read in either order (LONG_ROW_REVERSE), with L2 eviction hints (no-ops here).
    import lowbit.kernels._quantize_triton as kt

    monkeypatch.setattr(kt, "ROW_CHUNK", 512)
    monkeypatch.setattr(kt, "LONG_ROW_REVERSE", reverse)
    monkeypatch.setattr(kt, "LONG_ROW_EVICT", ("evict_last", "evict_first") if reverse else ("", ""))
    x = _x((9, 3000), seed=8, dtype=dtype)
    check_same_qtensor(quantize(x, spec, seed=4), kq.quantize(x.to(DEV), spec, seed=4))


@pytest.mark.parametrize(
    "shape,spec",
    [
        ((40, 96), QuantSpec("fp4_e2m1", 32, "e8m0")),
        ((7, 50), QuantSpec("fp4_e2m1", 16, "e4m3", "stochastic")),  # ragged last group, NVFP4
        ((5, 256), QuantSpec("fp4_e2m1", 128, "e8m0_up")),  # one group per tile row
        ((9, 64), QuantSpec("int4", 32, "fp32", "stochastic")),
        ((5, 250), QuantSpec("int4", "row")),  # a row in one tile, ragged
        ((6, 3000), QuantSpec("int4", "row")),  # rows over ROW_CHUNK: two reads, ragged end
        ((6, 3000), QuantSpec("int4", "row", "fp32", "stochastic")),
    ],
)
def test_packed_groups_of_bf16_read_as_words(shape, spec, monkeypatch):
    # bf16 matrices with packed 4-bit codes are read as int32 words of two elements (PAIRED_WORDS);
    # the same codes as the reference and as the element-wise read.
    import lowbit.kernels._quantize_triton as kt

    monkeypatch.setattr(kt, "ROW_CHUNK", 512)
    x = _x(shape, seed=12, dtype=torch.bfloat16)
    x.view(-1)[7] = float("nan")  # a NaN row: NaN scale, codes 0 (the reference's)
    ref = quantize(x, spec, seed=6)
    check_same_qtensor(ref, kq.quantize(x.to(DEV), spec, seed=6))
    monkeypatch.setattr(kt, "PAIRED_WORDS", False)
    check_same_qtensor(ref, kq.quantize(x.to(DEV), spec, seed=6))


@pytest.mark.parametrize("spec", [QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic"),
                                  QuantSpec("int4", 32, "fp32", "stochastic")])
def test_packed_words_noise_key_wraps_mod_2_32(spec):
    # The packed-words branch forms the noise hash's key (index + seed offset) in uint32. Seed
    # 1868860's offset is 5284 below 2^32, so the keys of this 40 x 256 matrix wrap past 2^32
    # partway through: the codes still equal the reference's, whose sum is taken in int64.
    from lowbit.quant.rounding import seed_offset

    seed = 1868860
    assert 2**32 - seed_offset(seed) < 40 * 256
    x = _x((40, 256), seed=13, dtype=torch.bfloat16)
    check_same_qtensor(quantize(x, spec, seed=seed), kq.quantize(x.to(DEV), spec, seed=seed))


@triton.jit
def _e2m1_codes_kernel(y_ptr, k_ptr, c_ptr, n, SR: tl.constexpr, B: tl.constexpr):
    # The quantize kernel's fp4 code functions applied to a vector (SR: 24-bit noise k = u * 2^24).
    i = tl.program_id(0) * B + tl.arange(0, B)
    m = i < n
    y = tl.load(y_ptr + i, m, other=0.0)
    if SR:
        c = _e2m1_codes_sr(y, tl.load(k_ptr + i, m, other=0))
    else:
        c = _e2m1_codes(y)
    tl.store(c_ptr + i, c, m)


def _fp4_probe_values() -> torch.Tensor:
    # Every bf16 value in [0, 8], each fp4 tie point and its fp32 neighbours, and specials; both signs.
    grid = torch.arange(0, 0x4101, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 1.0, 2.0, 4.0])
    up = torch.nextafter(ties, torch.tensor(float("inf")))
    down = torch.nextafter(ties, torch.tensor(0.0))
    special = torch.tensor([float("inf"), 1e30, 3e38, 1e-45, 1e-40, 7.0, 6.5])
    v = torch.cat([grid, ties, up, down, special])
    return torch.cat([v, -v])


def test_e2m1_codes_match_ml_dtypes_and_the_reference():
    # The fp4 code functions of the quantize kernel on their own, against ml_dtypes' float4_e2m1fn
    # cast (round half to even, saturating) and, for stochastic rounding, the reference's
    # round_to_format + encode with the same noise. NaN is code 0 (as lowbit.quant stores it).
    import ml_dtypes
    import numpy as np

    from lowbit.quant.formats import get_format
    from lowbit.quant.qtensor import encode
    from lowbit.quant.rounding import round_to_format, uniform_noise

    # Last, values whose noise equals their fraction (u == frac never rounds up): one per range.
    even = torch.tensor([0.375, 0.625, 1.25, 1.625, 2.5, 3.25, 5.0, -1.25])
    frac = torch.tensor([0.75, 0.25, 0.5, 0.25, 0.5, 0.25, 0.5, 0.5])
    y = torch.cat([_fp4_probe_values(), torch.tensor([float("nan"), -float("nan")]), even])
    n = y.numel()
    u = uniform_noise(5, (n,), "cpu")
    u[-even.numel():] = frac
    k = (u * 2**24).to(torch.int32)  # exact: u is a 24-bit fraction
    out = {}
    for sr in (False, True):
        c = torch.empty(n, dtype=torch.int32, device=DEV)
        _e2m1_codes_kernel[(triton.cdiv(n, 1024),)](y.to(DEV), k.to(DEV), c, n, SR=sr, B=1024)
        out[sr] = c.cpu()
    finite = ~torch.isnan(y)
    want = torch.from_numpy(y[finite].numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8).astype(np.int32))
    assert torch.equal(out[False][finite], want)
    assert (out[False][~finite] == 0).all() and (out[True][~finite] == 0).all()
    q = round_to_format(y, "fp4_e2m1", "stochastic", noise=u)
    codes, packed = encode(q[:, None], get_format("fp4_e2m1"))  # one code per row: not packed
    assert not packed
    assert torch.equal(out[True][finite], codes[finite, 0].to(torch.int32))
    assert not torch.equal(out[True], out[False])  # the noise moved some codes


@triton.jit
def _int_codes_kernel(y_ptr, c_ptr, n, FMAX: tl.constexpr, ENC: tl.constexpr, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    m = i < n
    tl.store(c_ptr + i, _int_codes(tl.load(y_ptr + i, m, other=0.0), FMAX, ENC), m)


@pytest.mark.parametrize("fmt,fmax,enc,mask", [("int8", 127.0, 2, 0xFF), ("int4", 7.0, 4, 0xF)])
def test_int_codes_match_torch_round(fmt, fmax, enc, mask):
    # The integer code function of the quantize kernel on its own against torch.round (half to
    # even) of the clamped value, two's complement in the storage width: every bf16 value in
    # [0, 256], each tie k + 1/2 and its fp32 neighbours, specials; both signs. NaN is code 0.
    from lowbit.kernels.quantize import _ENC

    assert _ENC[fmt] == enc
    grid = torch.arange(0, 0x4381, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    ties = torch.arange(0, 130, dtype=torch.float32) + 0.5
    inf = torch.tensor(float("inf"))
    special = torch.tensor([float("inf"), 3e38, 1e-45, 1e-40, fmax, fmax + 0.5, 2.0**22, 2.0**23 + 1])
    v = torch.cat([grid, ties, torch.nextafter(ties, inf), torch.nextafter(ties, -inf), special])
    y = torch.cat([v, -v, torch.tensor([float("nan")])])
    c = torch.empty(y.numel(), dtype=torch.int32, device=DEV)
    _int_codes_kernel[(triton.cdiv(y.numel(), 1024),)](y.to(DEV), c, y.numel(), FMAX=fmax, ENC=enc, B=1024)
    want = torch.round(y.clamp(-fmax, fmax)).nan_to_num(0.0).to(torch.int32) & mask
    assert torch.equal(c.cpu(), want)


@pytest.mark.parametrize("in_place", [False, True])
def test_bf16_input_strided_transpose_and_axis(in_place, monkeypatch):
    # X^T for wgrad: read in place (TRANSPOSED_READ) or after a contiguous copy.
    monkeypatch.setattr(kq, "TRANSPOSED_READ", in_place)
    x = _x((48, 64), seed=3, dtype=torch.bfloat16)
    spec = QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic")
    xt = x.to(DEV).t()
    assert not xt.is_contiguous()
    check_same_qtensor(quantize(x.t(), spec, seed=5), kq.quantize(xt, spec, seed=5))
    check_same_qtensor(quantize(x, spec, axis=0, seed=5), kq.quantize(x.to(DEV), spec, axis=0, seed=5))


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec("fp4_e2m1", (16, 16), "e4m3", "stochastic"),
                                  QuantSpec("fp8_e4m3", (8, 32), "fp32")])
def test_small_2d_blocks_several_per_tile(spec, in_place, monkeypatch):
    # Blocks smaller than a tile are grouped (TILE2D_SMALL): tiles of many blocks, ragged on both
    # axes, several tile rows and columns; and the same from an X^T view, copied first or read in
    # place (TILE_TRANSPOSED_READ: the tile shape swapped), whose blocks are X's blocks transposed.
    import lowbit.kernels._quantize_triton as kt

    monkeypatch.setattr(kq, "TILE_TRANSPOSED_READ", in_place)

    x = _x((70, 600), seed=11, dtype=torch.bfloat16)
    br, bc = spec.block
    assert br * bc < kt.TILE_ELEMS and kt.TILE2D_SMALL[0] * kt.TILE2D_SMALL[1] > br * bc
    check_same_qtensor(quantize(x, spec, seed=6), kq.quantize(x.to(DEV), spec, seed=6))
    check_same_qtensor(quantize(x.t(), spec, seed=6), kq.quantize(x.to(DEV).t(), spec, seed=6))


def test_special_values_and_delayed_amax():
    x = _x((8, 64), seed=4)
    x[0, 3] = float("nan")
    x[5, 40] = torch.tensor(-0x400000, dtype=torch.int32).view(torch.float32)  # a NaN with its sign bit set
    x[1, 5] = float("inf")
    x[2, 7] = -float("inf")
    x[3, :32] = 0.0  # an all-zero block
    x[4, 0] = 1e-40  # fp32 subnormal
    for spec in [QuantSpec("fp8_e4m3", 32, "e8m0"), QuantSpec("fp8_e5m2", 32, "fp32"),
                 QuantSpec("fp4_e2m1", 16, "e4m3"), QuantSpec("fp4_e2m1", 32, "e8m0"),
                 QuantSpec("int8", "row")]:
        check_same_qtensor(quantize(x, spec), kq.quantize(x.to(DEV), spec))
    # Delayed amaxes: 3 (quotients up to ~1e6), 1e-16 (quotients past 2^100 where y holds 1e20:
    # they overflow), 1e-30 (a scale under 2^-64): divided as the reference does (_div_scale).
    y = _x((64, 64), seed=5)
    y[40, 7:9] = torch.tensor([1e20, -1e20])
    for spec in [QuantSpec("fp8_e4m3"), QuantSpec("int8"), QuantSpec("fp8_e5m2")]:
        for a in (3.0, 1e-16, 1e-30):
            amax = torch.tensor(a)
            check_same_qtensor(quantize(y, spec, amax=amax), kq.quantize(y.to(DEV), spec, amax=amax.to(DEV)))


def test_group_scales_of_tiny_groups_divide_exactly():
    # Rows of very different size (1e-42 .. 1e3), including fp32 subnormals: scales whose
    # reciprocal overflows, for any faster division that goes through one (run 27 tried a
    # per-group reciprocal with an fma correction; it was exact but slower on the H100).
    g = torch.Generator().manual_seed(9)
    x = torch.randn(12, 64, generator=g) * torch.logspace(-42, 3, 12)[:, None]
    for spec in [QuantSpec("fp8_e4m3", 32, "fp32"), QuantSpec("fp8_e4m3", "row"),
                 QuantSpec("int8", "row"), QuantSpec("fp4_e2m1", 16, "e4m3"),
                 QuantSpec("fp8_e5m2", 16, "fp32", "stochastic")]:
        check_same_qtensor(quantize(x, spec, seed=3), kq.quantize(x.to(DEV), spec, seed=3))


def test_stochastic_seed_changes_bits_and_generator_is_reproducible():
    x = _x((16, 64), seed=6, outliers=False)
    spec = QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic")
    a, b = kq.quantize(x.to(DEV), spec, seed=1), kq.quantize(x.to(DEV), spec, seed=2)
    assert not torch.equal(a.data, b.data)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    check_same_qtensor(quantize(x, spec, generator=g1), kq.quantize(x.to(DEV), spec, generator=g2))


def test_unsupported_falls_back_to_reference():
    x = _x((4, 48), seed=8)
    for spec in [QuantSpec("nf4", 64, "fp32"), QuantSpec("fp8_e4m3", 24, "fp32")]:
        assert not kq.supports(x, spec)
        check_same_qtensor(quantize(x, spec), kq.quantize(x, spec))
    with pytest.raises(ValueError, match="delayed scaling"):
        kq.quantize(x.to(DEV), QuantSpec("fp8_e4m3", 32, "e8m0"), amax=torch.tensor(1.0))


def test_rejects_what_the_reference_rejects():
    # A drop-in: the same calls fail with the same errors (a 0-d tensor has no quantized axis).
    for bad in (torch.tensor(2.0), torch.ones(4, 32, dtype=torch.int32)):
        with pytest.raises((ValueError, TypeError)) as ref_err:
            quantize(bad, QuantSpec("fp8_e4m3"))
        with pytest.raises(type(ref_err.value), match=re.escape(str(ref_err.value))):
            kq.quantize(bad.to(DEV), QuantSpec("fp8_e4m3"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt,block,scale", SPECS)
def test_gpu_large_matches_reference(fmt, block, scale):
    # The reference runs on the CPU: on CUDA, PyTorch divides a tensor by a Python float through
    # the rounded reciprocal, so lowbit.quant's fp32/e4m3 scales are not IEEE quotients there.
    spec = QuantSpec(fmt, block, scale, "stochastic")
    x = _x((1024, 4096 + 64), seed=11, dtype=torch.bfloat16)
    xc = x.cuda()
    check_same_qtensor(quantize(x, spec, seed=77), kq.quantize(xc, spec, seed=77))
    check_same_qtensor(quantize(x.t(), spec.with_rounding("nearest")),
                        kq.quantize(xc.t(), spec.with_rounding("nearest")))


@pytest.mark.parametrize("spec", [QuantSpec("fp4_e2m1", 32, "e8m0"), QuantSpec("fp4_e2m1", 32, "e8m0_up"),
                                  QuantSpec("fp4_e2m1", 16, "e4m3"), QuantSpec("fp4_e2m1", 16, "fp32")])
def test_fp4_words_ties_signs_and_cleared_groups_as_the_reference(spec):
    # The packed-words FP4 codes (bf16 input, nearest) take magnitudes from |x|, signs from x's
    # bits and clear whole groups whose divisor is NaN or 0 with one mask: every E2M1 tie and its
    # bf16 neighbours, both signs and -0, a NaN group, an Inf group, and (NVFP4) blocks whose
    # e4m3 scale underflows next to a large block (+0 codes, negative values included).
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.bfloat16)
    bits = mids.view(torch.int16)
    below, above = (bits - 1).view(torch.bfloat16), (bits + 1).view(torch.bfloat16)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 5.97, 6.5, 7.9], dtype=torch.bfloat16)
    v = torch.cat([mids, below, above, grid]).float()
    vals = torch.cat([v, -v, torch.tensor([-0.0, 1e-30, -1e-30, 0.0, 3.0, -2.0])])  # 70 -> 64 below
    x = torch.stack([vals[:64] * 4.0, vals[:64] / 8.0, vals[:64].flip(0), vals[:64]]).repeat(2, 1)
    x[2, 40] = float("nan")
    x[3, 5] = float("inf")
    x[4, :16] = torch.tensor([1e-30, -1e-30, -0.0, 2e-30] * 4)  # tiny next to row 5's 1e3: NVFP4 zero blocks
    x[5, 20] = 1e3
    x = x.to(torch.bfloat16)
    finite = x.nan_to_num(1.0, 1.0)  # NVFP4: a NaN or Inf anywhere makes every scale NaN
    import lowbit.kernels._quantize_triton as kt

    assert kt.PAIRED_WORDS
    for m in (x, finite):
        check_same_qtensor(quantize(m, spec), kq.quantize(m.to(DEV), spec))
    if spec.scale == "e4m3":  # the case is real: a block scale of 0 with nonzero values in it
        assert (quantize(finite, spec).scale.float()[4] == 0).any()


@pytest.mark.parametrize("scale", ["e8m0", "e4m3"])
def test_fp4_ties_saturation_and_specials_round_as_the_reference(scale):
    # Every E2M1 rounding tie (midpoints 0.25 .. 5), its fp32 neighbours, the saturation edge and
    # NaN/Inf, scaled by a power of two so that the group scale leaves them on the tie exactly.
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    below, above = torch.nextafter(mids, torch.zeros(7)), torch.nextafter(mids, torch.full((7,), 9.0))
    grid_and_edges = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 5.99, 6.5, 7.9, 1e-30])
    vals = torch.cat([mids, below, above, grid_and_edges])
    vals = torch.cat([vals, -vals])  # 64 values: two groups of 32
    x = torch.stack([vals * 4.0, vals / 8.0, vals.flip(0)])
    x[2, 40] = float("nan")
    x[2, 41] = float("inf")
    spec = QuantSpec("fp4_e2m1", 16 if scale == "e4m3" else 32, scale)
    ref = quantize(x, spec)
    check_same_qtensor(ref, kq.quantize(x.to(DEV), spec))
    # The ties sit on the grid's midpoints after scaling only if the scale is the power of two
    # the amax implies: check that the first row's first group really rounds ties to even.
    if scale == "e8m0":
        got = ref.dequantize()[0, :7] / 4.0
        assert got.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
