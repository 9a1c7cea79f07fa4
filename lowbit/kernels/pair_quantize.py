"""A matrix and its transpose quantized in one pass, and the tensor amax in one pass.

A linear layer needs each of X, W and dY twice, once along each axis: X along `in` for fprop and
X^T along `tokens` for wgrad, W along `in` for fprop and W^T along `out` for dgrad, dY along
`out` for dgrad and dY^T along `tokens` for wgrad. `quantize_pair(x, spec, spec_t)` reads x once
and writes both, each bit for bit what lowbit.quant.quantize gives:

    q, q_t = quantize_pair(x, spec, spec_t, seed=s, seed_t=s_t, amax=a)
    q   == quantize(x,     spec,   seed=s,   amax=a)
    q_t == quantize(x.t(), spec_t, seed=s_t, amax=a)

Supported pairs (`why_not_pair` names what is not; GROUPS_ON_CUDA and ROWS_ON_CUDA below can turn
group/tile and row scaling off on CUDA): fp8 e4m3/e5m2 or int8 elements, the same format and scale
format on both sides (fp32, e8m0, e8m0_up); blocks "tensor" on both sides (one amax), "row" on both
sides (a scale per row of x and per row of x^T: the row and column amaxes from one read of x, the
codes from a second; lowbit.kernels._row_pair_triton), 1-D groups along each side's K (powers of
two up to MAX_GROUP = 128: the tile holds whole groups both ways), or a 2-D tile on both sides
that is the transpose of the other. With one tensor or tile scale and nearest rounding x^T's grid
values are x's transposed and are rounded once (SHARE_CODES).

Tensor scaling needs the amax before any element is rounded: `tensor_amax` is one read of x
(integer max of the |x| bits in registers, one atomic per program; NaN sorts above Inf, so it
propagates as in the reference). Delayed scaling passes `history=(row, row_t)`, the two operands'
amax-history rows (fp32 device buffers): the pass scales by the history's max (a first call, while
the rows hold only zeros, by x's own amax: a history-gated amax launch that otherwise returns at
once), records x's own amax in both rows without another read, and never syncs, so it runs the
same inside CUDA graphs.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.env_flags import env_flag
from lowbit.kernels.quantize import interpret, triton_available
from lowbit.quant.qtensor import QTensor
from lowbit.quant.quantize import QuantSpec
from lowbit.quant.rounding import seed_offset

_ENC = {"fp8_e4m3": 0, "fp8_e5m2": 1, "int8": 2}
_DTYPE = {0: torch.float8_e4m3fn, 1: torch.float8_e5m2, 2: torch.int8}
_SMODE = {"fp32": 0, "e8m0": 1, "e8m0_up": 2}
# With one scale and nearest rounding X^T's values are X's transposed, so the kernel can round
# once and encode the transposed grid values (SHARE_CODES). On the H100 (Triton 3.6) the hardware
# e4m3 cast of a transposed tile gave wrong X^T (runs 9 and 11 of docs/BENCHMARKS.md); the shared
# path now assembles the transposed codes bit by bit instead, which the GPU tests show right
# (run 20), but it measured no faster than rounding X^T again (run 20: layer and 1b end to end
# within run-to-run noise), so it stays off by default. LOWBIT_PAIR_SHARE=1 switches it on.
SHARE_CODES = env_flag("LOWBIT_PAIR_SHARE", False)
# Tile side for tensor and 1-D group scaling (groups wider than this widen the tile).
PAIR_TILE = 64
# 1-D groups of up to 32 both ways (MXFP8): 32 x 128 tiles on 2 warps. Run 158 of docs/BENCHMARKS.md
# (`benchmarks/pair_groups_bw.py --sweep`) took the MXFP8 pair from 0.56-0.57 of a copy on 64 x 64
# tiles and 4 warps to 0.82-0.84 (bf16 8192 x 4096 / x 14336); 32 x 256 on 2 warps gave 0.72-0.77,
# 64 x 64 on 2 warps 0.64-0.65, and more warps were slower for every tile.
SMALL_GROUP_TILE = (32, 128)
SMALL_GROUP_WARPS = 2
# The same pairs with a side written as bf16 values (quantize_pair_values): 32 x 128 tiles on 4
# warps. Run 178 (`benchmarks/pair_values_bw.py --sweep`, bf16 16384 x 2048 / x 8192): 0.82-0.83 of
# a copy on 4 warps against 0.70-0.75 on 2; 64 x 64, 64 x 128, 32 x 256 and 128 x 64 tiles on 2-8
# warps 0.34-0.75.
VALUES_TILE = (32, 128)
VALUES_WARPS = 4
# Widest group (and 2-D tile side) taken: 128, so 1x128 groups (a 128 x 128 tile) and 128 x 128
# tiles pair up (fp8_blockwise). Early on such a tile spilled registers on the H100 (an
# fp8_blockwise layer took 47 ms); run 154 found both bit-exact and 2.7-2.8x (1x128) and 3.3-3.5x
# (128 x 128) faster than two single quantizes on 8192 x 4096 / x 14336 bf16.
MAX_GROUP = 128
# Group- and tile-scaled pairs on CUDA: on by default; LOWBIT_PAIR_GROUPS=0 turns them off (X^T then
# goes through the single quantize kernel on the transposed view). They make the mxfp8 /
# fp8_blockwise layers 1.3-1.5x faster. They were off for a while: one 20-step 1b mxfp8 run ended at
# a train loss of 4.80 with them against 4.20 without (runs 162-163 of docs/BENCHMARKS.md). Runs
# 164-165 found no fault: 20 eager steps gave bit-identical losses with and without them (6,720
# pair calls checked byte for byte against the single kernels), while compiled training with CUDA
# graphs is itself not deterministic and an early loss spike amplifies that (two runs without the
# pairs already differed from step 7).
GROUPS_ON_CUDA = env_flag("LOWBIT_PAIR_GROUPS", True)
# Row-scaled pairs on CUDA (fp8_rowwise, int8): on by default; LOWBIT_PAIR_ROWS=0 turns them off
# (X^T is then copied row-major and quantized by the single kernel, as before them).
ROWS_ON_CUDA = env_flag("LOWBIT_PAIR_ROWS", True)


def _runnable(x: torch.Tensor) -> bool:
    return triton_available() and (x.is_cuda or (interpret() and x.device.type == "cpu"))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def why_not_pair(x: torch.Tensor, spec: QuantSpec, spec_t: QuantSpec) -> str | None:
    """None when quantize_pair handles (x, spec, spec_t); else the reason."""
    if not _runnable(x):
        return "needs a CUDA tensor (or the Triton interpreter on CPU)"
    if x.dim() != 2 or not x.is_floating_point() or x.numel() == 0:
        return f"needs a non-empty floating-point matrix, got {tuple(x.shape)} {x.dtype}"
    if spec.fmt != spec_t.fmt or spec.scale != spec_t.scale:
        return f"formats differ ({spec.fmt}/{spec.scale} vs {spec_t.fmt}/{spec_t.scale})"
    if spec.fmt not in _ENC or spec.scale not in _SMODE:
        return f"{spec.fmt} with {spec.scale} scales is not supported (fp8/int8 with fp32/e8m0 scales)"
    a, b = spec.block, spec_t.block
    if (a == "tensor") != (b == "tensor"):
        return "tensor scaling needs block='tensor' on both sides"
    if a == "row" and x.is_cuda and not ROWS_ON_CUDA:
        return "row scaling is off on CUDA (ROWS_ON_CUDA: LOWBIT_PAIR_ROWS=0)"
    if a not in ("tensor", "row") and x.is_cuda and not GROUPS_ON_CUDA:
        return "group and tile scaling are off on CUDA (GROUPS_ON_CUDA; see the note there)"
    if a == "tensor" and spec.scale != "fp32" and x.is_cuda:
        # Run 30: X^T of a 64 x 256 e4m3 pair with an e8m0 tensor scale came out with other rows'
        # values in it on the H100 (Triton 3.6 casting tl.trans(x) * s); no recipe needs the pair.
        return f"tensor scaling with {spec.scale} scales is off on CUDA (see _quant_tile)"
    if isinstance(a, tuple) or isinstance(b, tuple):
        if not (isinstance(a, tuple) and isinstance(b, tuple) and b == a[::-1]):
            return f"2-D tiles must be transposes of each other, got {a} and {b}"
        if not all(_pow2(v) and v <= MAX_GROUP for v in a):
            return f"2-D tile {a} (needs powers of two up to {MAX_GROUP})"
        return None
    if (a == "row") != (b == "row"):
        return f"row scaling needs block='row' on both sides, got {a!r} and {b!r}"
    for blk in (a, b):
        group = isinstance(blk, int) and _pow2(blk) and 2 <= blk <= MAX_GROUP
        if blk not in ("tensor", "row") and not group:
            return f"block {blk!r} (needs 'tensor', 'row', a power-of-two group up to {MAX_GROUP}, " \
                "or a 2-D tile)"
    return None


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 1-element fp32 tensor, one read of x (NaN if x holds a NaN, as the reference)."""
    from lowbit.kernels._pair_quantize_triton import launch_amax

    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    bits = torch.zeros(1, dtype=torch.int32, device=x.device)
    launch_amax(x2, bits)
    return bits.view(torch.float32)


