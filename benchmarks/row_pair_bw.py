"""Row-scaled pairs (fp8_rowwise's and int8's X and X^T) against the two single quantizes they
replace, on CUDA (GPU only).

The pair reads X twice (pass 1: row and column amaxes; pass 2: both sides' codes); the single
path quantizes X, copies X^T row-major (lowbit.kernels.transpose) and quantizes that. For each
spec and shape: bit-exactness against the reference (ragged shapes) and against the single path
(the large shapes), CUDA-graph device time of both, and the pair's bytes as a fraction of a plain
copy in the same run, counted two ways: the bytes a one-read quantizer would move (X once, both
codes and scales), and those the two passes move (X twice).

    python benchmarks/row_pair_bw.py
    python benchmarks/row_pair_bw.py --sweep --specs fp8_row

--sweep times the launch knobs of lowbit.kernels._row_pair_triton (pass 1's block and row blocks
a program, pass 2's tile and warps) on the first spec, each setting checked bit for bit against
the default's output.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantize_bw import _bench_graph, _nbytes, _same, _to_cpu  # noqa: E402

from lowbit.kernels import _row_pair_triton as rpt  # noqa: E402
from lowbit.kernels import pair_quantize as pq  # noqa: E402
from lowbit.kernels import quantize as kq  # noqa: E402
from lowbit.quant import QuantSpec, quantize  # noqa: E402

SPECS = {
    "fp8_row": (QuantSpec("fp8_e4m3", "row"), QuantSpec("fp8_e4m3", "row")),
    "e5m2_row_sr": (QuantSpec("fp8_e5m2", "row", rounding="stochastic"), QuantSpec("fp8_e5m2", "row")),
    "int8_row": (QuantSpec("int8", "row"), QuantSpec("int8", "row")),
}
# The 1b model's X and dY (16384 tokens; hidden 2048, feed-forward 8192) and Llama-3-8B's X.
SHAPES = [(16384, 2048), (16384, 8192), (8192, 4096), (8192, 14336)]
_SMALL = [((200, 136), torch.float32), ((130, 300), torch.bfloat16), ((1, 33), torch.bfloat16)]


def _pair(x: torch.Tensor, spec: QuantSpec, spec_t: QuantSpec):
    return pq.quantize_pair(x, spec, spec_t, seed=11, seed_t=22)


def _single(x: torch.Tensor, spec: QuantSpec, spec_t: QuantSpec):
    return kq.quantize(x, spec, seed=11), kq.quantize(x.t(), spec_t, seed=22)


def _exact_small(spec: QuantSpec, spec_t: QuantSpec) -> bool:
    ok = True
    for shape, dtype in _SMALL:
        g = torch.Generator().manual_seed(1)
        x = (torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[1])).to(dtype)
        q, q_t = _pair(x.cuda(), spec, spec_t)
        ok &= _same(quantize(x, spec, seed=11), _to_cpu(q))
        ok &= _same(quantize(x.t(), spec_t, seed=22), _to_cpu(q_t))
    return bool(ok)


def _run(name: str, shapes: list[tuple[int, int]]) -> dict:
    spec, spec_t = SPECS[name]
    out: dict = dict(spec=name, bitexact_small=_exact_small(spec, spec_t))
    for r, c in shapes:
        x = torch.randn(r, c, device="cuda", dtype=torch.bfloat16)
        (q, q_t), (s, s_t) = _pair(x, spec, spec_t), _single(x, spec, spec_t)
        exact = _same(s, q) and _same(s_t, q_t)
        pair = _bench_graph(lambda x=x: _pair(x, spec, spec_t))
        single = _bench_graph(lambda x=x: _single(x, spec, spec_t))
        dst = torch.empty_like(x)
        copy_bw = 2 * x.numel() * 2 / _bench_graph(lambda x=x, dst=dst: dst.copy_(x)) / 1e6
        once = x.numel() * 2 + _nbytes(q) + _nbytes(q_t)
        out[f"{r}x{c}"] = dict(
            bitexact=bool(exact), pair_ms=round(pair, 4), single_ms=round(single, 4),
            speedup=round(single / pair, 3), frac_of_copy_one_read=round(once / pair / 1e6 / copy_bw, 3),
            frac_of_copy_two_reads=round((once + x.numel() * 2) / pair / 1e6 / copy_bw, 3),
        )
    return out


def _sweep(name: str, shapes: list[tuple[int, int]]) -> dict:
    spec, spec_t = SPECS[name]
    big = [torch.randn(r, c, device="cuda", dtype=torch.bfloat16) for r, c in shapes]
    base = [_pair(x, spec, spec_t) for x in big]
    knobs = ("AMAX_TILE", "AMAX_ITERS_MAX", "AMAX_WARPS", "PAIR_TILE", "PAIR_WARPS")
    default = {k: getattr(rpt, k) for k in knobs}

    def measure(setting: dict) -> dict:
        try:
            for k, v in setting.items():
                setattr(rpt, k, v)
            row: dict = dict(setting, bitexact=_exact_small(spec, spec_t))
            for x, (b, b_t), (r, c) in zip(big, base, shapes):
                q, q_t = _pair(x, spec, spec_t)
                row["bitexact"] &= bool(_same(b, q) and _same(b_t, q_t))
                row[f"{r}x{c}"] = round(_bench_graph(lambda x=x: _pair(x, spec, spec_t)), 4)
            return row
        finally:
            for k, v in default.items():
                setattr(rpt, k, v)

    rows = []
    amax = itertools.product([(32, 256), (16, 512), (64, 128), (8, 1024)], [1, 4, 8, 16], [4, 8])
    for tile, iters, warps in amax:
        rows.append(measure(dict(AMAX_TILE=tile, AMAX_ITERS_MAX=iters, AMAX_WARPS=warps)))
        print(json.dumps(rows[-1]), flush=True)

    def total(row: dict) -> float:
        return sum(row[f"{r}x{c}"] for r, c in shapes) if row["bitexact"] else float("inf")

    best = {k: min(rows, key=total)[k] for k in ("AMAX_TILE", "AMAX_ITERS_MAX", "AMAX_WARPS")}
    for tile, warps in itertools.product([(64, 64), (32, 128), (64, 128), (128, 64), (128, 128)], [2, 4, 8]):
        rows.append(measure(dict(best, PAIR_TILE=tile, PAIR_WARPS=warps)))
        print(json.dumps(rows[-1]), flush=True)
    return dict(spec=name, default=default, best=min(rows, key=total))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default=",".join(SPECS), help=f"comma-separated, from {', '.join(SPECS)}")
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES))
    ap.add_argument("--sweep", action="store_true", help="time the launch knobs on the first spec")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("row_pair_bw.py times CUDA kernels: no CUDA device")
    names = args.specs.split(",")
    for n in names:
        if n not in SPECS:
            raise SystemExit(f"unknown spec {n!r}; valid choices: {', '.join(SPECS)}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.sweep:
        print(json.dumps(_sweep(names[0], shapes)), flush=True)
        return
    for n in names:
        print(json.dumps(_run(n, shapes)), flush=True)


if __name__ == "__main__":
    main()
