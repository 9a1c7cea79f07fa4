"""Fused quantize kernel throughput vs a device-to-device copy measured in the same run (GPU).

Bytes counted = input read once + quantized data and scales written once (the minimum any
implementation must move); throughput = bytes / median time (triton.testing.do_bench). The
baseline is `dst.copy_(src)` of a bf16 tensor of the same shape (read + write). Also times the
eager PyTorch reference (lowbit.quant.quantize) and checks on every case that the kernel's bytes
equal the reference's, computed on the CPU (NaN sign aside).

    python benchmarks/quantize_bw.py --out $OUT/quantize_bw.json
    python benchmarks/quantize_bw.py --hadamard 32 --specs mxfp4_sr,int4_row --graph
    python benchmarks/quantize_bw.py --ab FAST_DIVISION --specs nvfp4,int8_row --pair

--ab KNOB times each case (and its pair, with --pair) in CUDA graphs with the boolean launch knob
KNOB of lowbit.kernels._quantize_triton (or of the pair kernel's _pair_quantize_triton) off and
on, alternating three times in one process (this host's timings drift between processes), and
reports the median device time of each;
--ab "KNOB=A;B" does the same for two values of any knob (Python literals, e.g. "ROW_WARPS=(8,4);(8,8)").

--hadamard B times the rotate-and-quantize kernel (lowbit.kernels.hadamard.rotate_quantize, blocks
of B, random signs) against two unfused forms: the Triton rotation writing fp32 then the quantize
kernel ("2-pass"), and the fp32 matmul rotation that lowbit used before ("matmul", not bit-exact
with today's reference, which sums in the butterfly's order). Bytes as above: the input once and
the outputs once.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lowbit.kernels import quantize as kq
from lowbit.kernels.pair_quantize import quantize_pair, tensor_amax, why_not_pair
from lowbit.quant import QuantSpec, quantize

SPECS = {
    "mxfp8": QuantSpec("fp8_e4m3", 32, "e8m0"),
    "mxfp4": QuantSpec("fp4_e2m1", 32, "e8m0"),
    "mxfp4_sr": QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic"),
    "nvfp4": QuantSpec("fp4_e2m1", 16, "e4m3"),
    "nvfp4_w16x16": QuantSpec("fp4_e2m1", (16, 16), "e4m3"),
    "fp8_1x128": QuantSpec("fp8_e4m3", 128),
    "fp8_128x128": QuantSpec("fp8_e4m3", (128, 128)),
    "fp8_tensor": QuantSpec("fp8_e4m3"),
    "fp8_row": QuantSpec("fp8_e4m3", "row"),
    "int8_row": QuantSpec("int8", "row"),
    "int4_row": QuantSpec("int4", "row"),
    "int4_g32": QuantSpec("int4", 32),
}


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _bench_graph(fn, calls: int = 20) -> float:
    """Device time of one call: `calls` calls captured in one CUDA graph, replayed. Eager timing
    of an 8192 x 4096 quantize is bound by the ~50-70 us of Python and launch work per call (the
    kernel itself takes less), so this separates the kernel's speed from the host's."""
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return float(do_bench(graph.replay, warmup=5, rep=100, return_mode="median")) / calls


def _nbytes(q) -> int:
    n = q.data.numel() * q.data.element_size() + q.scale.numel() * 4
    return n + (4 if q.tensor_scale is not None else 0)


def _to_cpu(q):
    import dataclasses

    ts = q.tensor_scale.cpu() if q.tensor_scale is not None else None
    return dataclasses.replace(q, data=q.data.cpu(), scale=q.scale.cpu(), tensor_scale=ts)


def _same(a, b) -> bool:
    da, db = a.data.view(torch.uint8), b.data.view(torch.uint8)
    if a.data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        nan = torch.isnan(a.data.float())
        da, db = da[~nan], db[~nan]
    same_scale = torch.equal(torch.nan_to_num(a.scale), torch.nan_to_num(b.scale))
    return bool(torch.equal(da, db)) and bool(same_scale)


def _pair_rows(x, shape: str, name: str, spec, copy_bw: float, tiles: str) -> list[dict]:
    # X and X^T quantized from one read (tensor scaling includes its amax pass); bytes = the input
    # once + both outputs, as `transposed` counts one output.
    from lowbit.kernels import pair_quantize as pq

    out = []
    ref = quantize(x.cpu(), spec, seed=1), quantize(x.cpu().t(), spec, seed=2)
    for tile in tiles.split(","):
        pq.PAIR_TILE = int(tile)
        q, q_t = quantize_pair(x, spec, spec, seed=1, seed_t=2)
        ok = _same(ref[0], _to_cpu(q)) and _same(ref[1], _to_cpu(q_t))
        t = _bench(lambda: quantize_pair(x, spec, spec, seed=1, seed_t=2))
        nbytes = x.numel() * 2 + _nbytes(q) + _nbytes(q_t)
        row = dict(shape=shape, spec=f"{name} pair t{tile}", transposed=True, ms=t, GBps=nbytes / t / 1e6,
                   copy_GBps=copy_bw, frac_of_copy=nbytes / t / 1e6 / copy_bw, bitexact=ok)
        out.append(row)
        print(json.dumps(row), flush=True)
        if spec.block == "tensor":  # the pair pass alone, its amax given (as the traced layer does)
            amax = tensor_amax(x)
            t = _bench(lambda a=amax: quantize_pair(x, spec, spec, seed=1, seed_t=2, amax=a))
            row = dict(row, spec=f"{name} pair t{tile} amax given", ms=t, GBps=nbytes / t / 1e6,
                       frac_of_copy=nbytes / t / 1e6 / copy_bw)
            out.append(row)
            print(json.dumps(row), flush=True)
    pq.PAIR_TILE = 64
    return out


def _hadamard_rows(
    x, shape: str, name: str, spec, block: int, copy_bw: float, copy_graph_bw: float
) -> list[dict]:
    from lowbit.kernels.hadamard import hadamard_rotate, rotate_quantize
    from lowbit.quant import hadamard_matrix, random_signs
    from lowbit.quant import hadamard_rotate as reference_rotate

    signs = random_signs(block, 7, x.device)
    h = hadamard_matrix(block, x.device)

    def matmul_rotation():  # lowbit's rotation before the fused kernel: an fp32 batched matmul
        return kq.quantize(((x.float().unflatten(-1, (-1, block)) * signs) @ h).flatten(-2), spec, seed=1)

    variants = {
        "fused": lambda: rotate_quantize(x, spec, block, 7, seed=1),
        "2-pass": lambda: kq.quantize(hadamard_rotate(x, block, 7), spec, seed=1),
        "matmul": matmul_rotation,
    }
    q = variants["fused"]()
    ref = quantize(reference_rotate(x.cpu().float(), block, signs.cpu()), spec, seed=1)
    ok = _same(ref, _to_cpu(q))
    nbytes = x.numel() * 2 + _nbytes(q)
    out = []
    for variant, fn in variants.items():
        t = _bench(fn)
        row = dict(shape=shape, spec=f"{name} H{block} {variant}", transposed=False, ms=t,
                   GBps=nbytes / t / 1e6, copy_GBps=copy_bw, frac_of_copy=nbytes / t / 1e6 / copy_bw,
                   bitexact=ok if variant == "fused" else _same(ref, _to_cpu(fn())))
        if copy_graph_bw:
            t_g = _bench_graph(fn)
            row["graph_ms"], row["graph_frac_of_copy"] = t_g, nbytes / t_g / 1e6 / copy_graph_bw
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def _knob_module(knob: str):
    """The module whose launch knob `knob` is: lowbit.kernels._quantize_triton or the pair kernel's."""
    from lowbit.kernels import _pair_quantize_triton as pqt
    from lowbit.kernels import _quantize_triton as kt

    for mod in (kt, pqt):
        if knob.isupper() and hasattr(mod, knob):
            return mod
    raise SystemExit(f"--ab: {knob!r} is not a launch knob of lowbit.kernels._quantize_triton "
                     "or lowbit.kernels._pair_quantize_triton")


