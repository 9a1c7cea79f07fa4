"""The fp8 tensor-scaled pair quantizer with little host work: a direct launch and a triton_op.

QuantLinear's traced path (lowbit.nn.quant_linear_traced) quantizes X/X^T, W/W^T and dY/dY^T
inside the compiled graph, through an opaque custom op whose Python runs on every call. Through
the generic pair path (plans, checks, QTensor objects) that was ~110 µs per pair on the lent
H100's host, more than the GPU's whole step for a 4096 x 4096 layer at 8192 tokens
(docs/BENCHMARKS.md, third and fifth passes). Two leaner ways to run the same kernels (the amax
kernel, then `_pair_kernel` with the constexprs lowbit.kernels.pair_quantize picks, so the same
bits):
  - `fp8_tensor_pair_direct`: allocates the outputs and launches the kernels itself; the opaque
    op's body for its common case (fp8 training with tensor scales).
  - `lowbit::fp8_tensor_pair`, a `torch.library.triton_op`: Inductor launches the kernels from
    its generated code, no Python per call; opt-in (LOWBIT_TRITON_OP=1), because Inductor's
    graph then cannot merge the identical calls of layers that share an input.
Only fp8 e4m3/e5m2 on both sides with one fp32 tensor scale and nearest rounding take these
routes. The amax is x's own (one read) or a given one; with `record=True` the triton_op also
returns x's own amax (delayed scaling's history entry) without another read.
`fp8_tensor_pair_delayed_direct` is the direct launch of delayed scaling on two history rows
(the traced fp8_delayed ops' common case).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lowbit.kernels.pair_quantize import PAIR_TILE
from lowbit.quant.formats import get_format

OP = "lowbit::fp8_tensor_pair"
FORMATS = ("fp8_e4m3", "fp8_e5m2")
_ENC = {"fp8_e4m3": 0, "fp8_e5m2": 1}
_DTYPE = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# The input dtypes the kernels read.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_registered = False


def _check(x: torch.Tensor, fmt: str) -> None:
    if fmt not in _ENC:
        raise ValueError(f"{OP}: fmt={fmt!r}, expected one of {FORMATS}")
    if x.dim() != 2 or x.dtype not in DTYPES:
        raise ValueError(f"{OP}: needs a float32/bfloat16/float16 matrix, got {tuple(x.shape)} {x.dtype}")


def _quantize(
    wrap: Callable[[Any], Any] | None, x: torch.Tensor, amax: torch.Tensor | None, fmt: str, record: bool,
    history: tuple[torch.Tensor, torch.Tensor] | None = None, round_bf16: bool = False,
) -> tuple[torch.Tensor, ...]:
    # The allocations and lowbit.kernels.pair_quantize's launches, each kernel wrapped by `wrap`
    # (wrap_triton inside the triton_op, None for a direct call): (data, data_t, scale, scale_t,
    # rec). `history` (direct calls only): delayed scaling on these two rows, launched as
    # quantize_pair(..., history=) launches it (gated amax, pair kernel, roll). round_bf16 (with a
    # history only): an fp32 x quantized as x.to(torch.bfloat16) would be.
    from lowbit.kernels._pair_quantize_triton import (
        delayed_words,
        launch_amax,
        launch_amax_if_empty,
        launch_pair,
        launch_roll,
    )

    r, c = x.shape
    dev = x.device
    data = torch.empty((r, c), dtype=torch.uint8, device=dev)
    data_t = torch.empty((c, r), dtype=torch.uint8, device=dev)
    # Two scales, not one: outputs of an operator may not alias. The kernel writes both.
    scale = torch.empty((1, 1), dtype=torch.float32, device=dev)
    scale_t = torch.empty((1, 1), dtype=torch.float32, device=dev)
    rec = torch.zeros(1, dtype=torch.int32, device=dev) if record and history is None else None
    if history is not None:  # rec zeroed by the gate; x's own amax bits only while the row is all zeros
        g_amax, rec = delayed_words(dev)
        launch_amax_if_empty(x, g_amax, rec, history[0], round_bf16)
    elif amax is None:  # x's own, one read (lowbit.kernels.pair_quantize.tensor_amax)
        bits = torch.zeros(1, dtype=torch.int32, device=dev)
        launch_amax(x, bits, wrap)
        g_amax = bits.view(torch.float32)
    else:
        g_amax = amax.reshape(1).float()
    launch_pair(x, data, data_t, scale, scale_t, g_amax, rec, get_format(fmt), _ENC[fmt], 0, 0, 0,
                False, False, False, (PAIR_TILE, PAIR_TILE), 0, 0, wrap,
                hist_row=None if history is None else history[0], own_amax=amax is None,
                round_bf16=round_bf16)
    if history is not None:
        launch_roll(rec, history[0], history[1])
    dt = _DTYPE[fmt]
    rec_out = rec.view(torch.float32) if rec is not None else x.new_empty(0, dtype=torch.float32)
    return data.view(dt), data_t.view(dt), scale.reshape(()), scale_t.reshape(()), rec_out


def register() -> None:
    """Define the op once (lazily: it imports Triton). Callers register before torch.compile traces
    (a plain flag, not functools.cache: Dynamo reads the flag, while it would trace into a cache)."""
    global _registered
    if _registered:
        return
    from torch.library import triton_op, wrap_triton

    @triton_op(OP, mutates_args=())
    def fp8_tensor_pair(
        x: torch.Tensor, amax: torch.Tensor | None, fmt: str, record: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _check(x, fmt)
        data, data_t, scale, _, rec = _quantize(wrap_triton, x, amax, fmt, record)
        return data, data_t, scale, rec

    _registered = True


def fp8_tensor_pair(
    x: torch.Tensor, amax: torch.Tensor | None, fmt: str, record: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes of x, codes of x^T, their one fp32 scale, x's own amax if `record` else empty).

    Bit for bit lowbit.quant.quantize(x, QuantSpec(fmt, "tensor"), amax=amax) and the same of x^T;
    amax=None: x's own, read by the amax kernel.
    """
    register()
    return torch.ops.lowbit.fp8_tensor_pair(x, amax, fmt, record)


