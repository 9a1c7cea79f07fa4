"""One quantized GEMM, out = A·B^T over the shared last axis K, as a recipe's GemmSpec says.

Two steps, so a caller can quantize an operand early and keep only the compact form (QuantLinear
quantizes X^T for wgrad during the forward pass and saves that for backward):
    prepare_operand(t, spec, gemm, seed, role)  pad K and rotate (Hadamard), quantize (QuantSpec),
                                                bit-split (int4_hq) -> Operand
    gemm_operands(a, b, gemm, seed, backend)    the product of two prepared operands (fp32)
quantized_gemm(a, b, gemm, seed) does both.

Quantize seam: register_quantize_backend(fn) swaps in a fused quantize kernel (same signature and
bits as quantize()) for operands on one device type (CUDA).

GEMM backends (the seam where faster GEMM kernels plug in):
    emulate    dequantize to fp32 and matmul in fp32: exact products of the quantized values with
               fp32 accumulation; runs anywhere, the reference every kernel is tested against.
    scaled_mm  torch._scaled_mm for fp8 operands with per-tensor or per-row scales (no Hadamard).
    auto       a registered backend that accepts the GEMM (register_gemm_backend; the Triton
               block-scaled GEMM goes here), else scaled_mm where it applies on CUDA, else emulate.

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
from lowbit.quant.qtensor import QTensor
from lowbit.quant.quantize import QuantSpec, quantize
from lowbit.quant.recipes import GemmSpec
from lowbit.quant.rounding import uniform_noise

# observer(operand_name, tensor_as_quantized_fp32, qtensor): telemetry hook, None when off.
Observer = Callable[[str, torch.Tensor, QTensor], None]


def derive_seed(seed: int, k: int) -> int:
    """A distinct 31-bit seed for sub-stream k of a GEMM call (any fixed integer mix works)."""
    return (int(seed) + k * 0x632BE5AB) & 0x7FFFFFFF


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


def prepare_operand(
    t: torch.Tensor,
    spec: QuantSpec | None,
    gemm: GemmSpec,
    seed: int,
    role: int,
    *,
    amax_history: torch.Tensor | None = None,
    observe: Observer | None = None,
    name: str = "",
) -> Operand:
    """Rotate/quantize one operand `t` (rows × K). role 1 = A (left), 2 = B (right)."""
    if t.dim() != 2:
        raise ValueError(f"GEMM operands are matrices (rows × K), got shape {tuple(t.shape)}")
    t = t.float()
    if gemm.hadamard:
        pad = (-t.shape[1]) % gemm.hadamard
        if pad:
            t = torch.nn.functional.pad(t, (0, pad))
        signs = random_signs(gemm.hadamard, seed, t.device) if gemm.random_signs else None
        t = hadamard_rotate(t, gemm.hadamard, signs)
    if spec is None:
        return Operand(hp=t)
    amax = None
    if amax_history is not None and spec.block == "tensor":
        amax = _delayed_amax(t, amax_history)
    quant = _QUANTIZERS.get(t.device.type, quantize)
    q = quant(t, spec, -1, seed=derive_seed(seed, role), amax=amax)
    if observe is not None:
        observe(name, t, q)
    parts = [q]
    if gemm.bit_split and role == 1:
        residual = t - q.dequantize_lastdim()
        parts.append(quant(residual, spec, -1, seed=derive_seed(seed, 3)))
    return Operand(parts)


# A fused quantize kernel with quantize()'s signature and bit-identical results (lowbit.kernels)
# registers here per device type; other devices use the reference.
_QUANTIZERS: dict[str, Callable[..., QTensor]] = {}


def register_quantize_backend(fn: Callable[..., QTensor], device_type: str = "cuda") -> None:
    """Use `fn` (a drop-in for lowbit.quant.quantize) for GEMM operands on `device_type`."""
    _QUANTIZERS[device_type] = fn


def _delayed_amax(t: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """The scale amax from the history (TE DelayedScaling); records this call's amax afterwards."""
    current = t.abs().amax()
    past = history.max()
    amax = torch.where(past > 0, past, current)
    history.copy_(torch.roll(history, 1))
    history[0] = current
    return amax


# --- backends ----------------------------------------------------------------------------------

# A backend gets the prepared operands and the GemmSpec and returns fp32 (rows_a × rows_b), or
# None to decline (then the next choice is tried).
GemmBackend = Callable[[Operand, Operand, GemmSpec], "torch.Tensor | None"]
_BACKENDS: dict[str, GemmBackend] = {}
BACKEND_CHOICES = ("auto", "emulate", "reference", "scaled_mm")  # reference = emulate


def register_gemm_backend(name: str, fn: GemmBackend) -> None:
    """Plug in a GEMM implementation (e.g. lowbit.kernels' Triton block-scaled GEMM)."""
    _BACKENDS[name] = fn