def _ab_values(ab: str) -> tuple[str, tuple]:
    """--ab's knob name and its two values (False, True for a bare boolean knob)."""
    import ast

    knob, _, values = ab.partition("=")
    kt = _knob_module(knob)
    if not values:
        if not isinstance(getattr(kt, knob), bool):
            raise SystemExit(f"--ab: {knob} is not boolean; give two values, e.g. --ab \"{knob}=A;B\"")
        return knob, (False, True)
    parts = values.split(";")
    if len(parts) != 2:
        raise SystemExit(f"--ab: give exactly two values separated by ';', got {values!r}")
    return knob, tuple(ast.literal_eval(v) for v in parts)


def _ab_rows(x, shape: str, name: str, spec, ab: str, pair: bool, copy_graph_bw: float,
             hadamard: int = 0) -> list[dict]:
    # Device time (CUDA graphs) with the launch knob at its two values (a, b), interleaved: three
    # rounds, medians. hadamard: the fused rotate-and-quantize kernel with blocks of this size.
    knob, values = _ab_values(ab)
    kt = _knob_module(knob)
    if hadamard:
        from lowbit.kernels.hadamard import rotate_quantize
        from lowbit.quant import hadamard_rotate as reference_rotate
        from lowbit.quant import random_signs

        signs = random_signs(hadamard, 7, x.device)
        ref = quantize(reference_rotate(x.cpu().float(), hadamard, signs.cpu()), spec, seed=1)
        cases = {f"{name} H{hadamard} fused": (lambda: rotate_quantize(x, spec, hadamard, 7, seed=1), False)}
        return _ab_time(cases, ref, None, knob, values, kt, x, shape, copy_graph_bw)
    cases = {name: (lambda: kq.quantize(x, spec, seed=1), False)}
    if spec.block == "tensor":  # the amax given (as delayed scaling gives it): its own value
        a = tensor_amax(x)
        cases[f"{name} amax given"] = (lambda: kq.quantize(x, spec, seed=1, amax=a), False)
    if pair and why_not_pair(x, spec, spec) is None:
        cases[f"{name} pair"] = (lambda: quantize_pair(x, spec, spec, seed=1, seed_t=2), True)
        if spec.block == "tensor":
            cases[f"{name} pair amax given"] = (
                lambda: quantize_pair(x, spec, spec, seed=1, seed_t=2, amax=a), True)
    ref = quantize(x.cpu(), spec, seed=1)
    ref_t = quantize(x.cpu().t(), spec, seed=2)
    return _ab_time(cases, ref, ref_t, knob, values, kt, x, shape, copy_graph_bw)