def quantize_pair(
    x: torch.Tensor,
    spec: QuantSpec,
    spec_t: QuantSpec,
    *,
    seed: int = 0,
    seed_t: int = 0,
    amax: torch.Tensor | None = None,
    tile: tuple[int, int] | None = None,
    history: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[QTensor, QTensor]:
    """(x quantized along its columns, x^T along its columns)."""
    reason = why_not_pair(x, spec, spec_t) or _why_not_history(x, spec, history, amax, spec_t)
    if reason is not None:
        raise ValueError(f"quantize_pair: {reason}")
    return _quantize_supported_pair(
        x, spec, spec_t, seed=seed, seed_t=seed_t, amax=amax, tile=tile, history=history
    )


def _why_not_history(
    x: torch.Tensor, spec: QuantSpec, history: tuple[torch.Tensor, torch.Tensor | None] | None,
    amax: torch.Tensor | None, spec_t: QuantSpec | None = None,
) -> str | None:
    if history is None:
        return None
    for s in (spec, spec_t):
        if s is not None and s.block != "tensor":
            return f"an amax history (delayed scaling) needs block='tensor', got {s.block!r}"
    if amax is not None:
        return "pass either amax or an amax history, not both"
    row, row_t = history
    if row_t is not None and (row_t.shape != row.shape or row_t.data_ptr() == row.data_ptr()):
        return f"the two amax-history rows must be distinct and of one length, got {tuple(row.shape)} " \
            f"and {tuple(row_t.shape)}"
    for row in history:
        if row is not None and (row.dtype != torch.float32 or row.dim() != 1 or not row.is_contiguous()
                                or row.device != x.device):
            return (f"amax-history rows must be contiguous fp32 vectors on {x.device}, got "
                    f"{tuple(row.shape)} {row.dtype} on {row.device}")
    return None


_Pair = tuple[QTensor, QTensor]


def _quantize_supported_pair(x: torch.Tensor, spec: QuantSpec, spec_t: QuantSpec, *, seed: int = 0,
                             seed_t: int = 0, amax: torch.Tensor | None = None,
                             tile: tuple[int, int] | None = None,
                             history: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                             values: tuple[bool, bool] = (False, False)) -> _Pair:
    # quantize_pair (same arguments) once why_not_pair has said yes (the GEMM seam checks first,
    # and the check is a sizeable part of the host time of a pair on a small layer). `values`:
    # quantize_pair_values' sides written as bf16 values (returned as tensors, not QTensors).
    from lowbit.kernels._pair_quantize_triton import (
        delayed_words,
        launch_amax_if_empty,
        launch_pair,
        launch_roll,
    )

    if amax is not None and spec.block != "tensor":
        raise ValueError(f"an amax override (delayed scaling) needs block='tensor', got {spec.block!r}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        x = x.float()
    x = x.detach()
    if spec.block == "row":
        if tile is not None:  # a tuning knob of the one-read pairs; rows have their own (_row_pair_triton)
            raise ValueError(f"tile={tile} is for tensor, group and 2-D tile pairs, not row scaling")
        return _row_pair(x, spec, spec_t, seed, seed_t)
    r, c = x.shape
    dev = x.device
    fmt, enc = spec.format, _ENC[spec.fmt]
    a, b = spec.block, spec_t.block
    warps = None
    if isinstance(a, tuple):
        ga = gb = -1
        br, bc = a
    else:
        ga = a if isinstance(a, int) else 0
        gb = b if isinstance(b, int) else 0
        small = 0 < min(ga, gb) and max(ga, gb) <= SMALL_GROUP_TILE[0]
        small_tile, small_warps = (VALUES_TILE, VALUES_WARPS) if any(values) else (SMALL_GROUP_TILE,
                                                                                    SMALL_GROUP_WARPS)
        br, bc = tile or (small_tile if small else (max(PAIR_TILE, gb), max(PAIR_TILE, ga)))
        warps = small_warps if small and tile is None else None
        if ga > bc or gb > br or bc % max(ga, 1) or br % max(gb, 1):
            raise ValueError(f"tile {(br, bc)} does not hold whole groups {ga} × {gb}")
    g_amax = rec = None
    if history is not None:  # x's own amax bits: read only on a first call, recorded always
        g_amax, rec = delayed_words(dev)
        launch_amax_if_empty(x, g_amax, rec, history[0])
    elif a == "tensor":
        g_amax = amax.float().reshape(1).to(dev) if amax is not None else tensor_amax(x)
    # Group scales stored group-major (as lowbit.kernels.quantize does): the GEMMs read one K-group's
    # scales for a tile of rows contiguously; cuBLAS's 1x128 layout is the same.
    if ga > 0:
        scale = torch.empty((-(-c // ga), r), dtype=torch.float32, device=dev).t()
        scale_t = torch.empty((-(-r // gb), c), dtype=torch.float32, device=dev).t()
    elif ga == 0:
        scale = torch.empty((1, 1), dtype=torch.float32, device=dev)
        scale_t = scale  # one scale for both (side B may skip its store when its codes are A's)
    else:  # a 2-D tile per program: each side stores its own copy of the tile's scale, laid out as
        # the single kernel lays out x^T's (group-major). As a view of X's it made a compiled graph
        # op's real outputs differ in stride from its fake ones (run 155 of docs/BENCHMARKS.md),
        # and an op's outputs may not alias each other.
        scale = torch.empty((-(-c // bc), -(-r // br)), dtype=torch.float32, device=dev).t()
        scale_t = torch.empty((-(-r // br), -(-c // bc)), dtype=torch.float32, device=dev).t()
    # Two allocations, not one: QuantLinear frees X's codes after fprop but keeps X^T's for wgrad.
    data = torch.empty((r, c), dtype=torch.bfloat16 if values[0] else torch.uint8, device=dev)
    data_t = torch.empty((c, r), dtype=torch.bfloat16 if values[1] else torch.uint8, device=dev)
    nearest = spec.rounding == "nearest" and spec_t.rounding == "nearest"
    launch_pair(
        x, data, data_t, scale, scale_t, g_amax, rec, fmt, enc, _SMODE[spec.scale], ga, gb,
        spec.rounding == "stochastic", spec_t.rounding == "stochastic", nearest and ga == 0 and SHARE_CODES,
        (br, bc), seed_offset(seed), seed_offset(seed_t), hist_row=None if history is None else history[0],
        own_amax=amax is None, num_warps=warps, values=values,
    )
    if history is not None:
        launch_roll(rec, history[0], history[1])
    dt = _DTYPE[enc]
    if ga == 0:
        scale = scale.reshape(())
        scale_t = scale
    size, size_t = torch.Size((r, c)), torch.Size((c, r))
    q = data if values[0] else QTensor(data.view(dt), scale, fmt, a, size, 1, x.dtype, False, None)
    q_t = data_t if values[1] else QTensor(data_t.view(dt), scale_t, fmt, b, size_t, 1, x.dtype, False, None)
    return q, q_t


def _row_pair(x: torch.Tensor, spec: QuantSpec, spec_t: QuantSpec, seed: int | torch.Tensor,
              seed_t: int | torch.Tensor) -> _Pair:
    # One scale per row of x and one per row of x^T (a column of x): the row and column amaxes in
    # one read, then both sides' codes from another (lowbit.kernels._row_pair_triton).
    from lowbit.kernels._row_pair_triton import launch_row_col_amax, launch_row_pair

    r, c = x.shape
    bits = torch.zeros(r + c, dtype=torch.int32, device=x.device)
    launch_row_col_amax(x, bits[:r], bits[r:])
    scale = torch.empty(r, dtype=torch.float32, device=x.device)
    scale_t = torch.empty(c, dtype=torch.float32, device=x.device)
    data = torch.empty((r, c), dtype=torch.uint8, device=x.device)
    data_t = torch.empty((c, r), dtype=torch.uint8, device=x.device)
    enc = _ENC[spec.fmt]
    launch_row_pair(x, data, data_t, bits[:r], bits[r:], scale, scale_t, spec.format, enc, _SMODE[spec.scale],
                    spec.rounding == "stochastic", spec_t.rounding == "stochastic", seed_offset(seed),
                    seed_offset(seed_t))
    dt, fmt = _DTYPE[enc], spec.format
    return (QTensor(data.view(dt), scale, fmt, "row", torch.Size((r, c)), 1, x.dtype, False, None),
            QTensor(data_t.view(dt), scale_t, fmt, "row", torch.Size((c, r)), 1, x.dtype, False, None))


def why_not_values(x: torch.Tensor, spec: QuantSpec, spec_t: QuantSpec) -> str | None:
    """None when quantize_pair_values handles (x, spec, spec_t); else the reason."""
    reason = why_not_pair(x, spec, spec_t)
    if reason is not None:
        return reason
    if spec.fmt not in ("fp8_e4m3", "fp8_e5m2") or spec.scale not in ("e8m0", "e8m0_up"):
        return f"values are written for fp8 with power-of-two scales, got {spec.fmt} with {spec.scale} scales"
    groups = (spec.block, spec_t.block)
    if not all(isinstance(g, int) and g <= SMALL_GROUP_TILE[0] for g in groups):
        return f"values are written for 1-D groups of up to {SMALL_GROUP_TILE[0]}, got {groups}"
    if "nearest" != spec.rounding or "nearest" != spec_t.rounding:
        return "values are written for nearest rounding (no seeds)"
    return None


def quantize_pair_values(
    x: torch.Tensor, spec: QuantSpec, spec_t: QuantSpec, values: tuple[bool, bool]
) -> tuple[QTensor | torch.Tensor, QTensor | torch.Tensor]:
    """quantize_pair(x, spec, spec_t), except that a side with `values` True comes back as its
    exact values in bf16 (q.dequantize_lastdim() as bf16) instead of a QTensor: what a GEMM on
    BF16 operands reads, without the dequantize pass (lowbit.kernels.dequant) that would read the
    codes back. MX-style fp8 groups only (`why_not_values`). Exact: an fp8 value times a
    power-of-two scale has at most 4 significant bits, except where it falls below bf16's smallest
    subnormal (groups whose amax is below ~2^-118), where it rounds to nearest even."""
    reason = why_not_values(x, spec, spec_t)
    if reason is not None:
        raise ValueError(f"quantize_pair_values: {reason}")
    return _quantize_supported_pair(x, spec, spec_t, values=values)


def quantize_pair_or_none(
    x: torch.Tensor, spec: QuantSpec, spec_t: QuantSpec, **kwargs: Any
) -> tuple[QTensor, QTensor] | None:
    """quantize_pair(x, spec, spec_t, **kwargs), or None where `why_not_pair` declines (the
    lowbit.quant.gemm pair seam)."""
    if why_not_pair(x, spec, spec_t) or _why_not_history(
        x, spec, kwargs.get("history"), kwargs.get("amax"), spec_t
    ):
        return None
    return _quantize_supported_pair(x, spec, spec_t, **kwargs)
