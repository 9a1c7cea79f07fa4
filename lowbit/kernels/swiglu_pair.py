"""SwiGLU fused with its fp8 quantization: the fused feed-forward's kernels (delayed scaling).

In an fp8 feed-forward y = W2 (silu(X W1^T) * (X W3^T)), SwiGLU's output h and its gradients
dg, du are needed only as fp8 GEMM operands, each in two layouts (row-major for one GEMM,
transposed for the wgrad GEMM). Unfused, Inductor writes h (and in backward dg, du) in bf16 and
the pair quantizer reads them back: per element of h, 10 bytes of traffic forward and 18
backward. Here one kernel reads SwiGLU's inputs and writes only the fp8 pairs: 6 bytes forward
(g, u in; h, h^T out) and 10 backward (dh, g, u in; dg, dg^T, du, du^T out).

The scale is delayed scaling's (lowbit.quant.gemm.AmaxHistory; TransformerEngine's
DelayedScaling): the max of a history row, or while the row holds only zeros the result's own
amax (a first call, read by one more launch that otherwise returns at once). The result's own
amax is recorded as the newest entry of the history rows. No host sync, so the same in CUDA
graphs. The values are lowbit.quant.swiglu's fp32 results, quantized exactly as the pair
quantizer would quantize them (the same per-element code).
"""

from __future__ import annotations

import torch

from lowbit.quant.formats import get_format

FORMATS = ("fp8_e4m3", "fp8_e5m2")
_ENC = {"fp8_e4m3": 0, "fp8_e5m2": 1}
_DTYPE = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_inputs(name: str, fmt: str, ts: tuple[torch.Tensor, ...], rows: tuple[torch.Tensor, ...]) -> None:
    """Raise ValueError unless the SwiGLU inputs and history rows are what the kernels read."""
    if fmt not in _ENC:
        raise ValueError(f"{name}: fmt={fmt!r}, expected one of {FORMATS}")
    shape = ts[0].shape
    for t in ts:
        if t.dim() != 2 or t.shape != shape or t.dtype not in DTYPES or t.device != ts[0].device:
            raise ValueError(f"{name}: needs float32/bfloat16/float16 matrices of one shape on one device, "
                             f"got {[(tuple(x.shape), x.dtype, str(x.device)) for x in ts]}")
    n = rows[0].numel()
    for row in rows:
        if not (row.dtype == torch.float32 and row.dim() == 1 and row.is_contiguous() and row.numel() == n
                and row.device == ts[0].device):
            raise ValueError(f"{name}: history rows must be contiguous fp32 vectors of one length on the "
                             f"inputs' device, got {[(tuple(r.shape), r.dtype) for r in rows]}")
    if len({r.data_ptr() for r in rows}) != len(rows):
        raise ValueError(f"{name}: the history rows must be distinct")


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _outputs(r: int, c: int, dev: torch.device) -> tuple[torch.Tensor, ...]:
    # (data, data_t, scale, scale_t): two scales, since outputs of a custom op may not alias.
    u8, f32 = dict(dtype=torch.uint8, device=dev), dict(dtype=torch.float32, device=dev)
    scale, scale_t = torch.empty((1, 1), **f32), torch.empty((1, 1), **f32)
    return torch.empty((r, c), **u8), torch.empty((c, r), **u8), scale, scale_t


def _finish(outs: tuple[torch.Tensor, ...], fmt: str) -> tuple[torch.Tensor, ...]:
    d, dt, s, st = outs
    return d.view(_DTYPE[fmt]), s.reshape(()), dt.view(_DTYPE[fmt]), st.reshape(())


def swiglu_pair_delayed(
    g: torch.Tensor, u: torch.Tensor, fmt: str, row: torch.Tensor, row_t: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """(data, scale, data_t, scale_t): h = silu(g) * u (lowbit.quant.swiglu.swiglu_fp32) and h^T as
    fp8 with one tensor scale, by delayed scaling on `row` (h's own amax while it is all zeros);
    h's amax is recorded as the newest entry of `row` and `row_t`.

    The same codes as lowbit.kernels.pair_quantize.quantize_pair(swiglu_fp32(g, u), spec, spec,
    history=(row, row_t)) wherever this kernel's fp32 h equals the reference's.
    """
    from lowbit.kernels._pair_quantize_triton import delayed_words, launch_roll
    from lowbit.kernels._swiglu_pair_triton import launch_amax_if_empty, launch_swiglu_pair

    check_inputs("swiglu_pair_delayed", fmt, (g, u), (row, row_t))
    g, u = _rows_contiguous(g), _rows_contiguous(u)
    r, c = g.shape
    outs = _outputs(r, c, g.device)
    own, rec = delayed_words(g.device)  # the gate zeroes rec (also for an empty g)
    launch_amax_if_empty((g, u), (own,), (rec,), (row,))
    if g.numel():
        launch_swiglu_pair(g, u, outs, own, rec, row, get_format(fmt), _ENC[fmt])
    launch_roll(rec, row, row_t)
    return _finish(outs, fmt)


def swiglu_grad_pairs_delayed(
    dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, fmt: str,
    rows_g: tuple[torch.Tensor, torch.Tensor], rows_u: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """(dg data, scale, data_t, scale_t, du data, scale, data_t, scale_t): SwiGLU's gradients
    (lowbit.quant.swiglu.swiglu_grad_fp32) as two fp8 pairs, dg by delayed scaling on rows_g[0]
    and recorded into both rows_g, du likewise on rows_u: swiglu_pair_delayed's rules, for each."""
    from lowbit.kernels._pair_quantize_triton import delayed_words, launch_roll
    from lowbit.kernels._swiglu_pair_triton import (
        grad_fixup_list,
        launch_amax_if_empty,
        launch_swiglu_grad_pairs,
    )

    check_inputs("swiglu_grad_pairs_delayed", fmt, (dh, g, u), (*rows_g, *rows_u))
    dh, g, u = _rows_contiguous(dh), _rows_contiguous(g), _rows_contiguous(u)
    r, c = g.shape
    dev = g.device
    outs_g, outs_u = _outputs(r, c, dev), _outputs(r, c, dev)
    own_g, rec_g, own_u, rec_u = delayed_words(dev, 2)  # the gate zeroes the recs (also for empty inputs)
    own, rec = (own_g, own_u), (rec_g, rec_u)
    fixup = grad_fixup_list(g)
    launch_amax_if_empty((dh, g, u), own, (*rec, fixup[1]), (rows_g[0], rows_u[0]))
    if g.numel():
        launch_swiglu_grad_pairs(dh, g, u, outs_g, outs_u, own, rec, (rows_g[0], rows_u[0]),
                                 get_format(fmt), _ENC[fmt], fixup)
    launch_roll(rec[0], *rows_g)
    launch_roll(rec[1], *rows_u)
    return (*_finish(outs_g, fmt), *_finish(outs_u, fmt))
