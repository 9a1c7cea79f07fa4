"""MXFP4 GEMMs on Hopper: the exact BF16 path against fp8 tensor cores with the scales folded in (GPU).

For each Llama-3-8B GEMM shape at 8192 tokens (M x N x K), A and B are MXFP4 (E2M1, E8M0 scales
every 32 along K; A stochastically rounded with round-up scales, as the recipe's gradients are).
Variants, each timed with its conversion passes (median of triton.testing.do_bench):
    bf16_mm         cuBLAS BF16 on bf16 copies of the dequantized operands (no conversion: the floor)
    dequant_bf16    both operands dequantized to exact BF16 + cuBLAS BF16 (lowbit's path before)
    fold_tensor     lowbit.kernels.scale_fold.folded_gemm: fold A to e5m2, B to e4m3, cuBLAS fp8 with
                    unit scales and fp32 output, one epilogue pass for both row scales
    fold_rowwise    the fold, then cuBLAS fp8 with the row scales as its (M, 1) / (1, N) scales and
                    bf16 output (no epilogue pass), where torch._scaled_mm takes the dtypes
    fold_triton     the fold, then lowbit's Triton GEMM (row scales in its epilogue)
Errors are max |out - ref| / max |ref| against the float64 product of the dequantized operands.

    python benchmarks/mx_fp8_gemm.py --out $OUT/mx_fp8_gemm.json
"""

from __future__ import annotations

import argparse
import json

import torch

from lowbit.kernels import quantize as kq
from lowbit.kernels.gemm import _dequantized_cublas, _plan, scaled_gemm
from lowbit.kernels.scale_fold import fold_group_scales, folded_gemm
from lowbit.quant import QuantSpec

SHAPES = "8192x4096x4096,8192x14336x4096,8192x4096x14336,4096x4096x8192,14336x4096x8192"
A_SPEC = QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic")
B_SPEC = QuantSpec("fp4_e2m1", 32, "e8m0")


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


def _rowwise(qa, qb, a_dtype):
    fa, fb = fold_group_scales(qa, a_dtype), fold_group_scales(qb, torch.float8_e4m3fn)
    return torch._scaled_mm(fa.data, fb.data.t(), scale_a=fa.scale.reshape(-1, 1),
                            scale_b=fb.scale.reshape(1, -1), out_dtype=torch.bfloat16)


def _variants(m: int, n: int, k: int) -> tuple[dict, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16)
    qa, qb = kq.quantize(a, A_SPEC, seed=1), kq.quantize(b, B_SPEC)
    a16, b16 = qa.dequantize_lastdim().bfloat16(), qb.dequantize_lastdim().bfloat16()
    ref = qa.dequantize_lastdim().double() @ qb.dequantize_lastdim().double().t()
    plan = _plan(qa, qb, False)
    return {
        "bf16_mm": lambda: a16 @ b16.t(),
        "dequant_bf16": lambda: _dequantized_cublas(qa, qb, plan, None, torch.bfloat16),
        "fold_tensor": lambda: folded_gemm(qa, qb, torch.bfloat16),
        "fold_tensor_fp32": lambda: folded_gemm(qa, qb, torch.float32),
        "fold_rowwise_e5m2": lambda: _rowwise(qa, qb, torch.float8_e5m2),
        "fold_rowwise_e4m3": lambda: _rowwise(qa, qb, torch.float8_e4m3fn),
        "fold_triton": lambda: scaled_gemm(fold_group_scales(qa, torch.float8_e5m2),
                                           fold_group_scales(qb, torch.float8_e4m3fn),
                                           out_dtype=torch.bfloat16),
    }, ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        m, n, k = (int(v) for v in shape.split("x"))
        variants, ref = _variants(m, n, k)
        for name, fn in variants.items():
            try:
                out = fn()
                ms = _bench(fn)
            except Exception as e:  # a dtype pair torch._scaled_mm refuses: recorded, not fatal
                rows.append(dict(shape=shape, variant=name, error=f"{type(e).__name__}: {str(e)[:160]}"))
                print(f"{shape:>18} {name:>18}  failed: {rows[-1]['error']}", flush=True)
                continue
            tflops = 2 * m * n * k / ms / 1e9
            rows.append(dict(shape=shape, variant=name, ms=ms, tflops=tflops, err=_err(out, ref)))
            print(f"{shape:>18} {name:>18} {ms:8.3f} ms {tflops:7.0f} TFLOP/s  err {rows[-1]['err']:.1e}",
                  flush=True)
        del variants, ref
        torch.cuda.empty_cache()
    if args.out:
        info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows)
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
