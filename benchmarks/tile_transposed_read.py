"""NVFP4's W^T (16 x 16 blocks) quantized from the transposed view: copied first, or read in place (GPU).

lowbit.kernels.quantize.TILE_TRANSPOSED_READ off: the fp32 W^T view is made contiguous by torch
(one read and one write of the weight) before the quantize kernel reads it; on: the kernel reads
the view in place. Times both in CUDA graphs for the 1b model's weight shapes, checks that the two
give the same bits, and reports each as a fraction of an fp32 device copy's bandwidth (bytes: the
weight read once, the packed codes and scales written once).

    python benchmarks/tile_transposed_read.py --out $OUT/tile_transposed_read.json
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

from lowbit.kernels import quantize as kq  # noqa: E402
from lowbit.quant import QuantSpec  # noqa: E402

NV_W = QuantSpec("fp4_e2m1", (16, 16), "e4m3")
SHAPES = ((2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (4096, 14336), (14336, 4096))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for shape in SHAPES:
        w = torch.randn(shape, device="cuda")
        dst = torch.empty_like(w)
        copy_gbps = 2 * w.numel() * 4 / _bench_graph(lambda w=w, dst=dst: dst.copy_(w)) / 1e6
        res = {}
        for on in (False, True):
            kq.TILE_TRANSPOSED_READ = on
            q = kq.quantize(w.t(), NV_W)
            t = _bench_graph(lambda w=w: kq.quantize(w.t(), NV_W))
            nbytes = w.numel() * 4 + q.data.numel() + q.scale.numel() * q.scale.element_size()
            res[on] = (t, nbytes / t / 1e6 / copy_gbps, q)
        qa, qb = res[False][2], res[True][2]
        same = all(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
                   for a, b in ((qa.data, qb.data), (qa.scale, qb.scale), (qa.tensor_scale, qb.tensor_scale)))
        row = dict(shape=list(shape), copy_first_us=res[False][0] * 1e3, in_place_us=res[True][0] * 1e3,
                   copy_first_of_copy=res[False][1], in_place_of_copy=res[True][1],
                   speedup=res[False][0] / res[True][0], same_bits=same)
        rows.append(row)
        print(f"W^T of {shape}: copy first {row['copy_first_us']:.1f} us "
              f"({row['copy_first_of_copy']:.2f} of copy), "
              f"in place {row['in_place_us']:.1f} us ({row['in_place_of_copy']:.2f}), "
              f"{row['speedup']:.2f}x, same bits {same}", flush=True)
    kq.TILE_TRANSPOSED_READ = False
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows, device=torch.cuda.get_device_name(), torch=torch.__version__), f,
                      indent=1)


if __name__ == "__main__":
    main()
