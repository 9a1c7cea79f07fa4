"""FP4 operands with power-of-two group scales, folded into fp8 values with one scale a row.

Hopper has no block-scaled MMA. An MXFP4 operand (E2M1 values, an E8M0 scale every 32 along K)
can still run on its fp8 tensor cores: every scale is a power of two and an E2M1 value has two
significant bits, so value × (group scale / row scale) is an fp8 number whenever the row scale is
close enough to the row's largest group scale. Then

    dequant(q)[r, k] = fold(q).data[r, k] · fold(q).scale[r]

and A·B^T is a plain fp8 GEMM whose fp32 sums are multiplied by A's row scale and B's column
scale afterwards (lowbit.kernels.parts_gemm), the same epilogue as a row-scaled fp8 pair.

The row scale is the row's largest group scale S divided by 2^HEADROOM[dtype]: 2^13 for e5m2 and
2^6 for e4m3, so the largest value, 6 · 2^13 = 49152 or 6 · 2^6 = 384, stays under the format's
maximum (57344, 448). A value of a group whose scale is s sits at |v| · (s / S) · 2^HEADROOM;
it is exact in fp8 while s / S ≥ 2^-28 (e5m2) or 2^-14 (e4m3): E2M1's 1.5 · 2^j needs 2^(j-1)
at or above the format's smallest subnormal (2^-16, 2^-9). A group further below its row's largest
is rounded to nearest-even on the fp8 grid, as torch's cast rounds it: an error of at most half
the smallest subnormal, i.e. 2^-30 · S (e5m2) or 2^-16 · S (e4m3), against a row whose largest
element is at least 2 · S. `exact_range_log2` gives those bounds for a test or a caller to check.

NaN scales (a NaN in the block) make their whole row NaN (every value and the row scale), which a
GEMM turns into the same NaN output row as the unfolded operand gives. A row of all-zero blocks
(scale 2^-127, lowbit.quant.scaling) folds to zeros.

`lowbit.kernels.scale_fold` is the same fold in Triton (a pass over the scales, one over the codes),
bit for bit this function.
"""

from __future__ import annotations

import torch

from lowbit.quant.formats import FORMATS
from lowbit.quant.qtensor import QTensor, expand_scale

# log2 of the room kept under each fp8 format's maximum for E2M1's largest value, 6.
HEADROOM = {torch.float8_e5m2: 13, torch.float8_e4m3fn: 6}
_FMT_NAME = {torch.float8_e5m2: "fp8_e5m2", torch.float8_e4m3fn: "fp8_e4m3"}


def exact_range_log2(dtype: torch.dtype) -> int:
    """The most negative log2(group scale / row's largest group scale) whose values fold exactly."""
    fmt = FORMATS[_FMT_NAME[dtype]]
    smallest_subnormal_log2 = 1 - fmt.bias - fmt.mbits
    return smallest_subnormal_log2 + 1 - HEADROOM[dtype]


def why_not_fold(q: QTensor) -> str | None:
    """None when `fold_group_scales` takes q; else the reason."""
    if q.fmt.name != "fp4_e2m1":
        return f"element format {q.fmt.name} (the fold takes fp4_e2m1)"
    if not isinstance(q.block, int) or q.tensor_scale is not None:
        return f"block {q.block!r}{' with a tensor scale' if q.tensor_scale is not None else ''} " \
            "(the fold takes 1-D groups along K with power-of-two scales and no tensor scale)"
    if len(q.shape) != 2:
        return f"a {len(q.shape)}-D operand (the fold takes (rows, K))"
    return None


def fold_group_scales(q: QTensor, dtype: torch.dtype = torch.float8_e4m3fn) -> QTensor:
    """q (E2M1, power-of-two group scales along K) as fp8 `dtype` values with one fp32 scale a row.

    The caller vouches that q's group scales are powers of two (E8M0: the QuantSpec's scale
    format); see the module docstring for when the result is exact.
    """
    reason = why_not_fold(q)
    if reason is not None:
        raise ValueError(f"fold_group_scales: {reason}")
    if dtype not in HEADROOM:
        raise ValueError(f"fold_group_scales: dtype {dtype}; valid choices: {', '.join(map(str, HEADROOM))}")
    scale = q.scale.float()
    top = scale.amax(dim=-1, keepdim=True)  # NaN propagates: the row is NaN
    row = top * 2.0 ** -HEADROOM[dtype]
    ratio = scale / row
    ratio = torch.where(top.isnan(), float("nan"), ratio)
    values = q.values() * expand_scale(ratio, q.block, q.shape)
    return QTensor(
        data=values.to(dtype), scale=row.reshape(-1), fmt=FORMATS[_FMT_NAME[dtype]], block="row",
        shape=q.shape, axis=q.axis, dtype=q.dtype, packed=False,
    )
