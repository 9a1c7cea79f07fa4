"""Host time with lowbit.kernels.fast_launch on and off, alternating in one process (GPU).

Host timings on a shared machine drift by more than the effect between processes, so each case is
timed in six rounds that alternate the fast path on and off (fast_launch.ENABLED, launchers
rebuilt), and the medians of the rounds are compared: one launch of the amax kernel, one fused
quantize call on a small input, and eager fwd+bwd of 4096 -> 4096 QuantLinear layers on 16 tokens
(GPU work ~0.1 ms, so the time is the host's). Times are host (enqueue) time per call.

    python benchmarks/fast_launch_ab.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import lowbit.kernels.fast_launch as fl
from lowbit.kernels import quantize as kq
from lowbit.kernels._pair_quantize_triton import launch_amax
from lowbit.nn.quant_linear import QuantLinear
from lowbit.quant import QuantSpec


def set_fast(on: bool) -> None:
    fl.ENABLED = on
    fl._LAUNCHERS.clear()  # every kernel gets its launcher (or not) anew


def host_us(fn: Callable[[], object], n: int) -> float:
    """Host time per call (enqueue), after a warm-up, with the queue drained before and after."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    h = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return h * 1e6


def layer_step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        layer.weight.grad = None
        layer(x).backward(dy)

    return step


def main() -> None:
    x2 = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    bits = torch.zeros(1, dtype=torch.int32, device="cuda")
    mx = QuantSpec("fp4_e2m1", 32, "e8m0")
    xs = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dys = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    cases: dict[str, tuple[Callable[[], object], int]] = {
        "launch_amax": (lambda: launch_amax(x2, bits), 2000),
        "kq.quantize mxfp4 64x256": (lambda: kq.quantize(x2, mx), 1000),
    }
    for recipe in ("fp8_tensorwise", "mxfp4"):
        lin = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
        layer = QuantLinear.from_linear(lin, recipe, backend="auto")
        cases[f"layer {recipe} fwd+bwd"] = (layer_step(layer, xs, dys), 300)
    res: dict[tuple[str, bool], list[float]] = {(k, on): [] for k in cases for on in (True, False)}
    for rnd in range(6):
        for on in (True, False) if rnd % 2 == 0 else (False, True):
            set_fast(on)
            for k, (fn, n) in cases.items():
                res[(k, on)].append(host_us(fn, n))
    for k in cases:
        a, b = res[(k, True)], res[(k, False)]
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{k:28s} fast: median {ma:7.1f} min {min(a):7.1f} us | Triton: median {mb:7.1f} "
              f"min {min(b):7.1f} us | saved {mb - ma:6.1f}")


if __name__ == "__main__":
    main()
