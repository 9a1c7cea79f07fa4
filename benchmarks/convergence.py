"""Convergence table: the same model, seed and tokens trained under several variants.

Each variant is a label plus Hydra overrides for train.py, run in its own process; the first one is
the baseline the others are compared with. Writes <out>/convergence.md (table), convergence.json
(everything, curves included) and convergence.png (loss curves; skipped without matplotlib).

    python benchmarks/convergence.py --recipes bf16,fp8_tensorwise,mxfp8,mxfp4,nvfp4,int4,int4_hq \
        --ablations --set train.steps=300
    python benchmarks/convergence.py --optims adamw,adamw8bit,adamw4bit --set train.steps=300
    python benchmarks/convergence.py --variant "bf16:" --variant "big_lr:optim.lr=1e-2"

--recipes r1,r2  adds variants quant=<r> (labels = recipe names)
--ablations      adds mxfp4 without Hadamard / without SR / without both, nvfp4 without Hadamard
--optims o1,o2   adds variants optim=<o> (labels = optimizer config names)
--variant L:OV   adds a variant labelled L with space-separated overrides OV (repeatable)
--seeds s1,s2    runs every variant once per train.seed and reports mean ± std over seeds
                 (seed-to-seed spread is the noise floor the gaps must be read against)
--set OV         overrides applied to every variant (repeatable)
--jobs N         runs N variants at once (small models leave a GPU mostly idle)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS_PER_JOB = 1  # CPU threads each training process may use (cores / jobs)

ABLATIONS = [
    ("mxfp4_no_hadamard", ["quant=mxfp4", "quant.hadamard=[]"]),
    ("mxfp4_no_sr", ["quant=mxfp4", "quant.stochastic_rounding=[]"]),
    ("mxfp4_no_hadamard_no_sr", ["quant=mxfp4", "quant.hadamard=[]", "quant.stochastic_rounding=[]"]),
    ("nvfp4_no_hadamard", ["quant=nvfp4", "quant.hadamard=[]"]),
]
# Largest final-val-loss gap vs bf16 (%) the literature leads us to expect (the issue's targets).
TARGET_GAP_PCT = {
    "fp8_tensorwise": 0.3,
    "fp8_delayed": 0.3,
    "fp8_rowwise": 0.3,
    "fp8_blockwise": 0.3,
    "mxfp8": 0.5,
    "nvfp4": 1.5,
    "mxfp4": 2.0,
    "int4_hq": 3.0,
}


def build_variants(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    variants: list[tuple[str, list[str]]] = []
    for r in filter(None, (args.recipes or "").split(",")):
        variants.append((r, [f"quant={r}"]))
    if args.ablations:
        variants += ABLATIONS
    for o in filter(None, (args.optims or "").split(",")):
        variants.append((o, [f"optim={o}"]))
    for v in args.variant or []:
        label, _, ov = v.partition(":")
        variants.append((label.strip(), shlex.split(ov)))
    labels = [v[0] for v in variants]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise SystemExit(f"duplicate variant labels: {sorted(dup)}")
    if not variants:
        raise SystemExit("no variants: give --recipes, --optims, --ablations or --variant")
    return variants


def run_variant(
    label: str, overrides: list[str], common: list[str], out: Path, timeout: int, seed: int | None = None
) -> dict:
    run_dir = out / label
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run, never a resume of an older one
    cmd = [sys.executable, "train.py", *common, *overrides]
    if seed is not None:
        cmd.append(f"train.seed={seed}")
    cmd += [f"run_name={label}", f"out_dir={out}", "logger=console", "logger.progress=false", "resume=none"]
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(THREADS_PER_JOB))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, log = -1, f"timed out after {timeout}s\n{e.stdout or ''}{e.stderr or ''}"
    (out / f"{label}.log").write_text(log if isinstance(log, str) else str(log))
    res = {"label": label, "overrides": overrides, "seed": seed, "command": shlex.join(cmd)}
    res["wall_s"] = time.time() - t0
    summary = run_dir / "summary.json"
    if rc == 0 and summary.exists():
        res.update(json.loads(summary.read_text()), status="ok")
    else:
        tail = "\n".join(log.strip().splitlines()[-8:]) if isinstance(log, str) else ""
        res.update(status=f"failed (rc={rc})", error=tail)
    print(
        f"[{label}] {res['status']} in {res['wall_s']:.0f}s "
        f"final_val_loss={res.get('final_val_loss', float('nan')):.4f}",
        flush=True,
    )
    return res


def gap_pct(loss: float | None, base: float | None) -> float | None:
    if loss is None or base is None or base == 0:
        return None
    return 100.0 * (loss - base) / base


def aggregate(label: str, overrides: list[str], runs: list[dict]) -> dict:
    """One variant's row from its runs (one per seed): means over the runs that finished."""
    ok = [r for r in runs if r["status"] == "ok"]
    res: dict = {"label": label, "overrides": overrides, "runs": runs, "seeds": [r.get("seed") for r in runs]}
    res["status"] = "ok" if len(ok) == len(runs) else f"{len(ok)}/{len(runs)} ok"
    if not ok:
        res["status"] = runs[0]["status"] if len(runs) == 1 else res["status"]
        return res
    mean = lambda key: sum(r[key] for r in ok) / len(ok)  # noqa: E731
    losses = [r["final_val_loss"] for r in ok]
    res.update(
        final_val_loss=mean("final_val_loss"),
        val_ppl=mean("val_ppl"),
        tokens_per_s=mean("tokens_per_s"),
        peak_mem_bytes=max(r["peak_mem_bytes"] for r in ok),
        per_seed_final_val_loss=losses,
        train_losses=ok[0].get("train_losses"),
        val_losses=ok[0].get("val_losses"),
    )
    if len(losses) > 1:
        m = res["final_val_loss"]
        res["final_val_loss_std"] = (sum((v - m) ** 2 for v in losses) / (len(losses) - 1)) ** 0.5
    return res