def fp8_tensor_pair_direct(
    x: torch.Tensor, fmt: str, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """(data, scale, data_t, scale_t) of x and x^T with x's own amax (or `amax` where given): the
    kernels launched directly.

    The body of the opaque traced op's common case (lowbit.nn.quant_linear_traced): the same
    kernels and bits as lowbit.kernels.pair_quantize, without the generic path's plans, checks
    and objects, which were most of its ~110 µs of host time per call.
    """
    _check(x, fmt)
    data, data_t, scale, scale_t, _ = _quantize(None, x, amax, fmt, False)
    return data, scale, data_t, scale_t


def fp8_tensor_pair_delayed_direct(
    x: torch.Tensor, fmt: str, row: torch.Tensor, row_t: torch.Tensor, round_bf16: bool = False
) -> tuple[torch.Tensor, ...]:
    """(data, scale, data_t, scale_t) of x and x^T under delayed scaling, the kernels launched directly.

    Bit for bit lowbit.kernels.pair_quantize.quantize_pair(x, spec, spec, history=(row, row_t)):
    the scale is the max of `row` (x's own amax while the row holds only zeros), and x's amax is
    recorded as the newest entry of both rows. The body of the traced fp8_delayed ops' common case
    (lowbit.nn.quant_linear_traced), without the generic path's plans, checks and objects.
    round_bf16: an fp32 x quantized, scaled and recorded as x.to(torch.bfloat16) would be, bit for
    bit, without that cast's pass (lowbit.nn.gradient_cast_fold).
    """
    _check(x, fmt)
    if round_bf16 and x.dtype != torch.float32:
        raise ValueError(f"{OP}: round_bf16 reads an fp32 input, got {x.dtype}")
    if not (row.dtype == row_t.dtype == torch.float32 and row.is_contiguous() and row_t.is_contiguous()
            and row.shape == row_t.shape and row.dim() == 1 and row.data_ptr() != row_t.data_ptr()):
        raise ValueError(f"{OP}: history rows must be two distinct contiguous fp32 vectors of one length, "
                         f"got {tuple(row.shape)} {row.dtype} and {tuple(row_t.shape)} {row_t.dtype}")
    data, data_t, scale, scale_t, _ = _quantize(None, x, None, fmt, False, (row, row_t), round_bf16)
    return data, scale, data_t, scale_t
