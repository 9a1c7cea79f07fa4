"""Raw GEMM TFLOP/s: our Triton block-scaled GEMMs next to cuBLAS BF16 / FP8 / INT8 in one run (GPU).

Shapes are the Llama-3-8B linear layers at 8192 tokens (M × N × K). Operands are quantized once
(outside the timed region) with lowbit.kernels.quantize; each variant's output is checked against
the fp32 product of the dequantized operands (relative Frobenius error). Time = median of
triton.testing.do_bench; TFLOP/s = 2·M·N·K / time.

    python benchmarks/gemm_tflops.py --out $OUT/gemm_tflops.json
    python benchmarks/gemm_tflops.py --ours int8_row --configs 128x128x4x8x3,128x256x4x8x4
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lowbit.kernels import quantize as kq
from lowbit.kernels.gemm import scaled_gemm
from lowbit.quant import QuantSpec

SHAPES = "8192x4096x4096,8192x14336x4096,8192x4096x14336"
OURS = {
    "mxfp8": (QuantSpec("fp8_e4m3", 32, "e8m0"), QuantSpec("fp8_e4m3", 32, "e8m0")),
    "mxfp4": (QuantSpec("fp4_e2m1", 32, "e8m0"), QuantSpec("fp4_e2m1", 32, "e8m0")),
    "nvfp4": (QuantSpec("fp4_e2m1", 16, "e4m3"), QuantSpec("fp4_e2m1", (16, 16), "e4m3")),
    "fp8_blockwise": (QuantSpec("fp8_e4m3", 128), QuantSpec("fp8_e4m3", (128, 128))),
    "fp8_tensor": (QuantSpec("fp8_e4m3"), QuantSpec("fp8_e4m3")),
    "fp8_row": (QuantSpec("fp8_e4m3", "row"), QuantSpec("fp8_e4m3", "row")),
    "int8_row": (QuantSpec("int8", "row"), QuantSpec("int8", "row")),
    "int4_row": (QuantSpec("int4", "row"), QuantSpec("int4", "row")),
}


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def parse_config(text: str) -> dict:
    """"BMxBNxSPLITxWARPSxSTAGES" (e.g. 128x256x4x8x4) -> scaled_gemm's `config`."""
    bm, bn, split, warps, stages = (int(v) for v in text.split("x"))
    return dict(BM=bm, BN=bn, SPLIT=split, GROUP_M=8, num_warps=warps, num_stages=stages)


def bench_shape(shape: str, ours: list[str], out_dtype: torch.dtype, configs: list[str] = ()) -> list[dict]:
    m, n, k = (int(v) for v in shape.split("x"))
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    flops = 2 * m * n * k
    rows: list[dict] = []

    def add(name: str, fn, ref: torch.Tensor | None) -> None:
        try:
            err = _rel(fn(), ref) if ref is not None else float("nan")
            t = _bench(fn)
            row = dict(shape=shape, variant=name, ms=t, tflops=flops / t / 1e9, rel_err=err)
        except Exception as e:  # a variant that fails is reported, not fatal
            row = dict(shape=shape, variant=name, error=repr(e)[:300])
        rows.append(row)
        print(json.dumps(row), flush=True)

    add("cublas_bf16", lambda: a @ b.T, a.float() @ b.float().T)
    a8, b8 = kq.quantize(a, OURS["fp8_tensor"][0]), kq.quantize(b, OURS["fp8_tensor"][1])
    sa, sb = a8.scale.reshape(()).float(), b8.scale.reshape(()).float()
    add("cublas_fp8_tensor", lambda: torch._scaled_mm(a8.data, b8.data.t(), scale_a=sa, scale_b=sb,
                                                      out_dtype=torch.bfloat16),
        a8.dequantize_lastdim() @ b8.dequantize_lastdim().T)
    r8a, r8b = kq.quantize(a, OURS["fp8_row"][0]), kq.quantize(b, OURS["fp8_row"][1])
    sra, srb = r8a.scale.reshape(-1, 1).float(), r8b.scale.reshape(1, -1).float()
    add("cublas_fp8_row", lambda: torch._scaled_mm(r8a.data, r8b.data.t(), scale_a=sra, scale_b=srb,
                                                   out_dtype=torch.bfloat16),
        r8a.dequantize_lastdim() @ r8b.dequantize_lastdim().T)
    # cuBLAS blockwise (DeepSeek-V3 1x128 activations x 128x128 weights), as QuantLinear calls it.
    from lowbit.quant.gemm import Operand, _blockwise_mm

    ba, bb = kq.quantize(a, OURS["fp8_blockwise"][0]), kq.quantize(b, OURS["fp8_blockwise"][1])
    add("cublas_fp8_blockwise", lambda: _blockwise_mm(ba, bb, False),
        Operand([ba]).dequantize() @ Operand([bb]).dequantize().T)
    i8a, i8b = kq.quantize(a, OURS["int8_row"][0]), kq.quantize(b, OURS["int8_row"][1])
    add("cublas_int8 (int32 out, no scales)", lambda: torch._int_mm(i8a.data, i8b.data.t()), None)
    for variant in ours:  # "mxfp8" or "mxfp8@bf16" (forced compute path)
        name, _, path = variant.partition("@")
        spec_a, spec_b = OURS[name]
        qa, qb = kq.quantize(a, spec_a, seed=1), kq.quantize(b, spec_b, seed=2)
        ref = qa.dequantize_lastdim() @ qb.dequantize_lastdim().T
        add(f"triton_{variant}", lambda qa=qa, qb=qb, path=path or None: scaled_gemm(
            qa, qb, out_dtype=out_dtype, path=path, bf16_exact=True if path == "bf16" else None), ref)
        for c in configs:  # fixed launch shapes instead of the autotuner's pick
            cfg = parse_config(c)
            add(f"triton_{variant}[{c}]", lambda qa=qa, qb=qb, cfg=cfg: scaled_gemm(
                qa, qb, out_dtype=out_dtype, config=cfg), ref)
        del ref
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--ours", default="mxfp8,mxfp4,nvfp4,fp8_blockwise,fp8_tensor,int8_row,int4_row")
    p.add_argument("--out_dtype", default="bfloat16")
    p.add_argument("--configs", default="", help="comma list of BMxBNxSPLITxWARPSxSTAGES to time as well")
    p.add_argument("--out", default="")
    args = p.parse_args()
    import triton

    out_dtype = getattr(torch, args.out_dtype)
    rows: list[dict] = []
    for shape in args.shapes.split(","):
        rows += bench_shape(shape, args.ours.split(","), out_dtype, [c for c in args.configs.split(",") if c])
        torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), out_dtype=args.out_dtype)
    print(f"\n{meta}\n{'shape':>16} {'variant':>36} {'ms':>7} {'TFLOP/s':>8} {'rel_err':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:>16} {r['variant']:>36} ERROR {r['error'][:60]}")
        else:
            print(f"{r['shape']:>16} {r['variant']:>36} {r['ms']:7.3f} {r['tflops']:8.0f} "
                  f"{r['rel_err']:8.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
