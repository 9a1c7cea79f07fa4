"""Optimizer step time and state memory on a ~1.07B-parameter set of Llama-like fp32 tensors (GPU).

Compares, in one process on one GPU: torch AdamW(fused=True), our 8-bit and 4-bit AdamW (fused
Triton steps), our BF16-parameter AdamW with stochastic rounding, bitsandbytes AdamW8bit and
torchao AdamW8bit/AdamW4bit (each skipped when not installed). Step time is the median of
triton.testing.do_bench (CUDA events); state bytes/param is the growth of allocated CUDA memory
over the first step (so every implementation is measured the same way). Also checks on the GPU
that the fused kernels agree with our torch reference step.

    python benchmarks/optim_step.py --out runs/optim_step.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import torch


def llama_like_shapes(layers: int = 22, d: int = 2048, ffn: int = 5632, kv: int = 256, vocab: int = 25600):
    """TinyLlama-like layout (GQA, SwiGLU), untied embedding and head: 1.0738B parameters."""
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d), (kv, d), (kv, d), (d, d), (ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    shapes += [(d,), (vocab, d)]
    return shapes


def make_optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    kw = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    if name == "torch_adamw_fused":
        return torch.optim.AdamW(params, fused=True, **kw)
    if name.startswith("lowbit_"):
        from lowbit.optim.adamw import LowBitAdamW

        bits = {"lowbit_adamw8bit": 8, "lowbit_adamw4bit": 4, "lowbit_adamw_bf16_sr": 32,
                "lowbit_adamw8bit_bf16_sr": 8, "lowbit_adamw8bit_paged": 8}[name]
        rounding = "stochastic" if "bf16" in name else "nearest"
        return LowBitAdamW(params, state_bits=bits, bf16_rounding=rounding, paged="paged" in name, **kw)
    if name == "bnb_adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    if name.startswith("torchao_"):
        try:
            from torchao.optim import AdamW4bit, AdamW8bit
        except ImportError:
            from torchao.prototype.low_bit_optim import AdamW4bit, AdamW8bit
        return {"torchao_adamw8bit": AdamW8bit, "torchao_adamw4bit": AdamW4bit}[name](params, **kw)
    raise ValueError(name)


def check_fused_against_reference(config: dict | None = None) -> dict:
    """Fused Triton steps vs the torch reference on the GPU: fraction of differing codes/params
    (with the launch CONFIG updated by `config` for the fused runs)."""
    from lowbit.kernels import optim_adamw_lowbit as k
    from lowbit.optim.adamw import LowBitAdamW

    saved = dict(k.CONFIG)
    k.CONFIG.update(config or {})

    out = {}
    # 4-bit matrices need ncols % 128 == 0 for the fused rank-1 kernel (others take the reference).
    for bits, dtype, rounding, shape in [(8, torch.float32, "nearest", (1000, 1030)),
                                         (4, torch.float32, "nearest", (1000, 1024)),
                                         (8, torch.bfloat16, "stochastic", (1000, 1030)),
                                         (4, torch.bfloat16, "kahan", (1000, 1024)),
                                         (4, torch.float32, "nearest", (4099,))]:
        runs = []
        for fused in (False, True):
            gen = torch.Generator(device="cuda").manual_seed(0)
            p = torch.nn.Parameter(torch.randn(shape, device="cuda", generator=gen).to(dtype))
            opt = LowBitAdamW([p], lr=1e-3, state_bits=bits, bf16_rounding=rounding, fused=fused)
            for _ in range(5):
                p.grad = torch.randn(p.shape, device="cuda", generator=gen).to(dtype)
                opt.step()
            runs.append((p.detach().float(), opt.state[p]))
        (p0, s0), (p1, s1) = runs
        out[f"{bits}bit_{dtype}_{rounding}_{'x'.join(map(str, shape))}"] = {
            "param_max_abs_diff": (p0 - p1).abs().max().item(),
            "param_frac_differing": (p0 != p1).float().mean().item(),
            "codes_frac_differing": (s0["exp_avg_codes"] != s1["exp_avg_codes"]).float().mean().item(),
            "v_codes_frac_differing": (s0["exp_avg_sq_codes"] != s1["exp_avg_sq_codes"]).float().mean()
            .item(),
        }
    k.CONFIG.clear()
    k.CONFIG.update(saved)
    return out


# Launch shapes and code variants to sweep (lowbit.kernels.optim_adamw_lowbit.CONFIG keys), each
# against the defaults. 4-bit: the former code (no code table, fenced float atomics, IEEE sqrt and
# division with per-element branches, 8 rows per pass-1 iteration, no pipelining), each new piece
# turned off alone, then pass 1 pipelining and shapes. (Runs D-E swept more: docs/BENCHMARKS.md.)
SWEEPS = {
    "lowbit_adamw8bit": [{"bpp8": b, "warps8": w} for b, w in [(1, 2), (1, 4)]],
    "lowbit_adamw4bit": [{"mlut4": 0, "fast4": 0, "relax1": 0, "br1": 8, "ns1": 1}, {"mlut4": 0},
                         {"fast4": 0}, {"relax1": 0}, {"fma4": 0}, {"ns1": 1}, {"ns1": 2}, {"br1": 8},
                         {"l4": 2}],
}


def kernel_times(step, steps: int = 3) -> dict:
    """GPU time per kernel name per step, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            out[e.key[:60]] = round(t / 1e3 / steps, 3)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:8])