def table(results: list[dict]) -> str:
    base = results[0].get("final_val_loss")
    lines = [
        f"| variant | overrides | final val loss | gap vs {results[0]['label']} | target | val ppl | "
        "tokens/s | peak mem (MiB) | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        loss = r.get("final_val_loss")
        g = gap_pct(loss, base)
        target = TARGET_GAP_PCT.get(r["label"])
        verdict = "" if target is None or g is None else f"≤ {target}% ({'met' if g <= target else 'missed'})"
        fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
        mem = r.get("peak_mem_bytes")
        loss_s = fmt(loss, ".4f")
        if r.get("final_val_loss_std") is not None:
            loss_s += f" ± {r['final_val_loss_std']:.4f} ({len(r['per_seed_final_val_loss'])} seeds)"
        lines.append(
            f"| {r['label']} | `{' '.join(r['overrides'])}` | {loss_s} | "
            f"{'—' if g is None else f'{g:+.2f}%'} | {verdict} | {fmt(r.get('val_ppl'), '.2f')} | "
            f"{fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(None if mem is None else mem / 2**20, '.0f')} | "
            f"{r['status']} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path, quiet: bool = False) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not quiet:
            print("matplotlib is not installed: skipping the loss-curve PNG")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab20").colors  # up to 20 distinguishable variants
    for ax in (ax1, ax2):
        ax.set_prop_cycle(color=colors)
    for r in results:
        tl = r.get("train_losses") or []
        if tl:
            steps, losses = zip(*tl)
            k = max(1, len(losses) // 50)  # moving average so the curves stay readable
            sm = [
                sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
                for i in range(len(losses))
            ]
            ax1.plot(steps, sm, label=r["label"], lw=1)
        vl = r.get("val_losses") or []
        if vl:
            s, v = zip(*vl)
            ax2.plot(s, v, marker="o", ms=3, label=r["label"], lw=1)
    ax1.set(title="train loss (moving average)", xlabel="step", ylabel="loss")
    ax2.set(title="validation loss", xlabel="step", ylabel="loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results: list[dict], common: list[str], out: Path) -> None:
    (out / "convergence.md").write_text(table(results) + "\n")
    meta = {"common_overrides": common, "argv": sys.argv, "results": results}
    (out / "convergence.json").write_text(json.dumps(meta, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="")
    p.add_argument("--ablations", action="store_true")
    p.add_argument("--optims", default="")
    p.add_argument("--variant", action="append")
    p.add_argument("--seeds", default="", help="comma-separated train.seed values (default: the config's)")
    p.add_argument("--set", action="append", default=[], help="overrides for every variant")
    p.add_argument("--out", default="runs/convergence")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per variant")
    args = p.parse_args(argv)
    global THREADS_PER_JOB
    THREADS_PER_JOB = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    variants = build_variants(args)
    common = [ov for s in args.set for ov in shlex.split(s)]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds: list[int | None] = [int(x) for x in args.seeds.split(",") if x.strip()] or [None]
    jobs = [
        (lbl, ov, seed, lbl if seed is None else f"{lbl}_s{seed}") for lbl, ov in variants for seed in seeds
    ]
    done: dict[str, dict] = {}
    lock = threading.Lock()

    def rows() -> list[dict]:
        out_rows = []
        for lbl, ov in variants:
            runs = [done[name] for l2, _, _, name in jobs if l2 == lbl and name in done]
            if runs:
                out_rows.append(aggregate(lbl, ov, runs))
        return out_rows

    def finished(res: dict) -> dict:
        # Rewrite table, JSON and picture after every run: a benchmark cut short keeps its results.
        with lock:
            done[res["run_name"]] = res
            partial = rows()
            write(partial, common, out)
            plot(partial, out / "convergence.png", quiet=True)
        return res

    def one(lbl: str, ov: list[str], seed: int | None, name: str) -> dict:
        res = run_variant(name, ov, common, out, args.timeout, seed)
        res["run_name"], res["label"] = name, lbl
        return finished(res)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for f in [pool.submit(one, *job) for job in jobs]:
            f.result()
    results = rows()
    write(results, common, out)
    print(table(results))
    if plot(results, out / "convergence.png"):
        print(f"wrote {out / 'convergence.png'}")
    print(f"wrote {out / 'convergence.md'} and {out / 'convergence.json'}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
