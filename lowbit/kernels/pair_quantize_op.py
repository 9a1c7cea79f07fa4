"""`lowbit::fp8_tensor_pair`: the fp8 tensor-scaled pair quantizer as an operator torch.compile sees into.

QuantLinear's traced path (lowbit.nn.quant_linear_traced) quantizes X/X^T, W/W^T and dY/dY^T
inside the compiled graph. Through an opaque custom op each pair costs its Python on every call
(the op's dispatch, the pair quantizer's argument handling and Triton's own launcher): ~110 µs
per pair on the lent H100's host, more than the GPU's whole step for a 4096 x 4096 layer at 8192
tokens (docs/BENCHMARKS.md, third and fifth passes). Registered with `torch.library.triton_op`,
the same kernel (`_pair_kernel`, the same constexprs as lowbit.kernels.pair_quantize picks, so the
same bits) is visible to Inductor, which launches it from its generated code like its own kernels:
no Python per call.

Only the pair the traced fp8 recipes need takes this route: fp8 e4m3/e5m2 on both sides, one fp32
tensor scale from a given amax, nearest rounding. With `record=True` the pass also returns x's own
amax (delayed scaling's history entry) without another read.
"""

from __future__ import annotations

import torch

from lowbit.kernels.quantize import interpret, triton_available
from lowbit.quant.formats import get_format

OP = "lowbit::fp8_tensor_pair"
FORMATS = ("fp8_e4m3", "fp8_e5m2")
_ENC = {"fp8_e4m3": 0, "fp8_e5m2": 1}
_DTYPE = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# The pair quantizer's tile for tensor scaling (lowbit.kernels.pair_quantize.PAIR_TILE).
_TILE = 64


def available(x: torch.Tensor) -> bool:
    """Whether the op runs on x's device: CUDA with Triton, or the Triton interpreter on CPU."""
    return triton_available() and (x.is_cuda or (interpret() and x.device.type == "cpu"))


_registered = False


def register() -> None:
    """Define the op once (lazily: it imports Triton). Callers register before torch.compile traces
    (a plain flag, not functools.cache: Dynamo reads the flag, while it would trace into a cache)."""
    global _registered
    if _registered:
        return
    from torch.library import triton_op, wrap_triton

    from lowbit.kernels._pair_quantize_triton import _amax_kernel, _pair_kernel, amax_launch_shape

    @triton_op(OP, mutates_args=())
    def fp8_tensor_pair(
        x: torch.Tensor, amax: torch.Tensor | None, fmt: str, record: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if fmt not in _ENC:
            raise ValueError(f"{OP}: fmt={fmt!r}, expected one of {FORMATS}")
        if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{OP}: needs a float32/bfloat16/float16 matrix, got {tuple(x.shape)} {x.dtype}")
        r, c = x.shape
        f = get_format(fmt)
        data = torch.empty((r, c), dtype=torch.uint8, device=x.device)
        data_t = torch.empty((c, r), dtype=torch.uint8, device=x.device)
        scale = torch.empty((1, 1), dtype=torch.float32, device=x.device)
        rec = torch.zeros(1 if record else 0, dtype=torch.int32, device=x.device)
        if amax is None:  # x's own, one read (lowbit.kernels.pair_quantize.tensor_amax)
            bits = torch.zeros(1, dtype=torch.int32, device=x.device)
            grid_a, kw = amax_launch_shape(r, c)
            wrap_triton(_amax_kernel)[grid_a](x, bits, r, c, x.stride(0), x.stride(1), **kw)
            g_amax = bits.view(torch.float32)
        else:
            g_amax = amax.reshape(1).float()
        hw = not interpret()
        grid = (-(-r // _TILE), -(-c // _TILE))
        wrap_triton(_pair_kernel)[grid](
            x, data, data_t, scale, scale, g_amax, rec if record else scale, r, c, x.stride(0), x.stride(1),
            1, 1, 1, 1, 0, 0,
            MBITS=f.mbits, EMIN=f.emin, EMAX=f.emax, FMAX=float(f.max), HAS_INF=f.has_inf,
            KIND_INT=False, ENC=_ENC[fmt], SMODE=0, GA=0, GB=0, SR_A=False, SR_B=False,
            SAME_CODES=False, RECORD=record, BR=_TILE, BC=_TILE, HW_FP8=hw, FAST=hw, num_warps=4,
        )
        dt = _DTYPE[fmt]
        return data.view(dt), data_t.view(dt), scale.reshape(()), rec.view(torch.float32)

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
