"""Quantization telemetry: how much each QuantLinear operand loses to quantization, every N steps.

On a sampled step every quantized operand of every QuantLinear (fprop_x, fprop_w, dgrad_dy,
dgrad_w, wgrad_dy, wgrad_x) reports, summed over the step's micro-batches:
    sqnr_db     10·log10(Σx² / Σ(x − x̂)²), x as quantized (after any Hadamard rotation)
    clip_frac   share of elements with |x| above their block's largest value (max_elem·scale)
    zero_frac   share of nonzero elements that became 0 (flushed below the smallest step)
    amax        largest |x|
Metric names: quant/<layer>/<operand>/<stat>. On other steps the layers' observer hook is None,
so the only cost is one attribute check per GEMM operand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.quant.qtensor import QTensor


@dataclass
class _Acc:
    signal: float = 0.0
    noise: float = 0.0
    clipped: int = 0
    flushed: int = 0
    nonzero: int = 0
    numel: int = 0
    amax: float = 0.0

    def sqnr_db(self) -> float:
        if self.noise == 0:
            return float("inf") if self.signal > 0 else 0.0
        if not math.isfinite(self.noise) or not math.isfinite(self.signal):
            return float("nan")
        return 10.0 * math.log10(max(self.signal, 1e-300) / self.noise)


def operand_stats(x: torch.Tensor, q: QTensor) -> dict[str, float]:
    """Quantization statistics of one tensor x (quantized axis last) and its QTensor q."""
    x = x.float()
    xh = q.dequantize_lastdim()
    limit = q.expanded_scale() * q.fmt.max
    nz = x != 0
    stats = torch.stack(
        [
            x.pow(2).sum(),
            (x - xh).pow(2).sum(),
            (x.abs() > limit).sum().float(),
            (nz & (xh == 0)).sum().float(),
            nz.sum().float(),
            x.abs().amax() if x.numel() else torch.zeros((), device=x.device),
        ]
    ).tolist()  # one device sync per operand, on sampled steps only
    signal, noise, clipped, flushed, nonzero, amax = stats
    return dict(signal=signal, noise=noise, clipped=clipped, flushed=flushed, nonzero=nonzero, amax=amax)


class QuantTelemetry:
    """Attach to a model once; call start_step(step) before and end_step() after each step."""

    def __init__(self, model: nn.Module, every: int = 0) -> None:
        self.every = int(every or 0)
        # Duck-typed (anything with an `observer` slot and a recipe), so lowbit.quant needs no nn import.
        self.layers = [
            (name, m) for name, m in model.named_modules() if hasattr(m, "observer") and hasattr(m, "recipe")
        ]
        self._acc: dict[tuple[str, str], _Acc] = {}
        self._active = False
        self._last: dict[tuple[str, str], _Acc] = {}

    def start_step(self, step: int) -> None:
        self._active = self.every > 0 and bool(self.layers) and step % self.every == 0
        if not self._active:
            return
        self._acc = {}
        for name, m in self.layers:
            m.observer = self._recorder(name)

    def _recorder(self, layer: str):
        def record(operand: str, x: torch.Tensor, q: QTensor) -> None:
            s = operand_stats(x.detach(), q)
            acc = self._acc.setdefault((layer, operand), _Acc())
            acc.signal += s["signal"]
            acc.noise += s["noise"]
            acc.clipped += int(s["clipped"])
            acc.flushed += int(s["flushed"])
            acc.nonzero += int(s["nonzero"])
            acc.numel += x.numel()
            acc.amax = max(acc.amax, s["amax"])

        return record

    def end_step(self) -> dict[str, float]:
        if not self._active:
            return {}
        for _, m in self.layers:
            m.observer = None
        self._active = False
        self._last = self._acc
        out: dict[str, float] = {}
        for (layer, operand), a in self._acc.items():
            base = f"quant/{layer}/{operand}"
            out[f"{base}/sqnr_db"] = a.sqnr_db()
            out[f"{base}/clip_frac"] = a.clipped / max(a.numel, 1)
            out[f"{base}/zero_frac"] = a.flushed / max(a.nonzero, 1)
            out[f"{base}/amax"] = a.amax
        return out

    def summary(self, worst: int = 3) -> str:
        """One line: mean SQNR over the finite operands of the last sampled step, how many were
        non-finite (NaN/Inf values), and the lowest-SQNR layer operands (non-finite ones first)."""
        if not self._last:
            return "quant: no telemetry sampled"
        ranked = sorted(self._last.items(), key=lambda kv: _sort_key(kv[1].sqnr_db()))
        parts = []
        for (layer, operand), a in ranked[:worst]:
            clip, zero = 100 * a.clipped / max(a.numel, 1), 100 * a.flushed / max(a.nonzero, 1)
            parts.append(f"{layer}/{operand} {a.sqnr_db():.1f}dB (clip {clip:.2f}%, zero {zero:.1f}%)")
        # NaN SQNR = an operand with NaN/Inf values: left out of the mean (one would make it NaN) and
        # counted instead. An exact operand (inf dB) counts as 200 dB.
        ok = [min(v, 200.0) for v in (a.sqnr_db() for a in self._last.values()) if not math.isnan(v)]
        bad = len(self._last) - len(ok)
        mean = f"{sum(ok) / len(ok):.1f}dB" if ok else "n/a"
        return (
            f"quant: mean SQNR {mean} over {len(ok)} operands ({bad} non-finite, excluded); worst: "
            + "; ".join(parts)
        )


def _sort_key(v: float) -> float:
    return -math.inf if math.isnan(v) else v
