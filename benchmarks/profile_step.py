"""Where a training step's GPU time goes: kernel time by category for one model and recipe (GPU).

Builds the model as train.py does (Llama + convert_model for the recipe, bf16 autocast, fp32
parameters, fused AdamW with the trainer's gradient clipping), compiles it with its loss, runs
warm-up steps and profiles `--steps` steps. Kernels are grouped by name: GEMMs (cuBLAS/CUTLASS/
nvjet), attention (flash/SDPA), lowbit's quantizers (Triton _pair/_amax/_quantize kernels),
optimizer, and the rest (Inductor's fused elementwise and reductions, copies). Also prints wall
time per step, so host-bound steps show as wall >> GPU.

    python benchmarks/profile_step.py --model 1b --recipe fp8_tensorwise --micro 8
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

CATEGORIES = (
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "scaled_mm", "_mm_")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    # lowbit's Triton kernels (exact names: Inductor names its own kernels after the ops they
    # fuse, e.g. "..._quantize_operand_pair_...", and those belong to "other").
    ("quantize", ("_pair_kernel", "_amax_kernel", "_quant_kernel", "_quantize_kernel", "_rotate_kernel",
                  "_column_groups_kernel",
                  "_amax_if_empty_kernel", "_roll_kernel", "_row_pair_kernel", "_row_col_amax_kernel",
                  "_copy_kernel")),
    # The fused feed-forward's kernels: SwiGLU (or its backward) and the quantization of its results.
    ("swiglu_quantize", ("_swiglu_pair_kernel", "_swiglu_grad_pairs_kernel", "_swiglu_amax_if_empty_kernel")),
    # Operands made ready for a cuBLAS GEMM and its epilogue: BF16 dequantize, the MXFP4 fold to fp8
    # (each row's largest scale, then the codes), the int4 unpack, and the fp32 product's epilogues.
    ("convert", ("_dequant_bf16_kernel", "_row_top_kernel", "_fold_kernel", "_unpack_int4_kernel",
                 "_scale_output_kernel", "_combine_kernel")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
)


_TRITON = ("quantize", "swiglu_quantize", "convert")  # matched by exact kernel name


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        # Inductor launches the traced layer's pair kernel as `_pair_kernel_0`, `_pair_kernel_1`, ...
        if cat in _TRITON and name.rstrip("0123456789").rstrip("_") in keys:
            return cat
        if cat not in _TRITON and any(k in low for k in keys):
            return cat
    return "other"


def _launches(prof: object, steps: int) -> list[dict]:
    """lowbit's Triton kernels grouped by (name, grid) from the profiler's trace, ms per step."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    acc: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in events:
        if e.get("cat") != "kernel" or category(e["name"]) not in _TRITON:
            continue
        a = acc[(e["name"], str(e.get("args", {}).get("grid")))]
        a[0] += e["dur"] / 1e3 / steps
        a[1] += 1 / steps
    rows = [dict(name=name, grid=grid, ms=ms, calls=n, us_per_call=1e3 * ms / n)
            for (name, grid), (ms, n) in acc.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def main() -> None:
    from omegaconf import OmegaConf

    from lowbit.nn.convert import convert_model
    from lowbit.nn.llama import Llama, LlamaConfig
    from lowbit.trainer.grad_clip import clip_and_step
    from lowbit.trainer.loss import LanguageModelLoss

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1b")
    ap.add_argument("--recipe", default="fp8_tensorwise")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mode", default="default", help="torch.compile mode")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="as train.py's train.grad_clip")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(LlamaConfig), OmegaConf.load(f"configs/model/{args.model}.yaml"))
    )
    torch.manual_seed(0)
    model = Llama(cfg)
    if args.recipe != "bf16":
        convert_model(model, args.recipe)
    model = model.cuda()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    # The loss compiled with the model, as the trainer does (lowbit.trainer.loss).
    fwd = torch.compile(LanguageModelLoss(model), mode=args.mode)
    tokens = torch.randint(0, cfg.vocab_size, (args.micro, args.seq_len + 1), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        clip_and_step(opt, params, args.grad_clip)  # as the trainer's TorchEngine.step
        opt.zero_grad(set_to_none=True)

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps * 1e3

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    launches = _launches(prof, args.steps)
    by_cat: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    calls: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        t = e.self_device_time_total / 1e3 / args.steps  # ms per step
        if t <= 0:
            continue
        by_cat[category(e.key)] += t
        top[e.key] += t
        calls[e.key] += e.count / args.steps
    gpu = sum(by_cat.values())
    res = dict(model=args.model, recipe=args.recipe, micro=args.micro, seq_len=args.seq_len, mode=args.mode,
               wall_ms=wall, gpu_ms=gpu, by_category_ms=dict(by_cat),
               top_kernels_ms=dict(sorted(top.items(), key=lambda kv: -kv[1])[:30]),
               top_kernels_calls={k: calls[k] for k in sorted(top, key=lambda k: -top[k])[:30]},
               # Every kernel, so two recipes' profiles can be compared kernel by kernel.
               kernels={k: dict(ms=top[k], calls=calls[k], category=category(k)) for k in top},
               # lowbit's kernels launch by launch shape (grid), to tell e.g. weight pairs from activations'.
               launches=launches, device=torch.cuda.get_device_name(), torch=torch.__version__)
    print(f"{args.model} {args.recipe} micro {args.micro}: wall {wall:.1f} ms/step, GPU {gpu:.1f} ms/step")
    for cat, t in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:>10} {t:8.2f} ms  {t / gpu:6.1%}")
    for k, t in res["top_kernels_ms"].items():
        print(f"    {t:8.2f} ms {calls[k]:6.0f} calls  {k[:80]}")
    for r in launches[:40]:
        print(f"    {r['ms']:8.3f} ms {r['calls']:5.0f} x {r['us_per_call']:7.1f} us {r['name']} {r['grid']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
