"""Group- and tile-scaled pairs (X and X^T from one read) against two single quantizes (GPU).

For each spec: the first call's time (compile included), bit-exactness against the reference on
ragged and large shapes, then CUDA-graph device time of the pair and of the two single quantizes it
replaces (the second reads X^T as a transposed view), and the pair's bytes as a fraction of a copy.

    python benchmarks/pair_groups_bw.py
    python benchmarks/pair_groups_bw.py --specs mxfp8 --shapes 8192x4096
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantize_bw import _bench_graph, _nbytes, _same, _to_cpu  # noqa: E402

from lowbit.kernels import pair_quantize as pq  # noqa: E402
from lowbit.kernels import quantize as kq  # noqa: E402
from lowbit.quant import QuantSpec, quantize  # noqa: E402

SPECS = {
    "mxfp8": QuantSpec("fp8_e4m3", 32, "e8m0"),
    "fp8_1x64": QuantSpec("fp8_e4m3", 64),
    "fp8_1x128": QuantSpec("fp8_e4m3", 128),
    "fp8_tile128": QuantSpec("fp8_e4m3", (128, 128)),
}


def _run(name: str, spec: QuantSpec, shapes: list[tuple[int, int]]) -> dict:
    out: dict = dict(spec=name)
    t0 = time.perf_counter()
    exact = True
    for i, (shape, dtype) in enumerate([((200, 136), torch.float32), ((200, 136), torch.bfloat16),
                                        ((64, 256), torch.bfloat16), ((3, 40), torch.float32),
                                        ((8192, 4096), torch.bfloat16)]):
        g = torch.Generator().manual_seed(1)
        x = (torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[1])).to(dtype).cuda()
        q, q_t = pq.quantize_pair(x, spec, spec, seed=11, seed_t=22)
        if i == 0:
            torch.cuda.synchronize()
            out["first_call_s"] = round(time.perf_counter() - t0, 1)
        exact &= _same(quantize(x.cpu(), spec, seed=11), _to_cpu(q))
        exact &= _same(quantize(x.cpu().t(), spec, seed=22), _to_cpu(q_t))
    out["bitexact"] = bool(exact)
    for r, c in shapes:
        x = torch.randn(r, c, device="cuda", dtype=torch.bfloat16)
        pair = _bench_graph(lambda x=x: pq.quantize_pair(x, spec, spec, seed=11, seed_t=22))
        two = _bench_graph(lambda x=x: (kq.quantize(x, spec, seed=11), kq.quantize(x.t(), spec, seed=22)))
        dst = torch.empty_like(x)
        copy_bw = 4 * x.numel() / _bench_graph(lambda x=x, dst=dst: dst.copy_(x)) / 1e6
        q, q_t = pq.quantize_pair(x, spec, spec, seed=11, seed_t=22)
        nbytes = 2 * x.numel() + _nbytes(q) + _nbytes(q_t)
        out[f"{r}x{c}"] = dict(pair_ms=round(pair, 4), two_single_ms=round(two, 4),
                               pair_frac_of_copy=round(nbytes / pair / 1e6 / copy_bw, 3),
                               speedup=round(two / pair, 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default=",".join(SPECS), help=f"comma-separated, from {', '.join(SPECS)}")
    ap.add_argument("--shapes", default="8192x4096,8192x14336")
    args = ap.parse_args()
    names = args.specs.split(",")
    bad = [n for n in names if n not in SPECS]
    if bad:
        raise SystemExit(f"pair_groups_bw: unknown spec {bad[0]!r}; valid choices: {', '.join(SPECS)}")
    if not torch.cuda.is_available():
        raise SystemExit("pair_groups_bw: needs a CUDA GPU")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for name in names:
        if pq.why_not_pair(torch.empty(64, 64, device="cuda"), SPECS[name], SPECS[name]) is not None:
            raise SystemExit(f"pair_groups_bw: {name} pairs are off (LOWBIT_PAIR_GROUPS=0?)")
        print(json.dumps(_run(name, SPECS[name], shapes)), flush=True)
    print(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))


if __name__ == "__main__":
    main()
