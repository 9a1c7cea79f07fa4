"""Element formats: what values a low-precision number can take.

Each format is described by numbers only (exponent/mantissa bits, bias, largest value), never by a
torch dtype: fp6/fp4 have no arithmetic dtype, and the rounding code (rounding.py) must run the same
way in PyTorch and in Triton. Tests check these descriptions against independent oracles (torch's
float8/float4 dtypes, `ml_dtypes`, the published NF4 table).

| name      | kind     | max    | min normal | min subnormal | Inf | NaN |
|-----------|----------|--------|------------|---------------|-----|-----|
| fp8_e4m3  | float    | 448    | 2^-6       | 2^-9          | no  | yes (OCP E4M3 "fn")         |
| fp8_e5m2  | float    | 57344  | 2^-14      | 2^-16         | yes | yes                         |
| fp6_e3m2  | float    | 28     | 2^-2       | 2^-4          | no  | no                          |
| fp6_e2m3  | float    | 7.5    | 1          | 2^-3          | no  | no                          |
| fp4_e2m1  | float    | 6      | 1          | 0.5           | no  | no  {0, .5, 1, 1.5, 2, 3, 4, 6} |
| int8      | int      | 127    |            |               |     | symmetric [-127, 127]       |
| int4      | int      | 7      |            |               |     | symmetric [-7, 7], -8 unused |
| nf4       | codebook | 1      |            |               |     | QLoRA NormalFloat4, 16 values |
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ElementFormat:
    name: str
    kind: str  # "float" | "int" | "codebook"
    bits: int
    max: float  # largest finite magnitude
    ebits: int = 0
    mbits: int = 0
    bias: int = 0
    has_inf: bool = False
    has_nan: bool = False
    codebook: tuple[float, ...] = ()

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal (float formats)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest normal, floor(log2(max)); the OCP MX scale rule subtracts it."""
        return math.floor(math.log2(self.max))

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin if self.kind == "float" else 1.0

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits) if self.kind == "float" else 1.0

    def grid(self) -> torch.Tensor:
        """All finite non-negative values of the format, ascending (fp32). Used by tests and encoders."""
        if self.kind == "int":
            return torch.arange(0, int(self.max) + 1, dtype=torch.float32)
        if self.kind == "codebook":
            return torch.tensor(sorted(v for v in self.codebook if v >= 0), dtype=torch.float32)
        vals = [m * 2.0 ** (self.emin - self.mbits) for m in range(2**self.mbits)]  # subnormals
        for e in range(self.emin, self.emax + 1):
            vals += [(1 + m / 2**self.mbits) * 2.0**e for m in range(2**self.mbits)]
        return torch.tensor([v for v in vals if v <= self.max], dtype=torch.float32)


# The NF4 code as published with QLoRA (Dettmers et al. 2023; bitsandbytes' table): quantiles of
# N(0, 1) with an exact zero, normalized to [-1, 1]. Kept literally so that NF4 weights written by
# other tools decode bit-identically; the tests re-derive it from the normal quantiles.
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


FORMATS: dict[str, ElementFormat] = {
    f.name: f
    for f in [
        ElementFormat("fp8_e4m3", "float", 8, 448.0, ebits=4, mbits=3, bias=7, has_nan=True),
        ElementFormat("fp8_e5m2", "float", 8, 57344.0, ebits=5, mbits=2, bias=15, has_inf=True, has_nan=True),
        ElementFormat("fp6_e3m2", "float", 6, 28.0, ebits=3, mbits=2, bias=3),
        ElementFormat("fp6_e2m3", "float", 6, 7.5, ebits=2, mbits=3, bias=1),
        ElementFormat("fp4_e2m1", "float", 4, 6.0, ebits=2, mbits=1, bias=1),
        ElementFormat("int8", "int", 8, 127.0),
        ElementFormat("int4", "int", 4, 7.0),
        ElementFormat("nf4", "codebook", 4, 1.0, codebook=NF4_CODEBOOK),
    ]
}


@functools.lru_cache(maxsize=64)
def _table(values: tuple[float, ...], device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def device_table(values: tuple[float, ...], device: torch.device | str) -> torch.Tensor:
    """A small constant table (codebook, magnitudes) on `device`, built once per device."""
    return cached_constant(_table, tuple(values), str(torch.device(device)))


def tracing() -> bool:
    """True while a graph is traced on fake tensors (torch.compile, a graph op's shape function):
    a constant cached then would be a fake tensor of that trace, so cached constants are rebuilt."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode() is not None


def cached_constant(build: Any, *args: Any) -> torch.Tensor:
    """`build(*args)` through its functools cache, or built afresh while tracing (`tracing`)."""
    return build.__wrapped__(*args) if tracing() else build(*args)


def get_format(name: str | ElementFormat) -> ElementFormat:
    """The format named `name` (an ElementFormat passes through); the error lists the valid names."""
    if isinstance(name, ElementFormat):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown element format {name!r}; valid choices: {', '.join(FORMATS)}") from None
