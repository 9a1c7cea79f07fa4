"""The column quantizer against what it replaced, and a device copy, in one run (GPU).

X is a bf16 (tokens x features) matrix; its transpose X^T (wgrad's operand, a view) is rotated
along the tokens in Hadamard blocks and quantized in 1-D groups along the tokens:

    columns    lowbit.kernels.column_quantize: one read of the view
    two-pass   the rotation kernel writing the rotated X^T in fp32, then the quantize kernel
               (what rotate_quantize did for such views before; LOWBIT_COLUMN_QUANTIZE=0)
    copy       dst.copy_(X): the bf16 read and write the fraction of a copy is measured against

Device time of one call (calls captured in a CUDA graph and replayed); bytes counted are X read
once and the codes and scales written once. Every row checks that both paths give the same bytes.
--folds also times the MXFP4-SR operand written folded for cuBLAS's blockwise GEMM (e4m3 values,
a scale a 1 x 128 chunk or 128 x 128 tile; lowbit.kernels.column_quantize's `fold`) against the
codes followed by the fold pass a GEMM needs otherwise (the row fold, and the chunk fold), each
checked against lowbit.quant.scale_fold.fold_blocks of the codes.
--tiles also times other settings of the kernel's knobs (values a program holds per group, i.e.
rows times the group size; groups per program; warps; optionally a register cap), each row
printed as it is timed (every setting compiles a kernel of its own).

    python benchmarks/column_quantize_bw.py --out $OUT/columns.json
    python benchmarks/column_quantize_bw.py --folds --specs mxfp4_sr --shapes 16384x8192
    python benchmarks/column_quantize_bw.py --tiles "8192,2,4;4096,2,4,128" --specs mxfp4_sr \
        --shapes 16384x8192
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantize_bw import _bench_graph, _nbytes, _same  # noqa: E402

from lowbit.kernels import _column_quantize_triton as kct  # noqa: E402
from lowbit.kernels import column_quantize as kc  # noqa: E402
from lowbit.kernels import quantize as kq  # noqa: E402
from lowbit.kernels.hadamard import hadamard_rotate, rotate_quantize  # noqa: E402
from lowbit.quant import QuantSpec  # noqa: E402

# name: (spec, Hadamard block) of the recipes' strided operands
SPECS = {
    "mxfp4_sr": (QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic"), 32),  # mxfp4 wgrad/dgrad
    "nvfp4_sr": (QuantSpec("fp4_e2m1", 16, "e4m3", "stochastic"), 16),  # nvfp4 wgrad's dY^T
    "nvfp4": (QuantSpec("fp4_e2m1", 16, "e4m3"), 16),  # nvfp4 wgrad's X^T
}


def _row(x: torch.Tensor, shape: str, name: str, copy_bw: float, extra: list[tuple[int, ...]]) -> list[dict]:
    spec, block = SPECS[name]
    xt = x.t()

    def columns():
        return rotate_quantize(xt, spec, block, 3, seed=1)

    def two_pass():
        return kq.quantize(hadamard_rotate(xt, block, 3), spec, seed=1)

    q = columns()
    kc.ENABLED = False
    try:
        same = _same(q, two_pass())
        t_two = _bench_graph(two_pass)
    finally:
        kc.ENABLED = True
    nbytes = x.numel() * x.element_size() + _nbytes(q)
    rows = []
    default = (kct.COLUMN_VALUES, kct.COLUMN_GROUPS, kct.COLUMN_WARPS, kct.COLUMN_MAXNREG)
    tiles = [default] + [t + (0,) * (4 - len(t)) for t in extra if t + (0,) * (4 - len(t)) != default]
    for tile in tiles:
        kct.COLUMN_VALUES, kct.COLUMN_GROUPS, kct.COLUMN_WARPS, kct.COLUMN_MAXNREG = tile
        try:
            ok = _same(columns(), q)
            t = _bench_graph(columns)
        except Exception as e:  # a tile that does not compile (registers): reported, not fatal
            print(f"  tile {tile}: {type(e).__name__}: {str(e)[:100]}")
            continue
        finally:
            kct.COLUMN_VALUES, kct.COLUMN_GROUPS, kct.COLUMN_WARPS, kct.COLUMN_MAXNREG = default
        r = dict(shape=shape, spec=name, tile=list(tile), columns_ms=t, two_pass_ms=t_two, speedup=t_two / t,
                 frac_of_copy=nbytes / (t * 1e-3) / copy_bw, same_bits=same and ok)
        print(f"  {name:9} tile {str(tile):15} columns {t * 1e3:7.1f} us "
              f"({r['frac_of_copy']:.2f} of a copy)  two-pass {t_two * 1e3:7.1f} us  "
              f"{r['speedup']:.2f}x  same bits: {r['same_bits']}", flush=True)
        rows.append(r)
    return rows


def _fold_rows(x: torch.Tensor, shape: str, copy_bw: float) -> list[dict]:
    from lowbit.kernels.column_quantize import column_quantize
    from lowbit.kernels.scale_fold import fold_chunks, fold_group_scales
    from lowbit.quant.rounding import seed_offset
    from lowbit.quant.scale_fold import fold_blocks

    spec, block = SPECS["mxfp4_sr"]
    xt = x.t()
    q = rotate_quantize(xt, spec, block, 3, seed=1)
    variants = {
        "codes + row fold": lambda: fold_group_scales(rotate_quantize(xt, spec, block, 3, seed=1)),
        "codes + chunk fold": lambda: fold_chunks(rotate_quantize(xt, spec, block, 3, seed=1)),
    }
    rows = []
    for fold, n in (("chunk", 1), ("tile", 128)):
        variants[f"folded {fold}s"] = lambda fold=fold: column_quantize(xt, spec, block, seed_offset(3),
                                                                        seed_offset(1), fold=fold)
        data, scale, _, _ = variants[f"folded {fold}s"]()
        ref = fold_blocks(q, n)
        same = torch.equal(data.view(torch.uint8), ref.data.view(torch.uint8))
        same = same and torch.equal(scale, ref.scale)
        rows.append(dict(shape=shape, variant=f"folded {fold}s", same_bits=same))
    times = {name: _bench_graph(fn) for name, fn in variants.items()}
    nbytes = x.numel() * x.element_size() + x.numel()  # bf16 read, e4m3 written
    out = []
    for name, t in times.items():
        r = dict(shape=shape, variant=name, ms=t, frac_of_copy=nbytes / (t * 1e-3) / copy_bw,
                 vs_codes_and_row_fold=times["codes + row fold"] / t)
        r.update(next((c for c in rows if c["variant"] == name), {}))
        print(f"  mxfp4_sr {name:19} {t * 1e3:7.1f} us ({r['frac_of_copy']:.2f} of a copy)  "
              f"{r['vs_codes_and_row_fold']:.2f}x  same bits: {r.get('same_bits', '-')}", flush=True)
        out.append(r)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="16384x2048,16384x8192,8192x4096,8192x14336",
                   help="tokens x features of X")
    p.add_argument("--specs", default=",".join(SPECS))
    p.add_argument("--tiles", default="",
                   help='other "values,groups,warps[,maxnreg]" settings to time, ";"-separated')
    p.add_argument("--folds", action="store_true", help="also time MXFP4-SR written folded (docstring)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("column_quantize_bw.py needs a CUDA GPU")
    try:
        extra = [tuple(int(v) for v in t.split(",")) for t in args.tiles.split(";") if t]
    except ValueError:
        sys.exit(f'--tiles {args.tiles!r}: expected "values,groups,warps" settings separated by ";"')
    if any(len(t) not in (3, 4) for t in extra):
        sys.exit(f'--tiles {args.tiles!r}: each setting is "values,groups,warps[,maxnreg]"')
    for name in args.specs.split(","):
        if name not in SPECS:
            sys.exit(f"--specs: unknown {name!r}; valid choices: {', '.join(SPECS)}")
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    results = []
    for shape in args.shapes.split(","):
        t, f = (int(v) for v in shape.split("x"))
        x = torch.randn(t, f, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(x)
        t_copy = _bench_graph(lambda dst=dst, x=x: dst.copy_(x))
        copy_bw = 2 * x.numel() * x.element_size() / (t_copy * 1e-3)
        print(f"{shape}: copy {t_copy * 1e3:.1f} us ({copy_bw / 1e12:.2f} TB/s)")
        for name in args.specs.split(","):
            results += _row(x, shape, name, copy_bw, extra)
        if args.folds:
            results += _fold_rows(x, shape, copy_bw)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
