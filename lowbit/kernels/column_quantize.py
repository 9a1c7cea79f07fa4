"""Operands strided along K, rotated and quantized in one read: the column quantizer.

QuantLinear's wgrad operands X^T and dY^T, and dgrad's W^T, are transposed views of row-major
matrices: their rows are contiguous in memory and K is strided. With a Hadamard rotation along K
(MXFP4's and NVFP4's backward GEMMs) such a view used to go through the rotation kernel, which
wrote the rotated operand in fp32 (6 bytes an element moved), and the quantize kernel then read
that copy (4 more). Here one kernel reads the view once (2 bytes an element for bf16) and writes
the codes and scales (~0.5):

    column_quantize(x, spec, block, sign_off, seed_off)  -> (data, scale, tensor scale, packed)
        as lowbit.kernels.quantize.quantize_2d(x, spec, seed, hadamard=block, sign_off=sign_off)
        bit for bit (the layout of its outputs included)

Each thread holds whole groups of its rows (lowbit/kernels/_column_quantize_triton.py), so the
butterfly, the group amax, the rounding and the packing need no data exchange between threads.

With `fold` (MXFP4 only, `why_not_column_fold`), the same kernel pass writes the operand folded
for cuBLAS's blockwise fp8 GEMM instead of as E2M1 codes: e4m3 values with one fp32 scale per
1 x 128 chunk (`fold="chunk"`) or 128 x 128 tile (`fold="tile"`), as
lowbit.quant.scale_fold.fold_blocks folds the codes, bit for bit (_column_fold_triton.py). That
writes one byte an element instead of half of one, and saves the fold's own pass (read the codes,
write the bytes) that the GEMM would otherwise need.

`why_not_columns` says what it does not take (the caller then uses the other paths): views whose
rows are not contiguous, granularities other than 1-D groups along K, groups that do not hold
whole Hadamard blocks, K not a multiple of the group, or a group whose codes fill less than a
32-bit word. LOWBIT_COLUMN_QUANTIZE=0 turns it off.
"""

from __future__ import annotations

import torch

from lowbit.env_flags import env_flag
from lowbit.kernels.launch import launchable, seed_args
from lowbit.kernels.quantize import _ENC, _SCALE, interpret, supports
from lowbit.quant.quantize import QuantSpec
from lowbit.quant.scale_fold import FOLD_BLOCK

ENABLED = env_flag("LOWBIT_COLUMN_QUANTIZE", True)
FOLD_ENABLED = env_flag("LOWBIT_COLUMN_FOLD", True)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis (the groups along K)


def why_not_columns(x: torch.Tensor, spec: QuantSpec, block: int) -> str | None:
    """Why column_quantize declines (x, spec, Hadamard block; 1 = no rotation), or None."""
    if not ENABLED:
        return "LOWBIT_COLUMN_QUANTIZE=0"
    if x.dim() != 2 or x.shape[0] < 2 or x.stride(0) != 1:
        return f"x (shape {tuple(x.shape)}, strides {x.stride()}) is not a view with contiguous rows"
    if x.dtype not in _DTYPES:
        return f"x is {x.dtype}, not one of {', '.join(str(d) for d in _DTYPES)}"
    if not supports(x, spec):
        return f"the Triton quantizer does not run {spec} on {x.device} ({x.dtype})"
    g = spec.block
    if not isinstance(g, int):
        return f"block {g!r} is not a 1-D group along K"
    if block < 1 or block & (block - 1) or g % block:
        return f"groups of {g} do not hold whole Hadamard blocks of {block}"
    if x.shape[1] % g:
        return f"K={x.shape[1]} is not a multiple of the group {g}"
    packed = _ENC[spec.fmt] in (3, 4)
    if g % (8 if packed else 4):
        return f"a group of {g} {spec.fmt} codes does not fill whole 32-bit words"
    if x.shape[1] // g > _MAX_GRID_Y:  # even one group a program would not fit CUDA's grid
        return f"K={x.shape[1]} has more groups of {g} than a launch grid holds ({_MAX_GRID_Y})"
    return None