def bench(names: list[str], shapes, rep_ms: int, sweeps: dict | None = None) -> list[dict]:
    import triton.testing

    sweeps = sweeps or {}

    rows = []
    n_params = sum(torch.Size(s).numel() for s in shapes)
    for name in names:
        dtype = torch.bfloat16 if "bf16" in name else torch.float32
        gen = torch.Generator(device="cuda").manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen, dtype=dtype) * 0.02)
                  for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen, dtype=dtype) * 1e-3
        try:
            opt = make_optimizer(name, params)
        except Exception as e:  # not installed, or built for another torch
            rows.append({"name": name, "skipped": f"unavailable: {type(e).__name__}: {e}"[:300]})
            continue
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        t0 = time.time()
        opt.step()  # allocates state (and compiles, for torchao)
        torch.cuda.synchronize()
        state_bytes = torch.cuda.memory_allocated() - before
        first = time.time() - t0
        ms = triton.testing.do_bench(opt.step, warmup=100, rep=rep_ms, return_mode="median")
        host = []
        for _ in range(10):  # host-side (Python + launch) time of one step
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        row = {"name": name, "param_dtype": str(dtype).replace("torch.", ""), "step_ms": ms,
               "host_ms": sorted(host)[5], "state_bytes_per_param": state_bytes / n_params,
               "first_step_s": first}
        if hasattr(opt, "state_bytes"):
            row["state_tensor_bytes_per_param"] = opt.state_bytes() / n_params
        if name.startswith("lowbit_"):
            row["kernels_ms_per_step"] = kernel_times(opt.step)
        if name in sweeps:
            from lowbit.kernels import optim_adamw_lowbit as k

            saved = dict(k.CONFIG)
            row["sweep"] = []
            for cfg in sweeps[name]:
                k.CONFIG.update(cfg)
                opt.step()
                t = triton.testing.do_bench(opt.step, warmup=50, rep=200, return_mode="median")
                row["sweep"].append({**cfg, "step_ms": t, "kernels_ms": kernel_times(opt.step, 2)})
                print(row["sweep"][-1], flush=True)
                k.CONFIG.update(saved)
        rows.append(row)
        print(rows[-1], flush=True)
        del opt, params
        gc.collect()
        torch.cuda.empty_cache()
    base = next((r["step_ms"] for r in rows if r["name"] == "torch_adamw_fused"), None)
    for r in rows:
        if base and "step_ms" in r:
            r["ratio_vs_fused_adamw"] = r["step_ms"] / base
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="optim_step.json")
    ap.add_argument("--rep-ms", type=int, default=500)
    ap.add_argument("--sweep", action="store_true", help="also time a few launch shapes of our kernels")
    ap.add_argument("--optims", default="torch_adamw_fused,lowbit_adamw8bit,lowbit_adamw4bit,"
                    "lowbit_adamw_bf16_sr,lowbit_adamw8bit_bf16_sr,bnb_adamw8bit,torchao_adamw8bit,torchao_adamw4bit")
    args = ap.parse_args()
    import triton

    torch._dynamo.config.cache_size_limit = 64  # torchao compiles one step function per shape
    shapes = llama_like_shapes()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "n_params": n_params, "n_tensors": len(shapes),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    print(meta, flush=True)
    check = {"default": check_fused_against_reference(),
             # the 4-bit kernels without multiply-add fusion: the reference's roundings exactly
             "fma4=0": check_fused_against_reference({"fma4": 0})}
    print("fused vs reference:", check, flush=True)
    rows = bench(args.optims.split(","), shapes, args.rep_ms, SWEEPS if args.sweep else None)
    print(f"\n{'optimizer':28s} {'step ms':>9s} {'vs fused':>9s} {'host ms':>8s} {'state B/param':>14s}")
    for r in rows:
        if "step_ms" in r:
            print(f"{r['name']:28s} {r['step_ms']:9.2f} {r.get('ratio_vs_fused_adamw', float('nan')):9.3f} "
                  f"{r['host_ms']:8.2f} {r['state_bytes_per_param']:14.3f}")
        else:
            print(f"{r['name']:28s} {r['skipped']}")
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "fused_vs_reference": check, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
