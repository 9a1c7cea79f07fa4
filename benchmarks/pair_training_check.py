"""Every pair quantization of a real training run checked against the two single quantizes (GPU).

The group and tile pairs (X and X^T from one read) replace two single quantizes. This trains
in-process with the pairs on and, at each eager pair call, also runs the two single quantizes it
replaces (X, and X^T as a transposed view) and compares the bytes (--repeat reruns each call, which
an intermittent fault would make differ). Calls made while a CUDA graph is captured, or on fake
tensors (tracing), are not checked: their numbers do not exist yet. The summary groups calls by
shape, dtype, strides and specs, with the number that differed; the training loss of every step
is printed by the trainer (log_every=1). Run 164 of docs/BENCHMARKS.md (twentieth pass, 1b mxfp8):
0 of 6,720 calls differed, and 20 eager steps gave the same losses with the pairs on and off.
Compiled CUDA-graph runs are not bit-reproducible (BF16 included), so compare those by more than
one run each.

    python benchmarks/pair_training_check.py --steps 3
    python benchmarks/pair_training_check.py --model 1b --recipe fp8_blockwise --micro 8 --steps 2
    python benchmarks/pair_training_check.py --pairs off --steps 20   # the same run without them
    python benchmarks/pair_training_check.py --compile off --steps 20 --repeat 0 --knob TRANSPOSED_DIV=0

By default the layers run as the graph ops that CUDA-graph training (train.compile_mode=
reduce_overhead) uses, here without the CUDA graphs, so that their bodies run eagerly and can be
checked; --graph-ops 0 runs them as eager layers instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowbit.kernels import pair_quantize as pq  # noqa: E402
from lowbit.kernels import quantize as kq  # noqa: E402


def _uncheckable(x: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(x) or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _bytes_differ(a, b) -> int:
    # Differing code bytes plus differing scales (NaN scales compare equal).
    da, db = a.data.view(torch.uint8), b.data.view(torch.uint8)
    n = int((da != db).sum()) if da.shape == db.shape else da.numel()
    sa, sb = torch.nan_to_num(a.scale.float()), torch.nan_to_num(b.scale.float())
    return n + (int((sa != sb).sum()) if sa.shape == sb.shape else sa.numel())


def install_check(stats: Counter, bad: Counter, repeat: int = 0) -> None:
    """Wrap the pair quantizer so that each eager call is compared with the two single quantizes,
    and with `repeat` more runs of itself on the same input (a race would make those differ)."""
    original = pq._quantize_supported_pair

    def checked(x, spec, spec_t, *, seed=0, seed_t=0, amax=None, tile=None, history=None):
        out = original(x, spec, spec_t, seed=seed, seed_t=seed_t, amax=amax, tile=tile, history=history)
        if history is not None or _uncheckable(x):  # a history is updated by the call itself
            return out
        key = (tuple(x.shape), str(x.dtype), tuple(x.stride()), str(spec), str(spec_t))
        stats[key] += 1
        single = kq.quantize(x, spec, seed=seed, amax=amax)
        single_t = kq.quantize(x.t(), spec_t, seed=seed_t, amax=amax)
        n = _bytes_differ(out[0], single) + _bytes_differ(out[1], single_t)
        for _ in range(repeat):
            again = original(x, spec, spec_t, seed=seed, seed_t=seed_t, amax=amax, tile=tile)
            n += _bytes_differ(out[0], again[0]) + _bytes_differ(out[1], again[1])
        if n:
            bad[key] += 1
            print(f"pair_training_check: {n} bytes differ, call {stats[key]} of {key}", flush=True)
        return out

    pq._quantize_supported_pair = checked


def set_knobs(settings: list[str]) -> None:
    """NAME=INT for module-level knobs of the pair kernel's launcher (the sweep's knobs)."""
    from lowbit.kernels import _pair_quantize_triton as pqt

    for item in settings:
        name, _, value = item.partition("=")
        if not hasattr(pqt, name) or not name.isupper() or not value.lstrip("-").isdigit():
            knobs = sorted(k for k in vars(pqt) if k.isupper() and isinstance(getattr(pqt, k), (bool, int)))
            raise SystemExit(f"pair_training_check: bad --knob {item!r}; NAME=INT with NAME one of {knobs}")
        old = getattr(pqt, name)
        setattr(pqt, name, type(old)(int(value)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b")
    ap.add_argument("--recipe", default="mxfp8")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--compile", choices=["off", "on"], default="on",
                    help="torch.compile (the graph ops run eagerly inside; no CUDA graphs here)")
    ap.add_argument("--pairs", choices=["on", "off"], default="on", help="the group and tile pairs")
    ap.add_argument("--graph-ops", choices=["opaque", "0"], default="opaque",
                    help="LOWBIT_GRAPH_OPS: the layers as the graph ops that CUDA-graph training runs "
                         "(opaque), or as eager layers (0)")
    ap.add_argument("--repeat", type=int, default=3, help="reruns of each checked pair call (races)")
    ap.add_argument("--knob", action="append", default=[], metavar="NAME=INT",
                    help="set a launch knob of lowbit.kernels._pair_quantize_triton (e.g. TRANSPOSED_DIV=1)")
    ap.add_argument("--out", default="/tmp/pair_training_check")
    ap.add_argument("overrides", nargs="*", help="more train.py overrides (key=value)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("pair_training_check: needs a CUDA GPU")

    os.environ["LOWBIT_GRAPH_OPS"] = args.graph_ops  # read when lowbit.nn is first imported (below)
    from hydra import compose, initialize_config_dir

    from lowbit.nn import quant_linear_graph
    from lowbit.trainer.config import register_configs
    from lowbit.trainer.run import run

    if quant_linear_graph.MODE != args.graph_ops:
        mode = quant_linear_graph.MODE
        raise SystemExit(f"pair_training_check: graph ops are {mode!r}, not {args.graph_ops!r}")

    pq.GROUPS_ON_CUDA = args.pairs == "on"
    set_knobs(args.knob)
    stats: Counter = Counter()
    bad: Counter = Counter()
    if args.pairs == "on":
        install_check(stats, bad, args.repeat)
    register_configs()
    overrides = [
        f"model={args.model}", f"quant={args.recipe}", f"train.steps={args.steps}",
        f"train.micro_batch_size={args.micro}", f"train.compile={str(args.compile == 'on').lower()}",
        f"train.warmup_steps={min(10, args.steps)}", "train.log_every=1", "train.eval_every=0",
        "checkpoint.enabled=false", "logger=console", "logger.progress=false", f"out_dir={args.out}",
        f"run_name={args.recipe}-pairs-{args.pairs}", "resume=none", *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    summary = run(cfg)
    print(json.dumps(dict(final_train_loss=summary.get("final_train_loss"), pairs=args.pairs,
                          checked_calls=sum(stats.values()), differing_calls=sum(bad.values()))))
    for key, n in stats.most_common():
        shape, dtype, strides, spec, spec_t = key
        print(f"{n:5d} calls, {bad[key]:5d} differ: {shape} {dtype} strides {strides} {spec} / {spec_t}")


if __name__ == "__main__":
    main()
