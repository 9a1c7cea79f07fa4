"""Rounding fp32 values onto an element format's grid, in portable fp32/integer arithmetic.

Every result is computed so that the final value is *exactly* a grid point held in fp32; a later
cast to a storage dtype (float8, packed fp4) is then exact. Nothing relies on a float downcast to
round (the Triton interpreter rounds `.to(tl.float8e4nv)` wrongly), and the Triton port must repeat
these steps literally to match bit for bit.

Float formats (E bits, M mantissa bits, bias B, emin = 1 - B, emax = floor(log2 max)):
    a  = min(|y|, max)                        saturate first: the result can never exceed max
    e  = ((bits(a) >> 23) & 0xFF) - 127       floor(log2 a) from the fp32 exponent field
    et = clamp(e, emin, emax)                 below emin the format is subnormal: fixed quantum
    v  = a * 2^(M - et)                       exact power-of-two scaling; v < 2^(M+1)
    nearest:     r = (v + 2^23) - 2^23        fp32 add: round-half-to-even for 0 <= v < 2^22
    stochastic:  r = floor(v) + (v - floor(v) > u),  u = (hash >> 8) * 2^-24 in [0, 1)
    q  = copysign(r * 2^(et - M), y)          exact
Integer formats (symmetric, qmax = 7 or 127): v = clamp(y, -qmax, qmax), then the same nearest
(on |v|, sign restored) or stochastic (on v) step with a quantum of 1.
Codebook formats (NF4): nearest = the code whose midpoint interval holds y (ties to the lower code);
stochastic = one of the two neighbouring codes c_lo <= y < c_hi, the upper with probability
(y - c_lo) / (c_hi - c_lo).

Stochastic rounding is unbiased inside the range (E[q] = y up to the 2^-24 resolution of u) and
saturating outside it (values beyond max always give ±max, so E[q] is then biased towards 0).

Special values (before any scaling; see quantize.py for what scaling does with them):
    NaN  -> NaN (in the fp32 result; formats without a NaN code get it from the block scale)
    ±Inf -> ±Inf for fp8_e5m2 (it has Inf), otherwise saturates to ±max
    finite beyond ±max -> ±max (saturation, all formats)
    fp32 subnormals and values below half the smallest subnormal -> ±0

Random bits: a counter-based hash, so no noise tensor is stored and Triton (uint32) reproduces the
same bits from (seed, element index) alone:
    x = (index + seed * 0x9E3779B9) mod 2^32
    x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16   (all mod 2^32)
("lowbias32", Chris Wellons' hash-prospector). `index` is the element's row-major index in the
tensor handed to `quantize` after its quantized axis was moved last (before any block padding).
"""

from __future__ import annotations

import torch

from lowbit.quant.formats import ElementFormat, device_table, get_format

