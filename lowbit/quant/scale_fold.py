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

`fold_blocks` folds the same way into smaller scale blocks, for cuBLAS's blockwise fp8 GEMM
(DeepSeek-V3's layout): one scale per 128 along K (`rows=1`, "chunks", cuBLAS's 1x128 for either
operand) or per 128 x 128 tile (`rows=128`, cuBLAS's 128x128, for one operand of the pair). A
block's largest group scale sets its scale, so the exact range above holds within each block
rather than across a whole row. Its point is that a quantizer holding a block can fold it before
writing (lowbit.kernels.column_quantize): the fold then costs no pass of its own. Always e4m3
(cuBLAS's blockwise GEMM takes no e5m2 operand); a NaN scale makes its whole block NaN.
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


FOLD_BLOCK = 128  # the side of fold_blocks' blocks along K (and along the rows of a tile)


def fold_blocks(q: QTensor, rows: int) -> QTensor:
    """q (E2M1, power-of-two group scales along K) as e4m3 values with one fp32 scale per 1 x 128
    chunk (`rows=1`, scales (R, K/128)) or per 128 x 128 tile (`rows=128`, scales (ceil(R/128), K/128)).

    As `fold_group_scales`, with each block's largest group scale in place of the row's."""
    reason = why_not_fold(q)
    if reason is None and (rows not in (1, FOLD_BLOCK) or FOLD_BLOCK % q.block):
        reason = f"rows={rows} with groups of {q.block} (blocks are 1 or {FOLD_BLOCK} rows by " \
            f"{FOLD_BLOCK} along K, whole groups each)"
    if reason is None and q.shape[1] % FOLD_BLOCK:
        reason = f"K={q.shape[1]} is not a multiple of {FOLD_BLOCK}"
    if reason is not None:
        raise ValueError(f"fold_blocks: {reason}")
    r, k = q.shape
    scale = q.scale.float()  # (R, K / G)
    per = FOLD_BLOCK // q.block
    pad = (-r) % rows  # a ragged last tile holds fewer rows
    s = torch.nn.functional.pad(scale, (0, 0, 0, pad), value=0.0)
    s = s.reshape((r + pad) // rows, rows, k // FOLD_BLOCK, per)
    top = s.amax(dim=(1, 3))  # (blocks along R, blocks along K); NaN propagates
    block_scale = top * 2.0 ** -HEADROOM[torch.float8_e4m3fn]
    per_group = block_scale.repeat_interleave(rows, 0)[:r].repeat_interleave(per, 1)
    ratio = torch.where(per_group.isnan(), float("nan"), scale / per_group)
    values = q.values() * expand_scale(ratio, q.block, q.shape)
    block = FOLD_BLOCK if rows == 1 else (FOLD_BLOCK, FOLD_BLOCK)
    return QTensor(
        data=values.to(torch.float8_e4m3fn), scale=block_scale, fmt=FORMATS["fp8_e4m3"], block=block,
        shape=q.shape, axis=q.axis, dtype=q.dtype, packed=False,
    )


def is_block_folded(q: QTensor) -> bool:
    """Whether q is what fold_blocks returns (e4m3 with fp32 scales a 1 x 128 chunk or 128 x 128 tile)."""
    return q.fmt.name == "fp8_e4m3" and q.block in (FOLD_BLOCK, (FOLD_BLOCK, FOLD_BLOCK)) \
        and q.tensor_scale is None
