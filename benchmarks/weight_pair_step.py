"""The 1b fp8_delayed model's optimizer step with and without the weight pairs written in it (GPU).

Times, interleaved in one process (rounds of 10 steps, medians), on the 1b model's parameters
with random gradients and clipping at norm 1:
  - "before": torch's fused AdamW with the clipping factor folded in (grad_clip.clip_and_step),
    then every quantized weight's delayed fp8 pair as the next forward quantizes it
    (fp8_tensor_pair_delayed_direct: gate, pair kernel, roll; 112 weights);
  - "step": the same optimizer step alone, so before - step is what the forward's weight pairs cost;
  - "after": lowbit.trainer.weight_pair_step's step, which writes the pairs itself.

    python benchmarks/weight_pair_step.py --out $OUT/weight_pair_step.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.kernels import pair_quantize_op as po  # noqa: E402
from lowbit.nn.convert import convert_model  # noqa: E402
from lowbit.nn.llama import Llama, LlamaConfig  # noqa: E402
from lowbit.nn.quant_linear import QuantLinear  # noqa: E402
from lowbit.trainer.grad_clip import clip_and_step  # noqa: E402
from lowbit.trainer.weight_pair_step import W_ROW, WT_ROW, WeightPairStep  # noqa: E402


def _model(name: str) -> Llama:
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LlamaConfig),
                                              OmegaConf.load(root / f"configs/model/{name}.yaml")))
    model = Llama(cfg)
    convert_model(model, "fp8_delayed")
    return model.cuda()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    a, b = _model(args.model), _model(args.model)
    pa, pb = list(a.parameters()), list(b.parameters())
    for p, q in zip(pa, pb):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt_a = torch.optim.AdamW(pa, lr=1e-4, weight_decay=0.1, fused=True)
    opt_b = torch.optim.AdamW(pb, lr=1e-4, weight_decay=0.1, fused=True)
    wps = WeightPairStep(b, opt_b)
    layers = [m for m in a.modules() if isinstance(m, QuantLinear)]
    fmt = layers[0].recipe.fprop.b.fmt

    def step() -> None:
        clip_and_step(opt_a, pa, 1.0)

    def before() -> None:
        clip_and_step(opt_a, pa, 1.0)
        for m in layers:
            po.fp8_tensor_pair_delayed_direct(m.weight.detach(), fmt, m.amax_history[W_ROW],
                                              m.amax_history[WT_ROW])

    def after() -> None:
        wps.clip_and_step(pb, 1.0)

    runs = {"before": before, "step": step, "after": after}
    for f in runs.values():
        f()
        f()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, f in runs.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                f()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) / 10 * 1e3)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    n_w = sum(m.weight.numel() for m in layers)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, model=args.model,
               params=sum(p.numel() for p in pa), quantized_weights=n_w, layers=len(layers),
               weight_pairs=len(wps.layers),
               median_ms=med, all_ms=times, forward_weight_pairs_ms=med["before"] - med["step"],
               saved_ms=med["before"] - med["after"])
    for k in runs:
        print(f"{k:7s} {med[k]:7.2f} ms  ({' '.join(f'{x:.2f}' for x in times[k])})")
    print(f"the forward's weight pairs {res['forward_weight_pairs_ms']:.2f} ms; "
          f"saved {res['saved_ms']:.2f} ms a step")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