ROUNDING_MODES = ("nearest", "stochastic")
MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9  # 2^32 / golden ratio: consecutive seeds land far apart in the index space
_TWO23 = 8388608.0  # 2^23: adding it rounds an fp32 in [0, 2^22) to an integer, half to even


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash of int64 values taken mod 2^32; returns int64 in [0, 2^32)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def lowbias32_int(x: int) -> int:
    """`lowbias32` on one Python int (host-side seed derivation; no tensor round trip)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def seed_offset(seed: int | torch.Tensor | DeviceSeed) -> int | torch.Tensor:
    """seed * 0x9E3779B9 mod 2^32: what the hash adds to each element index (kernels get this int).

    A seed may be an integer tensor (a traced layer's seeds live on the device): the offset is then
    an int64 tensor with the same value (int64 products wrap mod 2^64, which keeps the low 32 bits).
    A DeviceSeed's offset is read from its table (a view: no device work)."""
    if isinstance(seed, DeviceSeed):
        return seed.table[1, seed.row, seed.k]
    if isinstance(seed, torch.Tensor):
        return (seed.to(torch.int64) * GOLDEN32) & MASK32
    return (int(seed) * GOLDEN32) & MASK32


# A GEMM call's seed feeds up to five hash streams: its own (Hadamard signs) and the sub-streams
# lowbit.quant.gemm.derive_seed(seed, k) for k = 1..4 (operand A's and B's stochastic rounding,
# a bit split's residual, leverage sampling).
DERIVED_STREAMS = 5
DERIVE_STEP = 0x632BE5AB  # derive_seed(seed, k) = (seed + k * step) mod 2^31


def seed_table(seeds: torch.Tensor) -> torch.Tensor:
    """For n int64 seeds (31-bit, on any device): an int64 table (2, n, DERIVED_STREAMS) holding
    each seed's derived seeds (k = 0 is the seed itself) in [0] and their hash offsets in [1].

    A traced layer's seeds live on the device. Deriving seeds and offsets from them with tensor
    ops at every kernel launch cost ~70 tiny device ops per layer call; the table computes them
    all in a few ops per call, and each use is then a view of it (DeviceSeed). Entry k = 0 is
    the seed as given (as an int seed is used), the others derive_seed's 31-bit values."""
    s = seeds.to(torch.int64).reshape(-1, 1)
    k = torch.arange(DERIVED_STREAMS, device=seeds.device, dtype=torch.int64)
    values = torch.where(k == 0, s, (s + k * DERIVE_STEP) & 0x7FFFFFFF)
    return torch.stack((values, (values * GOLDEN32) & MASK32))


class DeviceSeed:
    """Seed `k` of row `row` of a `seed_table`: a seed that lives on the device.

    lowbit.quant.gemm.derive_seed and `seed_offset` take it in place of an int and answer with
    views of the table; where a tensor is needed, `value()` is the seed as a 0-d int64 tensor."""

    __slots__ = ("table", "row", "k")

    def __init__(self, table: torch.Tensor, row: int, k: int = 0) -> None:
        self.table, self.row, self.k = table, row, k

    def value(self) -> torch.Tensor:
        return self.table[0, self.row, self.k]

    def derived(self, k: int) -> DeviceSeed | torch.Tensor:
        """derive_seed(self, k): a view of the table where it holds that stream, else computed."""
        if self.k == 0 and 1 <= k < DERIVED_STREAMS:
            return DeviceSeed(self.table, self.row, k)
        return (self.value() + k * DERIVE_STEP) & 0x7FFFFFFF


def hash_bits(seed: int, numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """32 random bits (int64 in [0, 2^32)) for each flat index 0..numel-1 under `seed`."""
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    return lowbias32(idx + seed_offset(seed))


def uniform_noise(
    seed: int, shape: torch.Size | tuple[int, ...], device: torch.device | str | None = None
) -> torch.Tensor:
    """u in [0, 1) with 24 random bits, exact in fp32: (hash >> 8) * 2^-24, laid out row-major."""
    n = 1
    for s in shape:
        n *= int(s)
    bits = hash_bits(seed, n, device) >> 8
    return (bits.to(torch.float32) * 2.0**-24).reshape(shape)


def exp2i(k: torch.Tensor) -> torch.Tensor:
    """2^k as fp32 for integer k in [-149, 127], built from its bit pattern (exact on every device;
    pow/ldexp may go through a pow() that is not guaranteed exact on GPUs)."""
    k = k.to(torch.int32)
    normal = (k + 127).clamp(min=1) << 23  # biased exponent field, zero mantissa
    subnormal = torch.ones_like(k) << (k + 149).clamp(0, 22)  # 2^-149 · 2^(k+149)
    return torch.where(k >= -126, normal, subnormal).view(torch.float32)


def _round_half_even_nonneg(v: torch.Tensor) -> torch.Tensor:
    return (v + _TWO23) - _TWO23


def check_rounding(mode: str) -> None:
    """Raise ValueError naming `mode` and the valid rounding modes unless it is one of them."""
    if mode not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding={mode!r}; valid choices: {', '.join(ROUNDING_MODES)}")


def round_to_format(
    y: torch.Tensor,
    fmt: str | ElementFormat,
    rounding: str = "nearest",
    noise: torch.Tensor | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Round fp32 `y` (already divided by its scale) to the nearest / a stochastic grid value of `fmt`.

    For stochastic rounding pass either `noise` (u in [0, 1), shape of y) or `seed` (noise from the
    hash of the row-major index). Returns fp32 values exactly on the grid.
    """
    fmt = get_format(fmt)
    check_rounding(rounding)
    y = y.float()
    if rounding == "stochastic" and noise is None:
        if seed is None:
            raise ValueError("stochastic rounding needs `noise` or a `seed`")
        noise = uniform_noise(seed, y.shape, y.device)
    if fmt.kind == "float":
        return _round_float(y, fmt, rounding, noise)
    if fmt.kind == "int":
        return _round_int(y, fmt, rounding, noise)
    return _round_codebook(y, fmt, rounding, noise)


def _round_float(
    y: torch.Tensor, fmt: ElementFormat, rounding: str, noise: torch.Tensor | None
) -> torch.Tensor:
    a = torch.clamp(y.abs(), max=fmt.max)  # NaN stays NaN; +Inf saturates here
    e = ((a.view(torch.int32) >> 23) & 0xFF) - 127
    et = torch.clamp(e, fmt.emin, fmt.emax)
    v = a * exp2i(fmt.mbits - et)
    if rounding == "nearest":
        r = _round_half_even_nonneg(v)
    else:
        fl = torch.floor(v)
        r = fl + ((v - fl) > noise).to(torch.float32)
    q = torch.copysign(r * exp2i(et - fmt.mbits), y)
    if fmt.has_inf:
        q = torch.where(torch.isinf(y), y, q)
    return q


def _round_int(
    y: torch.Tensor, fmt: ElementFormat, rounding: str, noise: torch.Tensor | None
) -> torch.Tensor:
    v = torch.clamp(y, -fmt.max, fmt.max)
    if rounding == "nearest":
        return torch.copysign(_round_half_even_nonneg(v.abs()), v)
    fl = torch.floor(v)
    return fl + ((v - fl) > noise).to(torch.float32)


def _round_codebook(
    y: torch.Tensor, fmt: ElementFormat, rounding: str, noise: torch.Tensor | None
) -> torch.Tensor:
    code = device_table(fmt.codebook, y.device)
    v = torch.clamp(y, -fmt.max, fmt.max)
    if rounding == "nearest":
        mids = (code[1:] + code[:-1]) * 0.5
        q = code[torch.bucketize(v, mids, right=False)]
    else:
        lo = torch.clamp(torch.bucketize(v, code, right=True) - 1, 0, len(code) - 2)
        c_lo, c_hi = code[lo], code[lo + 1]
        p = (v - c_lo) / (c_hi - c_lo)
        q = torch.where(p > noise, c_hi, c_lo)
    return torch.where(torch.isnan(y), y, q)