def _ab_time(cases: dict, ref, ref_t, knob: str, values: tuple, kt, x, shape: str,
             copy_graph_bw: float) -> list[dict]:
    # _ab_rows' timing of each case against the references (ref_t: a pair's transposed side).
    import statistics

    default, out = getattr(kt, knob), []
    try:
        for case, (fn, is_pair) in cases.items():
            times: dict[int, list[float]] = {0: [], 1: []}
            exact = True
            for _ in range(3):
                for on in (0, 1):
                    setattr(kt, knob, values[on])
                    got = fn()
                    if is_pair:
                        exact &= _same(ref, _to_cpu(got[0])) and _same(ref_t, _to_cpu(got[1]))
                    else:
                        exact &= _same(ref, _to_cpu(got))
                    times[on].append(_bench_graph(fn))
            got = fn()
            nbytes = x.numel() * 2 + (_nbytes(got[0]) + _nbytes(got[1]) if is_pair else _nbytes(got))
            off, on = statistics.median(times[0]), statistics.median(times[1])
            row = dict(shape=shape, spec=case, knob=knob, a=repr(values[0]), b=repr(values[1]),
                       off_ms=off, on_ms=on, speedup=off / on,
                       off_frac=nbytes / off / 1e6 / copy_graph_bw, on_frac=nbytes / on / 1e6 / copy_graph_bw,
                       bitexact=bool(exact))
            out.append(row)
            print(json.dumps(row), flush=True)
    finally:
        setattr(kt, knob, default)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="8192x4096,8192x14336")
    p.add_argument("--specs", default=",".join(SPECS))
    p.add_argument("--transposed", action="store_true", help="also quantize X^T (strided read)")
    p.add_argument("--reference", action="store_true", help="also time the eager torch reference")
    p.add_argument("--pair", action="store_true",
                   help="also time the pair quantizer (X and X^T from one read) where it applies")
    p.add_argument("--tiles", default="64", help="pair tile sides to try (pair_quantize.PAIR_TILE)")
    p.add_argument("--graph", action="store_true",
                   help="also time each call inside a CUDA graph (device time without host overhead)")
    p.add_argument("--hadamard", type=int, default=0,
                   help="time rotate-and-quantize with Hadamard blocks of this size instead")
    p.add_argument("--ab", default="", help="A/B a boolean knob of lowbit.kernels._quantize_triton")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("quantize_bw: needs a CUDA GPU (it times kernels against a device copy)")
    if args.ab:
        _ab_values(args.ab)  # a bad knob fails here, before any timing
        args.graph = True
    import triton

    rows = []
    for shape in args.shapes.split(","):
        r, k = (int(v) for v in shape.split("x"))
        x = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * 3
        dst = torch.empty_like(x)
        t_copy = _bench(lambda dst=dst, x=x: dst.copy_(x))
        copy_bw = 2 * x.numel() * 2 / t_copy / 1e6  # GB/s
        copy_graph_bw = 0.0
        if args.graph:
            copy_graph_bw = 2 * x.numel() * 2 / _bench_graph(lambda dst=dst, x=x: dst.copy_(x)) / 1e6
        t_amax = _bench(lambda x=x: tensor_amax(x))
        row = dict(shape=shape, spec="amax", transposed=False, ms=t_amax, GBps=x.numel() * 2 / t_amax / 1e6,
                   copy_GBps=copy_bw, bitexact=tensor_amax(x).item() == x.float().abs().max().item())
        row["frac_of_copy"] = row["GBps"] / copy_bw
        rows.append(row)
        print(json.dumps(row), flush=True)
        for name in args.specs.split(","):
            spec = SPECS[name]
            if args.ab:
                rows += _ab_rows(x, shape, name, spec, args.ab, args.pair, copy_graph_bw, args.hadamard)
                continue
            if args.hadamard:
                rows += _hadamard_rows(x, shape, name, spec, args.hadamard, copy_bw, copy_graph_bw)
                continue
            for trans in ([False, True] if args.transposed else [False]):
                src = x.t() if trans else x
                q = kq.quantize(src, spec, seed=1)
                # Checked against the reference on the CPU: on CUDA, PyTorch's tensor / float is a
                # multiply by the rounded reciprocal, so the reference's fp32/e4m3 scales drift.
                ok = _same(quantize(src.cpu(), spec, seed=1), _to_cpu(q))
                t = _bench(lambda: kq.quantize(src, spec, seed=1))  # noqa: B023
                nbytes = x.numel() * 2 + _nbytes(q)
                bw = nbytes / t / 1e6
                row = dict(shape=shape, spec=name, transposed=trans, ms=t, GBps=bw, copy_GBps=copy_bw,
                           frac_of_copy=bw / copy_bw, bitexact=ok)
                if args.graph:
                    t_g = _bench_graph(lambda: kq.quantize(src, spec, seed=1))  # noqa: B023
                    row["graph_ms"], row["graph_frac_of_copy"] = t_g, nbytes / t_g / 1e6 / copy_graph_bw
                if args.reference:
                    t_ref = _bench(lambda: quantize(src, spec, seed=1))  # noqa: B023
                    row["ref_ms"], row["ref_frac_of_copy"] = t_ref, nbytes / t_ref / 1e6 / copy_bw
                rows.append(row)
                print(json.dumps(row), flush=True)
            if args.pair and why_not_pair(x, spec, spec) is None:
                rows += _pair_rows(x, shape, name, spec, copy_bw, args.tiles)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(f"\n{meta}\n{'shape':>11} {'spec':>13} {'T':>1} {'ms':>7} {'GB/s':>6} {'copy':>6} {'frac':>5} "
          f"{'ref':>5} {'graph':>5} exact")
    for r in rows:
        if "knob" in r:
            print(f"{r['shape']:>11} {r['spec']:>13} {r['knob']} {r['a']}: {r['off_ms']:.4f} ms "
                  f"({r['off_frac']:.2f}) {r['b']}: {r['on_ms']:.4f} ms ({r['on_frac']:.2f}) "
                  f"x{r['speedup']:.3f} {r['bitexact']}")
            continue
        ref = f"{r['ref_frac_of_copy']:.2f}" if "ref_frac_of_copy" in r else "-"
        graph = f"{r['graph_frac_of_copy']:.2f}" if "graph_frac_of_copy" in r else "-"
        print(f"{r['shape']:>11} {r['spec']:>13} {'T' if r['transposed'] else '-':>1} {r['ms']:7.3f} "
              f"{r['GBps']:6.0f} {r['copy_GBps']:6.0f} {r['frac_of_copy']:5.2f} {ref:>5} {graph:>5} "
              f"{r['bitexact']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
