"""Group- and tile-scaled pairs (X and X^T from one read) against two single quantizes (GPU).

For each spec: the first call's time (compile included), bit-exactness against the reference on
ragged and large shapes, then CUDA-graph device time of the pair and of the two single quantizes it
replaces (the second reads X^T as a transposed view), and the pair's bytes as a fraction of a copy.

    python benchmarks/pair_groups_bw.py
    python benchmarks/pair_groups_bw.py --specs mxfp8 --shapes 8192x4096
    python benchmarks/pair_groups_bw.py --sweep --out $OUT/pair_sweep.json

--sweep times the pair kernel's launch knobs (lowbit.kernels._pair_quantize_triton: TRANSPOSED_DIV,
PAIR_STRIP_ROWS, PAIR_WARPS, and the tile) in one process: first TRANSPOSED_DIV (fp32 scales) at the
default tile and warps, then tiles x strips x warps (--sweep-tiles, --sweep-strips, --sweep-warps)
with the faster of the two. Every setting is checked bit for bit against the reference (ragged
shapes) and against the default setting's output (the large shapes).

Group and tile pairs can be turned off in training (LOWBIT_PAIR_GROUPS=0, see
lowbit.kernels.pair_quantize.GROUPS_ON_CUDA); this benchmark turns them on for itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantize_bw import _bench_graph, _nbytes, _same, _to_cpu  # noqa: E402

from lowbit.kernels import _pair_quantize_triton as pqt  # noqa: E402
from lowbit.kernels import pair_quantize as pq  # noqa: E402
from lowbit.kernels import quantize as kq  # noqa: E402
from lowbit.quant import QuantSpec, quantize  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Ragged cases checked against the reference before any timing.
_SMALL = [((200, 136), torch.float32), ((200, 136), torch.bfloat16), ((64, 256), torch.bfloat16),
          ((3, 40), torch.float32)]
SPECS = {
    "mxfp8": QuantSpec("fp8_e4m3", 32, "e8m0"),
    "fp8_1x64": QuantSpec("fp8_e4m3", 64),
    "fp8_1x128": QuantSpec("fp8_e4m3", 128),
    "fp8_tile128": QuantSpec("fp8_e4m3", (128, 128)),
}


def _run(name: str, spec: QuantSpec, shapes: list[tuple[int, int]], dtype: str) -> dict:
    out: dict = dict(spec=name)
    t0 = time.perf_counter()
    exact = True
    for i, (shape, small_dtype) in enumerate(_SMALL + [((8192, 4096), torch.bfloat16)]):
        g = torch.Generator().manual_seed(1)
        x = (torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[1])).to(small_dtype).cuda()
        q, q_t = pq.quantize_pair(x, spec, spec, seed=11, seed_t=22)
        if i == 0:
            torch.cuda.synchronize()
            out["first_call_s"] = round(time.perf_counter() - t0, 1)
        exact &= _same(quantize(x.cpu(), spec, seed=11), _to_cpu(q))
        exact &= _same(quantize(x.cpu().t(), spec, seed=22), _to_cpu(q_t))
    out["bitexact"] = bool(exact)
    for r, c in shapes:
        x = torch.randn(r, c, device="cuda", dtype=DTYPES[dtype])
        pair = _bench_graph(lambda x=x: pq.quantize_pair(x, spec, spec, seed=11, seed_t=22))
        two = _bench_graph(lambda x=x: (kq.quantize(x, spec, seed=11), kq.quantize(x.t(), spec, seed=22)))
        dst = torch.empty_like(x)
        copy_bw = 2 * x.numel() * x.element_size() / _bench_graph(lambda x=x, dst=dst: dst.copy_(x)) / 1e6
        q, q_t = pq.quantize_pair(x, spec, spec, seed=11, seed_t=22)
        nbytes = x.numel() * x.element_size() + _nbytes(q) + _nbytes(q_t)
        out[f"{r}x{c}"] = dict(pair_ms=round(pair, 4), two_single_ms=round(two, 4),
                               pair_frac_of_copy=round(nbytes / pair / 1e6 / copy_bw, 3),
                               speedup=round(two / pair, 3))
    return out


_TILES = [(32, 64), (64, 64), (32, 128), (64, 128), (128, 64), (128, 128), (64, 256), (256, 64)]


def _holds_groups(spec: QuantSpec, tile: tuple[int, int]) -> bool:
    # The tile holds whole groups both ways (a 2-D block is its own tile).
    if isinstance(spec.block, tuple):
        return tile == spec.block
    return min(tile) >= spec.block


def _setting(knobs: dict, fn):
    # fn() with the pair kernel's launch knobs set, restored afterwards.
    old = {k: getattr(pqt, k) for k in knobs}
    try:
        for k, v in knobs.items():
            setattr(pqt, k, v)
        return fn()
    finally:
        for k, v in old.items():
            setattr(pqt, k, v)


def _sweep(name: str, spec: QuantSpec, shapes: list[tuple[int, int]],
           tiles: list[tuple[int, int]] | None, warps_list: list[int], strips: list[int],
           dtype: str) -> dict:
    # One row per setting: bit-exactness and device time (CUDA graphs) per shape, fraction of a copy.
    small = []
    for shape, small_dtype in _SMALL:
        g = torch.Generator().manual_seed(1)
        x = (torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[1])).to(small_dtype)
        small.append((x.cuda(), quantize(x, spec, seed=11), quantize(x.t(), spec, seed=22)))
    big = [torch.randn(r, c, device="cuda", dtype=DTYPES[dtype]) for r, c in shapes]
    base = [pq.quantize_pair(x, spec, spec, seed=11, seed_t=22) for x in big]
    copy_bw = []
    for x in big:
        dst = torch.empty_like(x)
        ms = _bench_graph(lambda x=x, dst=dst: dst.copy_(x))
        copy_bw.append(2 * x.numel() * x.element_size() / ms / 1e6)

    def measure(knobs: dict, tile: tuple[int, int] | None) -> dict:
        def run() -> dict:
            row: dict = dict(knobs, tile=tile)
            exact = True
            for x, ref, ref_t in small:
                q, q_t = pq.quantize_pair(x, spec, spec, seed=11, seed_t=22, tile=tile)
                exact &= _same(ref, _to_cpu(q)) and _same(ref_t, _to_cpu(q_t))
            for x, (b, b_t), (r, c), bw in zip(big, base, shapes, copy_bw):
                q, q_t = pq.quantize_pair(x, spec, spec, seed=11, seed_t=22, tile=tile)
                exact &= _same(b, q) and _same(b_t, q_t)
                ms = _bench_graph(lambda x=x: pq.quantize_pair(x, spec, spec, seed=11, seed_t=22, tile=tile))
                nbytes = x.numel() * x.element_size() + _nbytes(q) + _nbytes(q_t)
                row[f"{r}x{c}"] = dict(ms=round(ms, 4), frac_of_copy=round(nbytes / ms / 1e6 / bw, 3))
            row["bitexact"] = bool(exact)
            return row
        return _setting(knobs, run)

    def total(row: dict) -> float:
        return sum(row[f"{r}x{c}"]["ms"] for r, c in shapes) if row["bitexact"] else float("inf")

    rows = []
    for div_t in (False, True) if spec.scale == "fp32" else (False,):
        rows.append(measure(dict(TRANSPOSED_DIV=div_t), None))
        print(json.dumps(dict(spec=name, **rows[-1])), flush=True)
    knobs = dict(TRANSPOSED_DIV=min(rows, key=total)["TRANSPOSED_DIV"])
    candidates = tiles or _TILES + ([spec.block] if isinstance(spec.block, tuple) else [])
    for tile in [t for t in candidates if _holds_groups(spec, t)]:
        for strip, warps in itertools.product(strips, warps_list):
            held = strip if 0 < strip < tile[0] else tile[0]  # rows in registers at a time
            if not 16 <= held * tile[1] // (32 * warps) <= 256 or (strip and strip >= tile[0]):
                continue  # elements per thread; strips only shorter than the tile
            rows.append(measure(dict(knobs, PAIR_STRIP_ROWS=strip, PAIR_WARPS=warps), tile))
            print(json.dumps(dict(spec=name, **rows[-1])), flush=True)
    return dict(spec=name, best=min(rows, key=total), rows=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default=",".join(SPECS), help=f"comma-separated, from {', '.join(SPECS)}")
    ap.add_argument("--shapes", default="8192x4096,8192x14336")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="the large shapes' dtype")
    ap.add_argument("--sweep", action="store_true", help="time the pair kernel's launch knobs")
    ap.add_argument("--sweep-tiles", default="", help="tiles to sweep, e.g. 32x128,32x256 (default: a set)")
    ap.add_argument("--sweep-warps", default="1,2,4,8,16", help="warps to sweep")
    ap.add_argument("--sweep-strips", default="0", help="PAIR_STRIP_ROWS values to sweep (0: whole tiles)")
    ap.add_argument("--out", default=None, help="write the sweep's rows here (JSON)")
    args = ap.parse_args()
    names = args.specs.split(",")
    bad = [n for n in names if n not in SPECS]
    if bad:
        raise SystemExit(f"pair_groups_bw: unknown spec {bad[0]!r}; valid choices: {', '.join(SPECS)}")
    if not torch.cuda.is_available():
        raise SystemExit("pair_groups_bw: needs a CUDA GPU")
    pq.GROUPS_ON_CUDA = True  # what this measures (whatever LOWBIT_PAIR_GROUPS says)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    results: list[dict] = []
    for name in names:
        reason = pq.why_not_pair(torch.empty(64, 64, device="cuda"), SPECS[name], SPECS[name])
        if reason is not None:
            raise SystemExit(f"pair_groups_bw: {name} does not pair: {reason}")
        if args.sweep:
            tiles = [tuple(int(v) for v in t.split("x")) for t in args.sweep_tiles.split(",") if t]
            warps = [int(w) for w in args.sweep_warps.split(",")]
            strips = [int(v) for v in args.sweep_strips.split(",")]
            results.append(_sweep(name, SPECS[name], shapes, tiles, warps, strips, args.dtype))
            if args.out:  # after each spec: a later one may not finish
                Path(args.out).write_text(json.dumps(results, indent=1))
            print(json.dumps(dict(best=results[-1]["best"])), flush=True)
        else:
            print(json.dumps(_run(name, SPECS[name], shapes, args.dtype)), flush=True)
    print(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))


if __name__ == "__main__":
    main()
