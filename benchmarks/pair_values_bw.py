"""MXFP8 pairs with sides written as BF16 values against the codes pair and the dequantize passes
it replaces (GPU; lowbit.kernels.pair_quantize.quantize_pair_values).

For each shape and each values choice ((True, True): dY and dY^T in backward; (True, False): X or
W in fprop, X^T / W^T kept as codes) times in CUDA graphs: the values pair, and the codes pair
followed by a dequantize of each values side (what the layer ran before). "of copy" is the values
pair's bytes (input read once; bf16 values, codes and scales written once) over its time, as a
fraction of a bf16 device copy's bandwidth in the same run. --sweep times VALUES_TILE x
VALUES_WARPS, each setting checked bit for bit against the default's output.

    python benchmarks/pair_values_bw.py --out $OUT/pair_values.json
    python benchmarks/pair_values_bw.py --sweep --tiles 32x128,64x128,32x256 --warps 2,4,8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantize_bw import _bench_graph  # noqa: E402

from lowbit.kernels import pair_quantize as pq  # noqa: E402
from lowbit.nn.quant_linear_values import dequantized  # noqa: E402
from lowbit.quant import QuantSpec  # noqa: E402

MX = QuantSpec("fp8_e4m3", 32, "e8m0")
CHOICES = {"both": (True, True), "first": (True, False)}


def _bytes(r: int, c: int, values: tuple[bool, bool]) -> int:
    per_side = [2 * r * c if v else r * c + r * c // 32 * 4 for v in values]
    return 2 * r * c + sum(per_side)


def _copy_bw(x: torch.Tensor) -> float:
    dst = torch.empty_like(x)
    t = _bench_graph(lambda: dst.copy_(x))
    return 2 * x.numel() * x.element_size() / t / 1e6  # GB/s


def _case(x: torch.Tensor, values: tuple[bool, bool], copy_gbps: float) -> dict:
    r, c = x.shape

    def before() -> None:
        q, q_t = pq.quantize_pair(x, MX, MX)
        for v, qq in zip(values, (q, q_t)):
            if v:
                dequantized(qq)

    t_new = _bench_graph(lambda: pq.quantize_pair_values(x, MX, MX, values))
    t_old = _bench_graph(before)
    gbps = _bytes(r, c, values) / t_new / 1e6
    return dict(shape=f"{r}x{c}", values=values, ms=t_new, before_ms=t_old, speedup=t_old / t_new,
                of_copy=gbps / copy_gbps)


def _outputs(x: torch.Tensor, values: tuple[bool, bool]) -> list[torch.Tensor]:
    out = []
    for q in pq.quantize_pair_values(x, MX, MX, values):
        out += [q.view(torch.int16)] if isinstance(q, torch.Tensor) else [q.data.view(torch.uint8), q.scale]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="16384x2048,16384x8192")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--tiles", default="32x128,64x128,32x256,64x64")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for r, c in shapes:
        x = torch.randn(r, c, device="cuda").mul_(torch.logspace(-3, 2, c, device="cuda")).bfloat16()
        copy_gbps = _copy_bw(x)
        for name, values in CHOICES.items():
            default = _outputs(x, values)
            settings = [(pq.VALUES_TILE, pq.VALUES_WARPS)]
            if args.sweep:
                settings = [(tuple(int(v) for v in t.split("x")), int(w))
                            for t in args.tiles.split(",") for w in args.warps.split(",")]
            saved = pq.VALUES_TILE, pq.VALUES_WARPS
            for tile, warps in settings:
                pq.VALUES_TILE, pq.VALUES_WARPS = tile, warps
                try:
                    same = all(torch.equal(a, b) for a, b in zip(default, _outputs(x, values)))
                    row = dict(_case(x, values, copy_gbps), choice=name, tile=tile, warps=warps,
                               bitexact=same)
                except Exception as e:  # a setting Triton cannot compile: say so, go on
                    row = dict(shape=f"{r}x{c}", choice=name, tile=tile, warps=warps, error=repr(e)[:200])
                finally:
                    pq.VALUES_TILE, pq.VALUES_WARPS = saved
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
