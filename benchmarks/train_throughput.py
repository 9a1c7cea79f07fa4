"""End-to-end training throughput: tokens/s, MFU and peak memory of `train.py` per model/variant.

Each variant runs in its own process (a clean CUDA context and compile cache), on the default
stdlib corpus, with checkpoints off. Prints a markdown table and writes JSON.

    python benchmarks/train_throughput.py --models 125m,1b --compile off,on --steps 40 \
        --extra quant=bf16 --out results/throughput.json
    python benchmarks/train_throughput.py --models 1b --compile on --recipes bf16,fp8_tensorwise,mxfp8
    python benchmarks/train_throughput.py --models 1b --compile on --recipes fp8_delayed --nproc 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_variant(model: str, compile_: bool, args, out_dir: Path, recipe: str = "") -> dict:
    name = f"{model}-{'compile' if compile_ else 'eager'}" + (f"-{recipe}" if recipe else "")
    # --nproc > 1: torchrun on this machine's GPUs with DDP (tokens/s is the whole job's).
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.nproc}"]
    cmd = [
        *(launcher if args.nproc > 1 else [sys.executable]),
        str(ROOT / "train.py"),
        *(["dist=ddp"] if args.nproc > 1 else []),
        f"model={model}",
        f"train.compile={str(compile_).lower()}",
        f"train.steps={args.steps}",
        f"train.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.micro}",
        f"train.warmup_steps={min(10, args.steps)}",
        f"train.log_every={args.log_every}",
        "train.eval_every=0",
        "checkpoint.enabled=false",
        "logger=console",
        "logger.progress=false",
        f"out_dir={out_dir}",
        f"run_name={name}",
        "resume=none",
        *([f"quant={recipe}"] if recipe else []),
        *args.extra,
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": name, "error": (proc.stdout + proc.stderr)[-2000:]}
    s = json.loads((out_dir / name / "summary.json").read_text())
    return {
        "variant": name,
        "model": model,
        "compile": compile_,
        "params": s["params"],
        "tokens_per_s": s["tokens_per_s_steady"],
        "mfu": s["mfu"],
        "peak_mem_gib": s["peak_mem_bytes"] / 2**30,
        "final_train_loss": s["final_train_loss"],
        "wall_s": time.time() - t0,
        "recipe": recipe or None,
        "extra": args.extra,
        "nproc": args.nproc,
        "weight_pair_layers": s.get("weight_pair_layers"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="125m,1b")
    ap.add_argument("--compile", default="off,on", help="comma list of off/on")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--recipes", default="", help="comma list of quant recipes (one variant each)")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every variant")
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run; > 1 runs DDP")
    ap.add_argument("--out", type=Path, default=Path("throughput.json"))
    args = ap.parse_args()
    if args.nproc < 1:
        raise SystemExit(f"--nproc: {args.nproc} is not valid (1 or more)")
    for c in args.compile.split(","):
        if c not in ("on", "off"):
            raise SystemExit(f"--compile: {c!r} is not valid (valid choices: on, off)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for c in args.compile.split(","):
                for recipe in args.recipes.split(","):
                    row = run_variant(model, c == "on", args, Path(tmp), recipe)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "argv": sys.argv, "env": _env()}, indent=1))
    base = {
        (r["model"], r["compile"]): r["tokens_per_s"]
        for r in rows
        if "error" not in r and r.get("recipe") in (None, "bf16")
    }
    print("\n| variant | params | tokens/s | × bf16 | MFU | peak memory |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error'][-200:]!r} | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        b = base.get((r["model"], r["compile"]))
        ratio = f"{r['tokens_per_s'] / b:.2f}×" if b else "–"
        print(
            f"| {r['variant']} | {r['params'] / 1e6:.0f}M | {r['tokens_per_s']:,.0f} | {ratio} | {mfu} | "
            f"{r['peak_mem_gib']:.1f} GiB |"
        )


def _env() -> dict:
    import torch

    env = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    env["cmd"] = " ".join(sys.argv)
    env["cwd"] = os.getcwd()
    return env


if __name__ == "__main__":
    main()