FOLDS = ("chunk", "tile")  # by the GEMM side they are for: A (role 1), B (role 2)


def why_not_column_fold(x: torch.Tensor, spec: QuantSpec, block: int, fold: str) -> str | None:
    """Why column_quantize declines to write (x, spec, block) folded as `fold`, or None."""
    if fold not in FOLDS:
        return f"fold={fold!r}; valid choices: {', '.join(FOLDS)}"
    reason = why_not_columns(x, spec, block)
    if reason is not None:
        return reason
    if spec.fmt != "fp4_e2m1" or spec.block != 32 or spec.scale not in ("e8m0", "e8m0_up"):
        return f"{spec} is not MXFP4 (E2M1, E8M0 scales every 32): only power-of-two group scales fold"
    if x.shape[1] % FOLD_BLOCK:
        return f"K={x.shape[1]} is not a multiple of {FOLD_BLOCK}"
    return None


def column_fold_for(x: torch.Tensor, spec: QuantSpec, block: int, role: int | None) -> str | None:
    """The fold the column quantizer writes x in as a GEMM's A (role 1: "chunk") or B (role 2:
    "tile"), where that GEMM runs on cuBLAS's blockwise fp8 GEMM (lowbit.kernels.scale_fold:
    MXFP4 on CUDA with LOWBIT_MX_FP8 on, rows a multiple of 128); None: codes, as without a role.
    LOWBIT_COLUMN_FOLD=0 turns it off."""
    from lowbit.kernels import scale_fold

    if role not in (1, 2) or not (FOLD_ENABLED and scale_fold.ENABLED) or not x.is_cuda or interpret():
        return None
    fold = FOLDS[role - 1]
    if x.shape[0] % FOLD_BLOCK or why_not_column_fold(x, spec, block, fold) is not None:
        return None
    return fold


