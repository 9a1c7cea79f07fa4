"""Tile-size sweeps of lowbit's quantize kernels on the 1b model's shapes (GPU).

    python benchmarks/tile_sweep.py pair       # fp8 pair kernel (X and X^T), tile x warps, per shape
    python benchmarks/tile_sweep.py quantize   # 1-D group quantize (MXFP4/NVFP4/MXFP8), tile knobs
    python benchmarks/tile_sweep.py rows       # row-scaled quantize (fp8/int8/int4), chunk x warps
    python benchmarks/tile_sweep.py long_rows  # rows of 14336: order and L2 eviction of the two reads
    python benchmarks/tile_sweep.py tile2d     # NVFP4 weights' 16 x 16 blocks: blocks per tile x warps

`pair`: the pair kernel as the traced fp8 layers call it (e4m3, one tensor scale, amax given),
each tile/warps choice timed with triton's do_bench against a copy of the same bytes.
`quantize`: lowbit.kernels.quantize with its module knobs (TILE_ELEMS, GROUP_COLS, warps) varied,
device time of 20 calls replayed in a CUDA graph against a copy likewise timed.
`rows`: the same timing with ROW_CHUNK (rows wider are read twice) and the warps varied.
Prints the current choice and the four or five best per shape.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PAIR_SHAPES = [
    ("X attn", 16384, 2048, torch.bfloat16), ("X ffn-down h", 16384, 8192, torch.bfloat16),
    ("dY kv", 16384, 512, torch.bfloat16), ("dY w13", 16384, 8192, torch.bfloat16),
    ("W q", 2048, 2048, torch.float32), ("W k", 512, 2048, torch.float32),
    ("W w1", 8192, 2048, torch.float32), ("W w2", 2048, 8192, torch.float32),
]
PAIR_TILES = [(64, 64), (64, 128), (128, 64), (128, 128), (32, 128), (128, 32), (32, 64), (64, 32)]


def sweep_pair() -> None:
    from triton.testing import do_bench

    from lowbit.kernels._pair_quantize_triton import launch_pair
    from lowbit.quant.formats import FORMATS

    def bench(f) -> float:
        return do_bench(f, warmup=25, rep=200, return_mode="median")

    fmt = FORMATS["fp8_e4m3"]
    for name, r, c, dt in PAIR_SHAPES:
        x = torch.randn(r, c, device="cuda", dtype=dt)
        nbytes = x.numel() * (x.element_size() + 2)  # read x, write X and X^T codes
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        t_copy = bench(lambda: dst.copy_(src))  # noqa: B023
        d = torch.empty(r, c, dtype=torch.uint8, device="cuda")
        d_t = torch.empty(c, r, dtype=torch.uint8, device="cuda")
        s = torch.empty(1, 1, device="cuda")
        amax = x.abs().max().float().reshape(1)
        res = []
        for (br, bc), w in itertools.product(PAIR_TILES, (2, 4, 8)):
            if br * bc >= 16384 and w < 4:
                continue
            args = (x, d, d_t, s, s, amax, None, fmt, 0, 0, 0, 0, False, False, False, (br, bc), 1, 2)
            t = bench(lambda args=args, w=w: launch_pair(*args, num_warps=w))
            res.append((t, br, bc, w))
        res.sort()
        now = next(t for t, br, bc, w in res if (br, bc, w) == (64, 64, 4))
        best = "; ".join(f"{br}x{bc} w{w} {t * 1e3:.1f} us ({t_copy / t:.2f})" for t, br, bc, w in res[:4])
        print(f"{name} {r}x{c} {dt}: copy {t_copy * 1e3:.1f} us; now 64x64 w4 {now * 1e3:.1f} us = "
              f"{t_copy / now:.2f} of a copy; best: {best}", flush=True)


def _sweep_module_knobs(names: tuple[str, ...], knobs: dict[str, tuple], top: int,
                       shapes: tuple[str, ...] = ("8192x4096", "8192x14336"),
                       warps: tuple[int, ...] = (0, 4, 8, 16)) -> None:
    # lowbit.kernels.quantize on each spec of `names`, for every combination of the module knobs
    # of _quantize_triton in `knobs` (their first values are the defaults) and of the warps
    # ("rule": the module's own _warps); device time in CUDA graphs against a copy.
    from quantize_bw import SPECS, _bench_graph, _nbytes

    from lowbit.kernels import _quantize_triton as kt
    from lowbit.kernels import quantize as kq

    warps_rule = kt._warps
    defaults = {knob: getattr(kt, knob) for knob in knobs}
    for shape in shapes:
        r, k = map(int, shape.split("x"))
        x = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * 3
        dst = torch.empty_like(x)
        copy_bw = 4 * x.numel() / _bench_graph(lambda: dst.copy_(x)) / 1e6  # noqa: B023
        for name in names:
            spec = SPECS[name]
            nbytes = x.numel() * 2 + _nbytes(kq.quantize(x, spec, seed=1))
            res = []
            for *values, w in itertools.product(*knobs.values(), warps):
                for knob, v in zip(knobs, values):
                    setattr(kt, knob, v)
                kt._warps = warps_rule if w == 0 else (lambda *a, w=w: w)
                t = _bench_graph(lambda: kq.quantize(x, spec, seed=1))  # noqa: B023
                res.append((nbytes / t / 1e6 / copy_bw, "/".join(map(str, values)) + f"/w{w or 'rule'}"))
            for knob, v in defaults.items():
                setattr(kt, knob, v)
            kt._warps = warps_rule
            now_key = "/".join(map(str, defaults.values())) + "/wrule"
            now = next(f for f, key in res if key == now_key)
            res.sort(reverse=True)
            best = "; ".join(f"{key} {f:.3f}" for f, key in res[:top])
            label = "/".join([*knobs, "warps"])
            print(f"{shape} {name} ({label}): now {now:.3f} of a copy; best: {best}", flush=True)


def sweep_quantize() -> None:
    _sweep_module_knobs(("mxfp4", "mxfp4_sr", "nvfp4", "mxfp8"),
                        {"TILE_ELEMS": (4096, 8192, 16384), "GROUP_COLS": (128, 256, 512)}, top=5)


def sweep_rows() -> None:
    _sweep_module_knobs(("fp8_row", "int8_row", "int4_row"), {"ROW_CHUNK": (4096, 2048, 8192, 16384)}, top=6)


def sweep_long_rows() -> None:
    # The order and L2 eviction policies of long rows' two reads, at two chunk widths.
    evict = (("", ""), ("evict_last", "evict_first"), ("evict_last", ""), ("", "evict_first"))
    knobs = {"LONG_ROW_REVERSE": (False, True), "LONG_ROW_EVICT": evict, "ROW_CHUNK": (4096, 2048)}
    _sweep_module_knobs(("fp8_row", "int8_row", "int4_row"), knobs, top=6, shapes=("8192x14336",),
                        warps=(0,))


def sweep_tile2d() -> None:
    # Small 2-D blocks grouped into tiles (TILE2D_SMALL) on the 1b model's weight shapes.
    tiles = ((16, 256), (32, 128), (64, 64), (16, 512), (32, 256), (16, 1024))
    _sweep_module_knobs(("nvfp4_w16x16",), {"TILE2D_SMALL": tiles}, top=6,
                        shapes=("4096x4096", "14336x4096", "4096x14336"), warps=(0, 8, 16))


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else ""
    sweeps = {"pair": sweep_pair, "quantize": sweep_quantize, "rows": sweep_rows,
              "long_rows": sweep_long_rows, "tile2d": sweep_tile2d}
    if kind not in sweeps:
        raise SystemExit(f"usage: tile_sweep.py {'|'.join(sweeps)} (got {kind!r})")
    sweeps[kind]()
