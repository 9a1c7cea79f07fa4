"""Row-major copies of transposed views (X^T, W^T): torch's `.contiguous()` against
lowbit.kernels.transpose.row_major and a plain copy of the same bytes, on CUDA (GPU only).

Each is timed as a CUDA graph of 50 calls; TB/s counts bytes read + written. Every copy is checked
bit for bit against `.contiguous()` first.

    python benchmarks/transpose_copy.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

CASES = (((16384, 2048), torch.bfloat16), ((16384, 8192), torch.bfloat16),
         ((2048, 8192), torch.float32), ((8192, 2048), torch.float32))


def graph_us(f: Callable[[], object], n: int = 50) -> float:
    f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    from lowbit.kernels.transpose import row_major

    if not torch.cuda.is_available():
        raise SystemExit("transpose_copy.py times CUDA kernels: no CUDA device")
    for shape, dt in CASES:
        x = torch.randn(shape, device="cuda").to(dt)
        v = x.t()
        if not torch.equal(row_major(v), v.contiguous()):
            raise SystemExit(f"row_major differs from .contiguous() at {shape} {dt}")
        y = torch.empty_like(x)
        a = graph_us(v.contiguous)
        b = graph_us(lambda v=v: row_major(v))
        c = graph_us(lambda x=x, y=y: y.copy_(x))
        gb = 2 * x.numel() * x.element_size() / 1e9
        print(f"{shape} {dt}: torch .contiguous() {a:.1f} us ({gb / a * 1e3:.2f} TB/s), row_major {b:.1f} us "
              f"({gb / b * 1e3:.2f} TB/s), plain copy {c:.1f} us ({gb / c * 1e3:.2f} TB/s); x{a / b:.2f}")


if __name__ == "__main__":
    main()
