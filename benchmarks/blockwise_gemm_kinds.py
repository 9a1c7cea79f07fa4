"""cuBLAS's fp8 GEMM kinds on the shapes of a 1b layer (GPU): which scale layout a folded MXFP4
pair should take (docs/BENCHMARKS.md, thirty-third pass).

For each M x N x K (the 1b model's q/o, k/v, w1/w3 and w2 GEMMs at 16384 tokens: forward, dgrad,
wgrad; then four Llama-3-8B shapes), on random operands, median ms of triton.testing.do_bench:

    bf16       cuBLAS BF16
    row53      torch._scaled_mm, e5m2 A x e4m3 B, row scales, bf16 out (MXFP4's row-fold path)
    row44      the same with e4m3 A
    blk        scaled_mm blockwise, 1 x 128 A x 1 x 128 B, bf16 out
    blk_fp32   the same with fp32 out
    blkt       scaled_mm blockwise, 1 x 128 A x 128 x 128 B, bf16 out

and the blockwise result's error against the float64 product of the scaled operands. The last
line sums one 1b layer's 21 GEMMs (q, o, k, v, w1, w3 and w2, three GEMMs each).

    python benchmarks/blockwise_gemm_kinds.py
"""

from __future__ import annotations

import sys

import torch

T = 16384  # tokens of a 1b step (micro 8 x 2048)
LAYER = [(2048, 2048, 2), (512, 2048, 2), (8192, 2048, 2), (2048, 8192, 1)]  # (out, in, how many)
LLAMA8B = [(8192, 4096, 4096), (8192, 14336, 4096), (8192, 4096, 14336), (4096, 4096, 8192)]


def _kinds(m: int, n: int, k: int) -> tuple[dict, float]:
    from torch.nn.functional import ScalingType, scaled_mm
    from triton.testing import do_bench

    def bench(fn) -> float:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    a4, b4, a5 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn), a.to(torch.float8_e5m2)
    sa, sb = torch.rand(m, 1, device="cuda") + 0.5, torch.rand(1, n, device="cuda") + 0.5
    ca = (torch.rand(k // 128, m, device="cuda") + 0.5).t()  # 1 x 128 scales, rows contiguous
    cb = (torch.rand(k // 128, n, device="cuda") + 0.5).t()
    l4 = -(-(k // 128) // 4) * 4
    tb = (torch.rand(n // 128, l4, device="cuda") + 0.5).t()  # 128 x 128 tile scales, cuBLAS's layout
    v, t = ScalingType.BlockWise1x128, ScalingType.BlockWise128x128
    bf = torch.bfloat16
    r = {
        "bf16": bench(lambda: a @ b.t()),
        "row53": bench(lambda: torch._scaled_mm(a5, b4.t(), scale_a=sa, scale_b=sb, out_dtype=bf)),
        "row44": bench(lambda: torch._scaled_mm(a4, b4.t(), scale_a=sa, scale_b=sb, out_dtype=bf)),
        "blk": bench(lambda: scaled_mm(a4, b4.t(), ca, v, cb, v, output_dtype=bf)),
        "blk_fp32": bench(lambda: scaled_mm(a4, b4.t(), ca, v, cb, v, output_dtype=torch.float32)),
        "blkt": bench(lambda: scaled_mm(a4, b4.t(), ca, v, tb, t, output_dtype=bf)),
    }
    ref = (a4.double() * ca.double().repeat_interleave(128, 1)) @ (
        b4.double() * cb.double().repeat_interleave(128, 1)).t()
    out = scaled_mm(a4, b4.t(), ca, v, cb, v, output_dtype=torch.float32)
    return r, float((out.double() - ref).abs().max() / ref.abs().max())


def main() -> None:
    if not torch.cuda.is_available() or not hasattr(torch.nn.functional, "ScalingType"):
        sys.exit("blockwise_gemm_kinds.py needs a CUDA GPU and torch.nn.functional.scaled_mm")
    shapes = [(s, 1) for s in LLAMA8B]
    for n, k, times in LAYER:
        shapes = [((T, n, k), times), ((T, k, n), times), ((n, k, T), times)] + shapes
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("M x N x K: ms bf16 / row53 / row44 / blk / blk_fp32 / blkt, fp32 blockwise error")
    layer: dict[str, float] = {}
    for (m, n, k), times in shapes:
        r, err = _kinds(m, n, k)
        print(f"{m} x {n} x {k}: " + " / ".join(f"{v:.3f}" for v in r.values()) + f", {err:.1e}", flush=True)
        if (m, n, k) not in LLAMA8B:
            for name, v in r.items():
                layer[name] = layer.get(name, 0.0) + times * v
    print("one 1b layer's 21 GEMMs, ms: " + ", ".join(f"{n} {v:.3f}" for n, v in layer.items()))


if __name__ == "__main__":
    main()
