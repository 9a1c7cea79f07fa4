"""The fused SwiGLU fp8 quantizers against SwiGLU + the pair quantizer, on the 1b model's FFN (GPU).

    python benchmarks/swiglu_pair_bw.py                 # 16384 x 8192 (micro-batch 8 x 2048, 1b)
    python benchmarks/swiglu_pair_bw.py --shape 8192x14336 --sweep

Forward: lowbit.kernels.swiglu_pair.swiglu_pair_delayed (reads g, u; writes h and h^T in fp8)
against Inductor's silu(g) * u in bf16 followed by the delayed-scaling pair quantizer on h.
Backward: swiglu_grad_pairs_delayed (reads dh, g, u; writes dg, du and their transposes in fp8)
against Inductor's SwiGLU backward in bf16 followed by two pair quantizers. Histories already
hold an entry (a training step's case: no amax pass). Each is timed with triton's do_bench, and
the fused kernels also as a fraction of a device copy of the bytes they must move. `--sweep` tries
tile shapes and warps of the fused kernels (the module knobs TILE, GRAD_TILE and WARPS), each
checked bit for bit against the default setting's outputs.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="16384x8192")
    ap.add_argument("--fmt", default="fp8_e4m3")
    ap.add_argument("--grad-fmt", default="fp8_e5m2")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--tiles", default="64x64,32x128,128x64,64x128,32x64", help="--sweep's tiles")
    ap.add_argument("--warps", default="4,8", help="--sweep's warps (both kernels)")
    args = ap.parse_args()
    import triton
    from triton.testing import do_bench

    import lowbit.kernels._swiglu_pair_triton as kt
    from lowbit.kernels.pair_quantize_op import fp8_tensor_pair_delayed_direct
    from lowbit.kernels.swiglu_pair import swiglu_grad_pairs_delayed, swiglu_pair_delayed

    r, c = (int(v) for v in args.shape.split("x"))
    g, u, dh = (torch.randn(r, c, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    hist = torch.full((8, 16), 4.0, device="cuda")  # recorded entries: no first-call amax pass

    def bench(f) -> float:
        return do_bench(f, warmup=25, rep=200, return_mode="median")

    def copy_ms(nbytes: int) -> float:
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        return bench(lambda: dst.copy_(src))

    swiglu = torch.compile(lambda g, u: torch.nn.functional.silu(g) * u)

    def swiglu_bwd(dh, g, u):
        gg, uu = g.detach().requires_grad_(True), u.detach().requires_grad_(True)
        return torch.autograd.grad(torch.nn.functional.silu(gg) * uu, (gg, uu), dh)

    swiglu_bwd_c = torch.compile(swiglu_bwd)

    def fwd_fused():
        return swiglu_pair_delayed(g, u, args.fmt, hist[0], hist[1])

    def fwd_unfused():
        return fp8_tensor_pair_delayed_direct(swiglu(g, u), args.fmt, hist[0], hist[1])

    def bwd_fused():
        return swiglu_grad_pairs_delayed(dh, g, u, args.grad_fmt, (hist[2], hist[3]), (hist[4], hist[5]))

    def bwd_unfused():
        dg, du = swiglu_bwd_c(dh, g, u)
        return (fp8_tensor_pair_delayed_direct(dg, args.grad_fmt, hist[2], hist[3]),
                fp8_tensor_pair_delayed_direct(du, args.grad_fmt, hist[4], hist[5]))

    n = r * c
    rows = []
    copy_fwd, copy_bwd = copy_ms(n * 6), copy_ms(n * 10)  # the bytes the fused kernels move
    cases = (("forward fused", fwd_fused, copy_fwd), ("forward unfused", fwd_unfused, copy_fwd),
             ("backward fused", bwd_fused, copy_bwd), ("backward unfused", bwd_unfused, copy_bwd))
    for name, f, copy in cases:
        f()
        ms = bench(f)
        rows.append(dict(what=name, shape=args.shape, ms=round(ms, 4), of_copy=round(copy / ms, 3)))
        print(json.dumps(rows[-1]), flush=True)
    if args.sweep:
        def outputs(f) -> list[torch.Tensor]:
            # From one history state: timed calls roll other amaxes in (the unfused path's bf16 h
            # has a slightly different amax), so the scales would differ between settings.
            hist.fill_(4.0)
            return [t.view(torch.uint8) if t.element_size() == 1 else t for t in f()]

        ref_f, ref_b = outputs(fwd_fused), outputs(bwd_fused)
        default = kt.TILE, kt.GRAD_TILE, kt.WARPS
        tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
        for (br, bc), w in itertools.product(tiles, (int(v) for v in args.warps.split(","))):
            kt.TILE = kt.GRAD_TILE = (br, bc)
            kt.WARPS = (w, w)
            try:
                same = [all(torch.equal(a, b) for a, b in zip(ref, outputs(f)))
                        for ref, f in ((ref_f, fwd_fused), (ref_b, bwd_fused))]
                tf, tb = bench(fwd_fused), bench(bwd_fused)
                res = dict(tile=[br, bc], warps=w, fwd_ms=round(tf, 4), fwd_copy=round(copy_fwd / tf, 3),
                           bwd_ms=round(tb, 4), bwd_copy=round(copy_bwd / tb, 3), bitexact=same)
            except Exception as e:  # a setting Triton cannot compile: say so, go on
                res = dict(tile=[br, bc], warps=w, error=repr(e)[:200])
            finally:
                kt.TILE, kt.GRAD_TILE, kt.WARPS = default
            print(json.dumps(res), flush=True)
    print({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__})


if __name__ == "__main__":
    main()
