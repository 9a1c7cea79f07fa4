"""One quantized GEMM, out = A·B^T over the shared last axis K, as a recipe's GemmSpec says.

Two steps, so a caller can quantize an operand early and keep only the compact form (QuantLinear
quantizes X^T for wgrad during the forward pass and saves that for backward):
    prepare_operand(t, spec, gemm, seed, role)  pad K and rotate (Hadamard), quantize (QuantSpec),
                                                bit-split (int4_hq) -> Operand
    gemm_operands(a, b, gemm, seed, backend)    the product of two prepared operands (fp32)
    prepare_operand_pair(t, plan, plan_t)       t and t^T for two GEMMs (X for fprop and X^T for
                                                wgrad, ...): one fused pass where a pair
                                                quantizer is registered for the device
quantized_gemm(a, b, gemm, seed) does both.

Quantize seam: register_quantize_backend(fn) swaps in a fused quantize kernel (same signature and
bits as quantize()) for operands on one device type (CUDA); register_rotation_backend does so for
the Hadamard rotation and for rotate-then-quantize in one pass (same bits as the two steps).

GEMM backends (the seam where faster GEMM kernels plug in):
    emulate    dequantize to fp32 and matmul in fp32: exact products of the quantized values with
               fp32 accumulation; runs anywhere, the reference every kernel is tested against.
    scaled_mm  cuBLAS through torch: fp8 operands with per-tensor or per-row scales, or 1x128 /
               128x128 blockwise scales (DeepSeek-V3 layout; dims multiples of 128), no Hadamard.
    auto       on CUDA, scaled_mm where it applies (measured fastest, docs/BENCHMARKS.md), else a
               registered backend that accepts the GEMM (register_gemm_backend; the Triton
               block-scaled GEMM goes here), else emulate.
A leverage-sampled GEMM (int4_hq's wgrad) goes first to a registered leverage backend for the
operands' device (lowbit.quant.leverage; lowbit.kernels' fp8 kernels on CUDA) unless the backend
is named emulate or scaled_mm; otherwise it is emulated.
The product comes back in `out_dtype` (fp32 by default) with `bias` added: cuBLAS writes BF16 and
adds the bias in its epilogue, so a BF16 layer never materializes an fp32 output.

Seeds: one per GEMM call. The Hadamard signs use `seed` itself (both operands must agree), operand
A's stochastic rounding uses derive_seed(seed, 1), B's derive_seed(seed, 2), the residual term of a
bit split derive_seed(seed, 3), leverage sampling derive_seed(seed, 4).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lowbit.quant.hadamard import hadamard_rotate, random_signs
from lowbit.quant.leverage import leverage_backend, leverage_sampled
from lowbit.quant.qtensor import QTensor
from lowbit.quant.quantize import QuantSpec, quantize
from lowbit.quant.recipes import GemmSpec
from lowbit.quant.rounding import DERIVE_STEP, DeviceSeed

# observer(operand_name, tensor_as_quantized_fp32, qtensor): telemetry hook, None when off.
Observer = Callable[[str, torch.Tensor, QTensor], None]


def derive_seed(seed: int | torch.Tensor | DeviceSeed, k: int) -> int | torch.Tensor | DeviceSeed:
    """A distinct 31-bit seed for sub-stream k of a GEMM call (any fixed integer mix works); an
    integer tensor seed (a traced layer's, on the device) gives the same value as a tensor, a
    DeviceSeed the table entry that holds it (lowbit.quant.rounding.seed_table)."""
    if isinstance(seed, DeviceSeed):
        return seed.derived(k)
    if isinstance(seed, torch.Tensor):
        return (seed.to(torch.int64) + k * DERIVE_STEP) & 0x7FFFFFFF
    return (int(seed) + k * DERIVE_STEP) & 0x7FFFFFFF


@dataclass
class Operand:
    """A GEMM operand ready to multiply: K last (padded for the Hadamard), quantized or fp32."""

    parts: list[QTensor] = field(default_factory=list)  # quantized terms (two when bit-split)
    hp: torch.Tensor | None = None  # fp32 operand when its spec is None

    def dequantize(self) -> torch.Tensor:
        if self.hp is not None:
            return self.hp
        out = self.parts[0].dequantize_lastdim()
        for p in self.parts[1:]:
            out = out + p.dequantize_lastdim()
        return out

    @property
    def is_cuda(self) -> bool:
        return (self.hp if self.hp is not None else self.parts[0].data).is_cuda

    def nbytes(self) -> int:
        if self.hp is not None:
            return self.hp.numel() * self.hp.element_size()
        return sum(p.nbytes() for p in self.parts)


class AmaxHistory:
    """Delayed scaling state of one operand (TE DelayedScaling): its last amaxes, newest first.

    `row` is a device buffer (a view into the owner's history). A call scales by the history's
    max, or by the tensor's own amax while the history holds only zeros (a first call), and
    records the tensor's own amax. The choice is made on the device (`torch.where`), so it never
    syncs and runs unchanged inside a compiled graph or a CUDA graph; the pair kernels make the
    same choice (lowbit.kernels.pair_quantize, `history=`). A NaN in the history propagates.
    """

    def __init__(self, row: torch.Tensor):
        self.row = row

    def scale_amax(self, current: torch.Tensor) -> torch.Tensor:
        """The amax to scale by: the history's max unless it is 0, else `current` (t's own)."""
        h = self.row.max()
        return torch.where(h != 0, h, current.reshape(()).to(h.dtype))

    def record(self, current: torch.Tensor) -> None:
        self.row.copy_(torch.roll(self.row, 1))
        self.row[0] = current.reshape(())


@dataclass
class OperandPlan:
    """How one GEMM operand is prepared (the arguments of prepare_operand after the tensor)."""

    spec: QuantSpec | None
    gemm: GemmSpec
    seed: int
    role: int  # 1 = A (left), 2 = B (right)
    history: AmaxHistory | None = None
    observe: Observer | None = None
    name: str = ""


def prepare_operand(
    t: torch.Tensor,
    spec: QuantSpec | None,
    gemm: GemmSpec,
    seed: int,
    role: int,
    *,
    amax_history: AmaxHistory | None = None,
    observe: Observer | None = None,
    name: str = "",
    amax: torch.Tensor | None = None,
) -> Operand:
    """Rotate/quantize one operand `t` (rows × K). role 1 = A (left), 2 = B (right).

    Tensor scaling takes its amax from `amax_history` (delayed scaling, and records t's), else
    from `amax` when given (a caller that shares one delayed amax between two operands)."""
    if t.dim() != 2:
        raise ValueError(f"GEMM operands are matrices (rows × K), got shape {tuple(t.shape)}")
    if gemm.hadamard:
        signs_seed = seed if gemm.random_signs else None
        fused = _ROTATE_QUANTIZERS.get(t.device.type)
        if fused is not None and spec is not None and observe is None and amax_history is None and not (
            gemm.bit_split and role == 1
        ):  # rotation inside the quantize pass; it returns None for shapes it does not take
            q = fused(t, spec, gemm.hadamard, signs_seed, seed=derive_seed(seed, role),
                      amax=amax if spec.block == "tensor" else None, role=role)
            if q is not None:
                return Operand([q])
        pad = (-t.shape[1]) % gemm.hadamard
        if pad:
            t = torch.nn.functional.pad(t.float(), (0, pad))
        t = _ROTATORS.get(t.device.type, _rotate_reference)(t, gemm.hadamard, signs_seed)
    if spec is None:
        return Operand(hp=t.float())
    # The quantizers read BF16 as well as fp32 (and round from the same fp32 values), so a BF16
    # operand is not first copied to fp32.
    if spec.block != "tensor":
        amax = None
    if amax_history is not None and spec.block == "tensor":
        current = _abs_max(t)
        amax = amax_history.scale_amax(current)
        if t.numel():  # an empty call leaves the history as it was
            amax_history.record(current)
    quant = _QUANTIZERS.get(t.device.type, quantize)
    q = quant(t, spec, -1, seed=derive_seed(seed, role), amax=amax)
    if observe is not None:
        observe(name, t.float(), q)
    parts = [q]
    if gemm.bit_split and role == 1:
        split = _RESIDUALS.get(t.device.type)
        residual = split(t, q) if split is not None else None
        if residual is None:  # no kernel for it: the reference's two fp32 ops
            residual = t.float() - q.dequantize_lastdim()
        parts.append(quant(residual, spec, -1, seed=derive_seed(seed, 3)))
    return Operand(parts)


def _rotate_reference(t: torch.Tensor, block: int, signs_seed: int | None) -> torch.Tensor:
    signs = random_signs(block, signs_seed, t.device) if signs_seed is not None else None
    return hadamard_rotate(t.float(), block, signs)


def _plan_args(plan: OperandPlan) -> dict:
    return dict(amax_history=plan.history, observe=plan.observe, name=plan.name)


def _pair_fusable(plan: OperandPlan, plan_t: OperandPlan) -> bool:
    # The pair quantizer does rounding and scaling only: no rotation, bit split or telemetry; one
    # amax for both sides (none, or one shared delayed-scaling choice).
    for p in (plan, plan_t):
        if p.spec is None or p.gemm.hadamard or (p.gemm.bit_split and p.role == 1) or p.observe:
            return False
    if plan.history is None and plan_t.history is None:
        return True
    return _shared_tensor_history(plan, plan_t)


def _abs_max(t: torch.Tensor) -> torch.Tensor:
    # max |t| in fp32 for an amax history; 0 for an empty t (e.g. a layer that got no tokens),
    # which the history does not record.
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=t.device)
    return t.detach().abs().amax().float()


def prepare_operand_pair(
    t: torch.Tensor, plan: OperandPlan | None, plan_t: OperandPlan | None, amax: torch.Tensor | None = None
) -> tuple[Operand | None, Operand | None]:
    """(`t` prepared as `plan` says, `t^T` prepared as `plan_t` says); None for a None plan.

    Where a pair quantizer is registered for t's device and both plans are plain quantizations,
    one pass reads t and writes both (lowbit.kernels); otherwise two prepare_operand calls, with
    the same bits. Delayed scaling of both: the two histories see the same tensor, so `plan`'s
    history picks the one amax both are scaled by, and both record t's amax. `amax`, when given,
    is t's own max |t| (a caller that already has it, e.g. fused into t's producer by Inductor):
    tensor scaling then skips its amax pass. It must not be combined with a history.
    """
    if amax is not None and any(p is not None and p.history is not None for p in (plan, plan_t)):
        raise ValueError("prepare_operand_pair: pass either amax or an amax history, not both")
    both = plan is not None and plan_t is not None
    out = _fused_pair(t, plan, plan_t, amax) if both else None
    if out is not None:
        return out
    shared = both and _shared_tensor_history(plan, plan_t)
    if shared:
        current = _abs_max(t)
        amax = plan.history.scale_amax(current)

    def prep(p: OperandPlan, x: torch.Tensor) -> Operand:
        args = _plan_args(p)
        if shared:  # the one amax chosen above; the histories record below
            args.update(amax_history=None)
        if amax is not None:
            args.update(amax=amax)
        return prepare_operand(x, p.spec, p.gemm, p.seed, p.role, **args)

    op = prep(plan, t) if plan is not None else None
    op_t = prep(plan_t, t.t()) if plan_t is not None else None
    if shared and t.numel():  # an empty call leaves the histories as they were
        plan.history.record(current)
        plan_t.history.record(current)
    return op, op_t


def _shared_tensor_history(plan: OperandPlan, plan_t: OperandPlan) -> bool:
    return (
        plan.history is not None
        and plan_t.history is not None
        and plan.spec is not None
        and plan_t.spec is not None
        and plan.spec.block == plan_t.spec.block == "tensor"
    )


def _fused_pair(
    t: torch.Tensor, plan: OperandPlan, plan_t: OperandPlan, amax: torch.Tensor | None = None
) -> tuple[Operand, Operand] | None:
    pair = _PAIR_QUANTIZERS.get(t.device.type)
    if pair is None or t.dim() != 2 or not _pair_fusable(plan, plan_t):
        return None
    kwargs = {}
    if plan.history is not None:  # the kernels choose the amax and record it (AmaxHistory's rules)
        kwargs = dict(history=(plan.history.row, plan_t.history.row))
    elif amax is not None:
        kwargs = dict(amax=amax)
    out = pair(t, plan.spec, plan_t.spec, seed=derive_seed(plan.seed, plan.role),
               seed_t=derive_seed(plan_t.seed, plan_t.role), **kwargs)
    if out is None:  # the registered quantizer declined this pair
        return None
    q, q_t = out
    return Operand([q]), Operand([q_t])


# A fused quantize kernel with quantize()'s signature and bit-identical results (lowbit.kernels)
# registers here per device type; other devices use the reference.
_QUANTIZERS: dict[str, Callable[..., QTensor]] = {}
# pair(t, spec, spec_t, seed=, seed_t=, amax=, history=(row, row_t)) -> (q, q_t) or None; with
# `history` it scales and records as AmaxHistory does (lowbit.kernels.pair_quantize).
_PAIR_QUANTIZERS: dict[str, Callable[..., tuple[QTensor, QTensor] | None]] = {}

# rotate(t, block, signs_seed) -> fp32 t·R, and rotate_quantize(t, spec, block, signs_seed, seed=,
# amax=, role=) -> QTensor or None, both bit for bit the reference's (lowbit.kernels.hadamard). With
# `role` (the operand's GEMM side) an MXFP4 operand may come folded for cuBLAS's fp8 GEMM (e4m3
# values with a scale a 128-block, lowbit.quant.scale_fold.fold_blocks): the same values, which
# the GEMM backends take as they take any fp8 blockwise operand.
_ROTATORS: dict[str, Callable[..., torch.Tensor]] = {}
_ROTATE_QUANTIZERS: dict[str, Callable[..., QTensor | None]] = {}


# residual(t, q) -> fp32 t - q.dequantize_lastdim(), bit for bit, or None (lowbit.kernels.bit_split).
_RESIDUALS: dict[str, Callable[[torch.Tensor, QTensor], torch.Tensor | None]] = {}


def register_bit_split_backend(fn: Callable[[torch.Tensor, QTensor], torch.Tensor | None],
                               device_type: str = "cuda") -> None:
    """Use `fn` for a bit split's residual t - dequantize(q) on `device_type` (same bits)."""
    _RESIDUALS[device_type] = fn


def register_quantize_backend(fn: Callable[..., QTensor], device_type: str = "cuda") -> None:
    """Use `fn` (a drop-in for lowbit.quant.quantize) for GEMM operands on `device_type`."""
    _QUANTIZERS[device_type] = fn


def register_rotation_backend(
    rotate: Callable[..., torch.Tensor],
    rotate_quantize: Callable[..., QTensor | None],
    device_type: str = "cuda",
) -> None:
    """Hadamard-rotated operands on `device_type`: `rotate` replaces the reference rotation and
    `rotate_quantize` fuses it into the quantize pass (returning None for shapes it declines)."""
    _ROTATORS[device_type] = rotate
    _ROTATE_QUANTIZERS[device_type] = rotate_quantize


def register_pair_quantize_backend(fn: Callable[..., object], device_type: str = "cuda") -> None:
    """Use `fn` to quantize an operand and its transpose in one pass on `device_type` (see
    prepare_operand_pair); it returns None for pairs it does not handle."""
    _PAIR_QUANTIZERS[device_type] = fn


# --- backends ----------------------------------------------------------------------------------

# A backend gets the prepared operands, the GemmSpec, the output dtype and an optional bias and
# returns A·B^T (+ bias) (rows_a × rows_b; any float dtype, cast after), or None to decline (then
# the next choice is tried).
GemmBackend = Callable[
    [Operand, Operand, GemmSpec, torch.dtype, "torch.Tensor | None"], "torch.Tensor | None"
]
_BACKENDS: dict[str, GemmBackend] = {}
# Why a backend declines a GEMM (None: it does not), for the error when it was asked for by name.
GemmDeclineReason = Callable[[Operand, Operand, GemmSpec], "str | None"]
_DECLINE_REASONS: dict[str, GemmDeclineReason] = {}
BACKEND_CHOICES = ("auto", "emulate", "reference", "scaled_mm")  # reference = emulate


def register_gemm_backend(name: str, fn: GemmBackend, why_not: GemmDeclineReason | None = None) -> None:
    """Plug in a GEMM implementation (e.g. lowbit.kernels' Triton block-scaled GEMM). `why_not`,
    when given, says why `fn` declines a GEMM; a layer that named the backend raises with it."""
    _BACKENDS[name] = fn
    _DECLINE_REASONS.pop(name, None)
    if why_not is not None:
        _DECLINE_REASONS[name] = why_not


def _describe(gemm: GemmSpec) -> str:
    # The operands' formats in a line ("fp4_e2m1/32/e8m0 x fp4_e2m1/32/e8m0, Hadamard 32").
    def side(q: QuantSpec | None) -> str:
        return "high precision" if q is None else f"{q.fmt}/{q.block}/{q.scale}"

    text = f"{side(gemm.a)} x {side(gemm.b)}"
    return text + (f", Hadamard {gemm.hadamard}" if gemm.hadamard else "")


def gemm_backends() -> list[str]:
    """Every valid `backend=` value: the built-in choices and the registered backends."""
    return [*BACKEND_CHOICES, *_BACKENDS]


def _emulate(a: Operand, b: Operand, gemm: GemmSpec, seed: int) -> torch.Tensor:
    bh = b.dequantize()
    if gemm.leverage_sampling and a.hp is None:
        parts = [p.dequantize_lastdim() for p in a.parts]
        return leverage_sampled(parts, bh, derive_seed(seed, 4)) @ bh.t()
    return a.dequantize() @ bh.t()


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _cublas_kind(a: Operand, b: Operand, gemm: GemmSpec) -> str | None:
    """'tensor', 'row' or 'blockwise' when cuBLAS (torch) runs this fp8 pair, else None."""
    if gemm.hadamard or gemm.bit_split or gemm.leverage_sampling or a.hp is not None or b.hp is not None:
        return None
    qa, qb = a.parts[0], b.parts[0]
    if qa.data.dtype not in _FP8 or qb.data.dtype not in _FP8:
        return None
    if qa.data.dtype == qb.data.dtype == torch.float8_e5m2:
        return None
    m, k = qa.shape
    n = qb.shape[0]
    if qa.block == qb.block and qa.block in ("tensor", "row"):
        return qa.block if m % 16 == 0 and k % 16 == 0 and n % 16 == 0 else None
    # DeepSeek-V3 blockwise: 1x128 groups (fp32 scales) against 1x128 groups or 128x128 tiles.
    fp32_scales = qa.tensor_scale is None and qb.tensor_scale is None and _fp32_scaled(gemm)
    if qa.block == 128 and qb.block in (128, (128, 128)) and fp32_scales:
        if m % 128 == 0 and n % 128 == 0 and k % 128 == 0 and _HAS_BLOCKWISE:
            return "blockwise"
    return None


def _fp32_scaled(gemm: GemmSpec) -> bool:
    return all(s is not None and s.scale == "fp32" for s in (gemm.a, gemm.b))


_HAS_BLOCKWISE = hasattr(torch.nn.functional, "scaled_mm") and hasattr(torch.nn.functional, "ScalingType")


def _scaled_mm_ok(a: Operand, b: Operand, gemm: GemmSpec) -> bool:
    return _cublas_kind(a, b, gemm) is not None


def _scaled_mm(
    a: Operand,
    b: Operand,
    gemm: GemmSpec | None = None,
    out_dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    qa, qb = a.parts[0], b.parts[0]
    kind = "tensor" if qa.block == "tensor" else "row" if qa.block == "row" else "blockwise"
    fast = bool(gemm is not None and gemm.fast_accum)
    if kind == "blockwise":
        out = _blockwise_mm(qa, qb, fast)
    elif kind == "tensor":
        sa, sb = qa.scale.reshape(()).float(), qb.scale.reshape(()).float()
        fused_bias = bias is not None and bias.dtype == out_dtype and out_dtype == torch.bfloat16
        out = torch._scaled_mm(
            qa.data, qb.data.t(), scale_a=sa, scale_b=sb, bias=bias if fused_bias else None,
            out_dtype=out_dtype, use_fast_accum=fast,
        )
        if fused_bias:
            return out
    else:  # per-row scales: cuBLAS wants (M, 1) and (1, N) and a bf16 output
        sa, sb = qa.scale.reshape(-1, 1).float(), qb.scale.reshape(1, -1).float()
        out = torch._scaled_mm(
            qa.data, qb.data.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast
        )
    return _finish(out, out_dtype, bias)


def blockwise_scales(q: QTensor) -> tuple[torch.Tensor, object]:
    """q's fp32 scales (1x128 groups or 128x128 tiles along K) as cuBLAS's blockwise fp8 GEMM reads
    them, with their torch.nn.functional.ScalingType: 1x128 scales as (rows, K/128) with the rows
    contiguous (the group-major layout lowbit.kernels writes; a copy otherwise), 128x128 tile scales
    as (L4, rows/128), stride (1, L4), L4 = K/128 rounded up to 4 (zero padding, a copy where needed)."""
    from torch.nn.functional import ScalingType

    if q.block == 128:
        return q.scale.float().t().contiguous().t(), ScalingType.BlockWise1x128
    nb, kb = q.scale.shape
    l4 = -(-kb // 4) * 4
    if l4 == kb and q.scale.dtype == torch.float32 and q.scale.is_contiguous():
        return q.scale.t(), ScalingType.BlockWise128x128
    padded = torch.zeros((nb, l4), dtype=torch.float32, device=q.scale.device)
    padded[:, :kb] = q.scale.float()
    return padded.t(), ScalingType.BlockWise128x128


def _blockwise_mm(qa: QTensor, qb: QTensor, fast: bool) -> torch.Tensor:
    # A in 1x128 groups, B in 1x128 groups or 128x128 tiles; dims are multiples of 128 (checked by
    # _cublas_kind).
    from torch.nn.functional import scaled_mm

    (sa, ka), (sb, kb) = blockwise_scales(qa), blockwise_scales(qb)
    return scaled_mm(qa.data, qb.data.t(), sa, ka, sb, kb, output_dtype=torch.bfloat16, use_fast_accum=fast)


def _finish(out: torch.Tensor, out_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(out_dtype)


_warned: set[str] = set()


def gemm_operands(
    a: Operand,
    b: Operand,
    gemm: GemmSpec,
    seed: int = 0,
    backend: str = "auto",
    *,
    out_dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A·B^T (+ bias) of two prepared operands (rows_a × rows_b), in `out_dtype`."""
    if backend == "reference":
        backend = "emulate"
    if backend not in _BACKENDS and backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown GEMM backend {backend!r}; valid choices: {', '.join(gemm_backends())}")
    if gemm.leverage_sampling and a.hp is None and backend not in ("emulate", "scaled_mm"):
        sampled = leverage_backend("cuda" if a.is_cuda else "cpu")
        out = sampled(a, b, derive_seed(seed, 4), out_dtype, bias) if sampled is not None else None
        if out is not None:
            return out.to(out_dtype)
    if backend in _BACKENDS:
        out = _BACKENDS[backend](a, b, gemm, out_dtype, bias)
        if out is None:
            why = _DECLINE_REASONS.get(backend, lambda *_: None)(a, b, gemm)
            raise ValueError(
                f"GEMM backend {backend!r} does not run this GEMM ({_describe(gemm)})"
                + (f": {why}" if why else "")
                + "; backend='auto' picks one that does"
            )
        return out.to(out_dtype)
    use_scaled = backend == "scaled_mm" or (backend == "auto" and a.is_cuda)
    if use_scaled and _scaled_mm_ok(a, b, gemm):
        try:
            return _scaled_mm(a, b, gemm, out_dtype, bias)
        except RuntimeError as e:  # e.g. a GPU without fp8 tensor cores
            if backend == "scaled_mm":
                raise
            if "scaled_mm" not in _warned:
                _warned.add("scaled_mm")
                warnings.warn(f"torch._scaled_mm failed ({e}); emulating fp8 GEMMs instead", stacklevel=2)
    elif backend == "scaled_mm":
        raise ValueError(f"backend='scaled_mm' needs fp8 tensorwise/rowwise/blockwise operands, got {gemm}")
    if backend == "auto":
        for fn in _BACKENDS.values():
            out = fn(a, b, gemm, out_dtype, bias)
            if out is not None:
                return out.to(out_dtype)
    return _finish(_emulate(a, b, gemm, seed), out_dtype, bias)


def quantized_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    gemm: GemmSpec,
    seed: int = 0,
    backend: str = "auto",
    observe: Observer | None = None,
) -> torch.Tensor:
    """fp32 A·B^T with both operands (rows × K) rotated and quantized as `gemm` says."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"reduction dims differ: A {tuple(a.shape)} vs B {tuple(b.shape)}")
    oa = prepare_operand(a, gemm.a, gemm, seed, 1, observe=observe, name="a")
    ob = prepare_operand(b, gemm.b, gemm, seed, 2, observe=observe, name="b")
    return gemm_operands(oa, ob, gemm, seed, backend)