def column_quantize(
    x: torch.Tensor, spec: QuantSpec, block: int, sign_off: int | torch.Tensor | None,
    seed_off: int | torch.Tensor, fold: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """x (R × K, rows contiguous) rotated along K in Hadamard blocks of `block` (random signs from
    `sign_off`, None: none) and quantized in 1-D groups along K; the caller checked why_not_columns
    (why_not_column_fold with `fold`).
    -> (data, scales, tensor scale or None, packed), as quantize_2d returns them; with `fold`, the
    e4m3 values and their chunk scales (R, K/128; group-major, as cuBLAS reads them) or tile scales
    (ceil(R/128), K/128), as lowbit.quant.scale_fold.fold_blocks returns them."""
    if fold is not None:
        if fold not in FOLDS:
            raise ValueError(f"column_quantize: fold={fold!r}; valid choices: {', '.join(FOLDS)} (or None)")
        return _column_fold(x, spec, block, sign_off, seed_off, fold)
    from lowbit.kernels._column_quantize_triton import (
        COLUMN_GROUPS,
        COLUMN_MAXNREG,
        COLUMN_VALUES,
        COLUMN_WARPS,
        _column_groups_kernel,
    )
    from lowbit.kernels._hadamard_triton import rotation_constants

    r, k = x.shape
    dev = x.device
    fmt = spec.format
    enc = _ENC[spec.fmt]
    packed = enc in (3, 4)
    g = int(spec.block)
    data = torch.empty((r, k // 2 if packed else k), dtype=torch.uint8, device=dev)
    # Group-major scales (a transposed view of (groups, rows)), as quantize_2d stores them.
    scale = torch.empty((k // g, r), dtype=torch.float32, device=dev).t()
    smode = _SCALE[spec.scale]
    tscale = torch.empty((1,), dtype=torch.float32, device=dev) if smode == 3 else None
    br = max(32, min(512, COLUMN_VALUES // g, 1 << (r - 1).bit_length()))
    ngroups = k // g
    per = max(1, min(COLUMN_GROUPS, ngroups))
    while ngroups % per:  # programs visit whole runs of groups
        per //= 2
    grid = ((r + br - 1) // br, ngroups // per)
    (seed_arg, sign_arg), on_device = seed_args(seed_off, sign_off)
    words = data.view(torch.int32)

    def run(amax_only: bool, t_amax: torch.Tensor) -> None:
        # t_amax: NVFP4's tensor amax, int32 bits the amax-only launch raises, then read as fp32
        launchable(_column_groups_kernel)[grid](
            x, words, scale, tscale if tscale is not None else scale, t_amax, r, k, x.stride(1),
            words.stride(0), scale.stride(0), scale.stride(1), seed_arg, sign_arg,
            MBITS=fmt.mbits, EMIN=fmt.emin, EMAX=fmt.emax, FMAX=float(fmt.max), HAS_INF=fmt.has_inf,
            KIND_INT=fmt.kind == "int", ENC=enc, PACK=packed, SMODE=smode, SR=spec.rounding == "stochastic",
            BR=br, G=g, NG=per, SIGNS=sign_off is not None, HW_FP8=not interpret(),
            DIV=1 if smode in (0, 3) else 0, AMAX=amax_only, SEED_PTR=on_device,
            **rotation_constants(block), num_warps=COLUMN_WARPS,
            **({"maxnreg": COLUMN_MAXNREG} if COLUMN_MAXNREG else {}),
        )

    if smode == 3:  # NVFP4: the rotated operand's own amax first (one more read)
        t_bits = torch.zeros(1, dtype=torch.int32, device=dev)
        run(True, t_bits)
        run(False, t_bits.view(torch.float32))
    else:
        run(False, scale)  # no tensor amax: any tensor stands in for the unused pointer
    ddtype = {0: torch.float8_e4m3fn, 1: torch.float8_e5m2, 2: torch.int8}.get(enc)
    return (data.view(ddtype) if ddtype is not None else data, scale,
            tscale.reshape(()) if tscale is not None else None, packed)


def _column_fold(
    x: torch.Tensor, spec: QuantSpec, block: int, sign_off: int | torch.Tensor | None,
    seed_off: int | torch.Tensor, fold: str,
) -> tuple[torch.Tensor, torch.Tensor, None, bool]:
    from lowbit.kernels._column_fold_triton import _column_fold_kernel
    from lowbit.kernels._column_quantize_triton import COLUMN_WARPS
    from lowbit.kernels._hadamard_triton import rotation_constants

    r, k = x.shape
    dev = x.device
    tile = fold == "tile"
    data = torch.empty((r, k), dtype=torch.uint8, device=dev)
    if tile:
        scale = torch.empty((-(-r // FOLD_BLOCK), k // FOLD_BLOCK), dtype=torch.float32, device=dev)
    else:  # group-major, as the column quantizer stores its group scales and cuBLAS reads 1 x 128's
        scale = torch.empty((k // FOLD_BLOCK, r), dtype=torch.float32, device=dev).t()
    br = FOLD_BLOCK if tile else max(32, min(FOLD_BLOCK, 1 << (r - 1).bit_length()))
    (seed_arg, sign_arg), on_device = seed_args(seed_off, sign_off)
    words = data.view(torch.int32)
    launchable(_column_fold_kernel)[((r + br - 1) // br, k // FOLD_BLOCK)](
        x, words, scale, r, k, x.stride(1), words.stride(0), scale.stride(0), scale.stride(1), seed_arg,
        sign_arg, SMODE=_SCALE[spec.scale], SR=spec.rounding == "stochastic", BR=br, TILE=tile,
        SIGNS=sign_off is not None, SEED_PTR=on_device, **rotation_constants(block), num_warps=COLUMN_WARPS,
    )
    return data.view(torch.float8_e4m3fn), scale, None, False
