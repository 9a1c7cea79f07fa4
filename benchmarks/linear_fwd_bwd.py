"""Linear layer forward+backward on Llama-3-8B shapes (8192 tokens), one process per variant (GPU).

Variants (each in its own Python process, so dynamo's recompile limit and allocator state of one
never spoil another):
    bf16, bf16_compile           nn.Linear in bf16, eager / torch.compile
    torchao_tensorwise|rowwise   torchao.float8 convert_to_float8_training + torch.compile
    lowbit_<recipe>              QuantLinear(recipe, backend="auto") as training runs it: cuBLAS
                                 for fp8 tensorwise/rowwise/blockwise, else the Triton GEMM; the
                                 fused quantize and pair quantize (X and X^T in one pass)
    lowbit_<recipe>+ref          the same GEMMs with the eager lowbit.quant reference quantizers
                                 (the fused seams unregistered), for comparison
    lowbit_<recipe>+unfused      the Hadamard rotation as its own kernel (fp32 written), then the
                                 quantize kernel: what fusing the rotation saves
    lowbit_<recipe>+compile      QuantLinear under torch.compile: traced recipes (fp8 tensorwise,
                                 rowwise) are one graph (quantizers as custom ops, cuBLAS GEMMs),
                                 the rest graph-break and run eagerly
    lowbit_<recipe>+cudagraphs   torch.compile(mode="reduce-overhead"), the untraced recipes as
                                 opaque graph ops (lowbit.nn.quant_linear_graph), replayed as CUDA
                                 graphs: what train.compile_mode=reduce_overhead runs
Time = median of triton.testing.do_bench over `y = layer(x); y.backward(dy)` (x, weight grads reset
each call). rel_err = ||y - x·W^T|| / ||x·W^T|| against fp32 on the first shape.

    python benchmarks/linear_fwd_bwd.py --out $OUT/linear.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
DEFAULT = ("bf16,torchao_tensorwise,torchao_rowwise,lowbit_fp8_tensorwise,lowbit_fp8_delayed,"
           "lowbit_fp8_rowwise,lowbit_fp8_blockwise,lowbit_mxfp8,lowbit_mxfp4,lowbit_nvfp4,lowbit_int4_hq")


def _layer(variant: str, k: int, n: int) -> torch.nn.Module:
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    if variant.startswith("bf16"):
        return torch.compile(lin) if variant == "bf16_compile" else lin
    if variant.startswith("torchao"):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        cfg = Float8LinearConfig.from_recipe_name(variant.split("_", 1)[1])
        model = convert_to_float8_training(torch.nn.Sequential(lin), config=cfg)
        return torch.compile(model)
    import lowbit.kernels  # noqa: F401  (registers the Triton GEMM backend and fused quantizers)
    import lowbit.quant.gemm as qg
    from lowbit.nn.quant_linear import QuantLinear

    recipe = variant.removeprefix("lowbit_").split("+")[0]
    if variant.endswith("+cudagraphs"):  # before the layer is built: its ops register then
        from lowbit.nn import quant_linear_graph

        quant_linear_graph.select_mode("opaque")
        layer = QuantLinear.from_linear(lin, recipe, backend="auto")
        return torch.compile(layer, mode="reduce-overhead")
    if variant.endswith("+ref"):
        for seam in (qg._QUANTIZERS, qg._PAIR_QUANTIZERS, qg._ROTATORS, qg._ROTATE_QUANTIZERS):
            seam.clear()
    if variant.endswith("+unfused"):  # Hadamard rotation and quantize as two kernels
        qg._ROTATE_QUANTIZERS.clear()
    layer = QuantLinear.from_linear(lin, recipe, backend="auto")
    return torch.compile(layer) if variant.endswith("+compile") else layer


def profile_step(step, n: int = 3, top: int = 20) -> str:
    """The GPU kernels of `n` steps, most expensive first (what is in the way of a target)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60)


def run_one(variant: str, prof: bool = False) -> list[dict]:
    from triton.testing import do_bench

    rows = []
    for i, (k, n) in enumerate(SHAPES):
        layer = _layer(variant, k, n)
        w = next(layer.parameters())
        x = torch.randn(8192, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(8192, n, device="cuda", dtype=torch.bfloat16)

        def step(layer=layer, x=x, dy=dy, w=w):
            # Gradients reset on every call (do_bench resets them only in its timed loop): under
            # CUDA graphs a gradient is an output of the previous replay, and accumulating into
            # it after the next replay overwrote it is an error.
            x.grad = w.grad = None
            layer(x).backward(dy)

        rel = float("nan")
        if i == 0:
            with torch.no_grad():
                ref = x.float() @ w.float().T
                rel = float((layer(x).float() - ref).norm() / ref.norm())
        torch.cuda.reset_peak_memory_stats()
        t = float(do_bench(step, warmup=25, rep=100, grad_to_none=[x, w], return_mode="median"))
        rows.append(dict(variant=variant, shape=f"{k}->{n}", ms=t, rel_err=rel,
                         peak_GiB=torch.cuda.max_memory_allocated() / 2**30))
        if prof and i == 0:
            rows[-1]["profile"] = profile_step(step)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default=DEFAULT)
    p.add_argument("--one", default="")
    p.add_argument("--profile", default="", help="comma-separated variants to profile (first shape)")
    p.add_argument("--timeout", type=int, default=240)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.one:
        for r in run_one(args.one, prof=args.profile == "1"):
            print("ROW " + json.dumps(r), flush=True)
        return
    import triton

    rows: list[dict] = []
    for v in args.variants.split(","):
        try:
            prof = "1" if v in args.profile.split(",") else "0"
            res = subprocess.run([sys.executable, __file__, "--one", v, "--profile", prof],
                                 capture_output=True, text=True, timeout=args.timeout)
            got = [json.loads(ln[4:]) for ln in res.stdout.splitlines() if ln.startswith("ROW ")]
            if not got:
                got = [dict(variant=v, error=(res.stderr or res.stdout)[-400:])]
        except subprocess.TimeoutExpired:
            got = [dict(variant=v, error=f"timeout {args.timeout}s")]
        rows += got
        for r in got:
            print(json.dumps(r), flush=True)
    base = {r["shape"]: r["ms"] for r in rows if r.get("variant") == "bf16" and "ms" in r}
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), tokens=8192)
    print(f"\n{meta}\n{'variant':>26} {'shape':>12} {'ms':>7} {'x bf16':>7} {'rel_err':>8} {'peak GiB':>8}")
    for r in rows:
        if "ms" not in r:
            print(f"{r['variant']:>26} ERROR {r.get('error', '')[-200:]!r}")
            continue
        sp = base.get(r["shape"], float("nan")) / r["ms"]
        r["speedup_vs_bf16"] = sp
        print(f"{r['variant']:>26} {r['shape']:>12} {r['ms']:7.3f} {sp:7.2f} {r['rel_err']:8.1e} "
              f"{r['peak_GiB']:8.2f}")
    for r in rows:
        if "profile" in r:
            print(f"\nprofile {r['variant']} {r['shape']} (3 steps)\n{r['profile']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