def gemm_backends() -> list[str]:
    """Every valid `backend=` value: the built-in choices and the registered backends."""
    return [*BACKEND_CHOICES, *_BACKENDS]


def _emulate(a: Operand, b: Operand, gemm: GemmSpec, seed: int) -> torch.Tensor:
    bh = b.dequantize()
    if gemm.leverage_sampling and a.hp is None:
        return _leverage_sampled(a, bh, seed) @ bh.t()
    return a.dequantize() @ bh.t()


def _leverage_sampled(a: Operand, bh: torch.Tensor, seed: int) -> torch.Tensor:
    """Keep about half of the K-terms of sum_k A[:, k] B[:, k]^T (all parts), reweighted by 1/p.

    Term (part p, column k) has weight ||A_p[:, k]||·||B[:, k]|| (its Frobenius norm). Keep
    probabilities p = min(1, c·w) with c set so that sum p = K (water-filling), kept terms scaled
    by 1/p: the expectation is the full product. Noise: uniform_noise(derive_seed(seed, 4)).
    """
    parts = [p.dequantize_lastdim() for p in a.parts]
    k = bh.shape[1]
    w = torch.stack([p.norm(dim=0) for p in parts]) * bh.norm(dim=0)  # (n_parts, K)
    target = float(k)
    c = target / w.sum().clamp_min(1e-30)
    for _ in range(8):  # fixed iteration count: the same on every device
        saturated = c * w >= 1
        rest = w.masked_fill(saturated, 0).sum()
        c = torch.where(rest > 0, (target - saturated.sum()) / rest.clamp_min(1e-30), c)
    prob = (c * w).clamp(max=1.0)
    u = uniform_noise(derive_seed(seed, 4), tuple(prob.shape), prob.device)
    keep = u < prob
    gain = torch.where(keep, 1.0 / prob.clamp_min(1e-30), torch.zeros_like(prob))
    out = parts[0] * gain[0]
    for i in range(1, len(parts)):
        out = out + parts[i] * gain[i]
    return out


def _scaled_mm_ok(a: Operand, b: Operand, gemm: GemmSpec) -> bool:
    if gemm.hadamard or gemm.bit_split or gemm.leverage_sampling or a.hp is not None or b.hp is not None:
        return False
    qa, qb = a.parts[0], b.parts[0]
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    if qa.data.dtype not in fp8 or qb.data.dtype not in fp8:
        return False
    if qa.data.dtype == qb.data.dtype == torch.float8_e5m2:
        return False
    if qa.block != qb.block or qa.block not in ("tensor", "row"):
        return False
    m, k = qa.shape
    n = qb.shape[0]
    return m % 16 == 0 and k % 16 == 0 and n % 16 == 0


def _scaled_mm(a: Operand, b: Operand) -> torch.Tensor:
    qa, qb = a.parts[0], b.parts[0]
    if qa.block == "tensor":
        sa, sb = qa.scale.reshape(()).float(), qb.scale.reshape(()).float()
        out_dtype = torch.float32
    else:  # per-row scales: cuBLAS wants (M, 1) and (1, N) and a bf16 output
        sa, sb = qa.scale.reshape(-1, 1).float(), qb.scale.reshape(1, -1).float()
        out_dtype = torch.bfloat16
    out = torch._scaled_mm(qa.data, qb.data.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    return out.float()


_warned: set[str] = set()


def gemm_operands(
    a: Operand, b: Operand, gemm: GemmSpec, seed: int = 0, backend: str = "auto"
) -> torch.Tensor:
    """fp32 A·B^T of two prepared operands (rows_a × rows_b)."""
    if backend == "reference":
        backend = "emulate"
    if backend not in _BACKENDS and backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown GEMM backend {backend!r}; valid choices: {', '.join(gemm_backends())}")
    if backend in _BACKENDS:
        out = _BACKENDS[backend](a, b, gemm)
        if out is None:
            raise ValueError(f"GEMM backend {backend!r} does not support {gemm}")
        return out
    if backend == "auto":
        for fn in _BACKENDS.values():
            out = fn(a, b, gemm)
            if out is not None:
                return out
    use_scaled = backend == "scaled_mm" or (backend == "auto" and a.is_cuda)
    if use_scaled and _scaled_mm_ok(a, b, gemm):
        try:
            return _scaled_mm(a, b)
        except RuntimeError as e:  # e.g. a GPU without fp8 tensor cores
            if backend == "scaled_mm":
                raise
            if "scaled_mm" not in _warned:
                _warned.add("scaled_mm")
                warnings.warn(f"torch._scaled_mm failed ({e}); emulating fp8 GEMMs instead", stacklevel=2)
    elif backend == "scaled_mm":
        raise ValueError(f"backend='scaled_mm' needs fp8 tensorwise/rowwise operands, got {gemm}")
    return _emulate(a, b, gemm, seed)


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
