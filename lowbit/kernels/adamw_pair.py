"""AdamW steps that also write each updated weight's fp8 pair, for delayed-scaling layers.

Under fp8 delayed scaling every forward pass reads each fp32 weight again to quantize it (W for
fprop, W^T for dgrad): on the 1b model ~0.97B weights, 3.9 GB read a step, 2.3 ms of pair kernels
plus their gates and history rolls (H100, docs/BENCHMARKS.md, twenty-sixth pass). The optimizer
step has just written those weights, and the scale the next forward would use is already known:
delayed scaling takes the history's max, and the weight's own amax only joins the history. So the
step writes the codes itself (`launch_step`, one kernel a weight): 2 more bytes an element instead
of a 4-byte read and the launches. `launch_finish` then redoes the weights whose history held only
zeros (their scale is their own amax, known only now) and rolls every weight's amax into its two
history rows, in two launches for all weights.

Numerics: the update is lowbit's fp32 AdamW (lowbit.optim.adamw.adamw_math, bit for bit; a few ulps
from torch's fused AdamW, which orders the same operations differently); the codes, scales and
history rows equal what `fp8_tensor_pair_delayed_direct` gives on the updated weight.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from lowbit.kernels import _quantize_triton
from lowbit.kernels.launch import launchable
from lowbit.kernels.quantize import interpret
from lowbit.optim.adamw import adam_scalars
from lowbit.quant.formats import get_format

FORMATS = {"fp8_e4m3": (0, torch.float8_e4m3fn), "fp8_e5m2": (1, torch.float8_e5m2)}
# Tile of the step kernel (one program a tile, as the pair kernel's 64 x 64) and its warps.
STEP_TILE = (64, 64)
STEP_WARPS = 8
# Programs a weight in the fix-up launch (they stride over its tiles; all return at once unless
# its history is all zeros).
FIXUP_PROGRAMS = 8


@dataclass
class WeightPair:
    """A weight's fp8 codes (R x C, for fprop), its transpose's (C x R, for dgrad), their scales
    (0-d fp32), the int32 word the step's atomics record the weight's amax into, and the amax the
    codes were made with (0-d fp32: the history's max, or the weight's own for an empty history)."""

    codes: torch.Tensor
    codes_t: torch.Tensor
    scale: torch.Tensor
    scale_t: torch.Tensor
    rec: torch.Tensor
    amax: torch.Tensor

    @classmethod
    def empty(cls, weight: torch.Tensor, fmt: str) -> WeightPair:
        if fmt not in FORMATS:
            raise ValueError(f"weight pairs are fp8: fmt={fmt!r}, expected one of {sorted(FORMATS)}")
        r, c = weight.shape
        dt, dev = FORMATS[fmt][1], weight.device
        return cls(torch.zeros((r, c), dtype=dt, device=dev), torch.zeros((c, r), dtype=dt, device=dev),
                   torch.ones((), device=dev), torch.ones((), device=dev),
                   torch.zeros(1, dtype=torch.int32, device=dev), torch.zeros((), device=dev))


@dataclass(frozen=True)
class AdamWScalars:
    """One group's AdamW hyperparameters at one step (`step` counted after this update)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int

    def kernel_args(self) -> tuple[float, ...]:
        return _kernel_args(self)


@functools.lru_cache(maxsize=64)
def _kernel_args(hp: AdamWScalars) -> tuple[float, ...]:
    # The fp32 scalars of lowbit.optim.adamw.adam_scalars, in the order _adam takes them; once per
    # (group, step), not once per weight (a step launches one kernel for each of ~100 weights).
    s = adam_scalars(hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, hp.step)
    order = ("beta1", "omb1", "beta2", "omb2", "step_size", "inv_bc2_sqrt", "eps", "decay")
    return tuple(s[k] for k in order)


def _fmt_args(fmt: str) -> dict:
    f = get_format(fmt)
    return dict(MBITS=f.mbits, EMIN=f.emin, EMAX=f.emax, FMAX=float(f.max), HAS_INF=f.has_inf,
                ENC=FORMATS[fmt][0])


def launch_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                grad_scale: torch.Tensor | None, pair: WeightPair, hist_row: torch.Tensor, fmt: str,
                hp: AdamWScalars) -> None:
    """AdamW on p (fp32, 2-D, contiguous; g, m, v alike) with g divided by grad_scale (a 1-element
    fp32 tensor) when given, and p's new values quantized into `pair` with the scale of
    `hist_row`'s max (kept in pair.amax), their amax recorded into pair.rec (zero before;
    `launch_finish` rolls it)."""
    from lowbit.kernels._adamw_pair_triton import _adamw_pair_kernel
    from lowbit.kernels._pair_quantize_triton import TRANSPOSED_DIV

    r, c = p.shape
    br, bc = STEP_TILE
    div = 2 if _quantize_triton.FAST_DIVISION else 0  # quotients unbounded: a history's amax

    launchable(_adamw_pair_kernel)[(triton.cdiv(r, br), triton.cdiv(c, bc))](
        p, g, m, v, p if grad_scale is None else grad_scale, pair.codes.view(torch.uint8),
        pair.codes_t.view(torch.uint8), pair.scale, pair.scale_t, pair.amax, hist_row, pair.rec, r, c,
        hist_row.numel(),
        *hp.kernel_args(), HAS_GS=grad_scale is not None, HP=triton.next_power_of_2(hist_row.numel()),
        BR=br, BC=bc, FAST=not interpret(), DIV=div, DIV_T=div if TRANSPOSED_DIV else 0, num_warps=STEP_WARPS,
        # No multiply-add contraction: adamw_math's roundings on the GPU too (the kernel is bound by
        # memory; the quantizer's own fma are explicit and stay)
        enable_fp_fusion=False, **_fmt_args(fmt),
    )


def pair_table(entries: list[tuple[torch.Tensor, WeightPair, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The int64 table the batched launches read: per (weight, pair, fprop history row, dgrad
    history row), their addresses and the weight's shape (columns as in _adamw_pair_triton)."""
    rows = [[w.data_ptr(), pr.codes.data_ptr(), pr.codes_t.data_ptr(), pr.scale.data_ptr(),
             pr.scale_t.data_ptr(), ha.data_ptr(), hb.data_ptr(), pr.rec.data_ptr(), w.shape[0], w.shape[1],
             pr.amax.data_ptr()]
            for w, pr, ha, hb in entries]
    return torch.tensor(rows, dtype=torch.int64).to(entries[0][0].device)


def launch_finish(table: torch.Tensor, history_len: int, fmt: str) -> None:
    """After every `launch_step` of a step: the fix-up of all-zero histories, then the rolls (one
    launch each for all of `table`'s weights, which share one format and history length)."""
    from lowbit.kernels._adamw_pair_triton import T_COLS, _fixup_kernel, _roll_all_kernel

    n = table.shape[0]
    hp = triton.next_power_of_2(history_len)
    br, bc = STEP_TILE
    launchable(_fixup_kernel)[(n, FIXUP_PROGRAMS)](
        table, history_len, HP=hp, BR=br, BC=bc, FAST=not interpret(), NCOL=T_COLS, num_warps=STEP_WARPS,
        **_fmt_args(fmt))
    launchable(_roll_all_kernel)[(n,)](table, history_len, HP=hp, NCOL=T_COLS, num_warps=1)
