"""SDPA backends on the 1b model's attention, forward + backward, BF16, causal (GPU).

The model calls `F.scaled_dot_product_attention(..., enable_gqa=True)` and lets PyTorch pick the
kernel. This times that default against each backend forced with `sdpa_kernel`, with grouped
k/v heads passed as they are ("gqa") or repeated to every query head first ("repeat"), and
prints TFLOP/s (causal: half the score matrix) and the largest difference from the default's
output and gradients.

    python benchmarks/attention_backends.py                 # 1b: batch 8, 32 heads, 8 k/v heads, 2048 x 64
    python benchmarks/attention_backends.py --batch 4 --seq 4096
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def main() -> None:
    from triton.testing import do_bench

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_backends.py times CUDA kernels: no GPU here")
    b, h, kv, s, d = args.batch, args.heads, args.kv_heads, args.seq, args.head_dim
    if h % kv:
        raise SystemExit(f"--heads={h} must be a multiple of --kv-heads={kv}")
    g = torch.Generator(device="cuda").manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
        return t.requires_grad_()

    q, k, v = leaf(b, h, s, d), leaf(b, kv, s, d), leaf(b, kv, s, d)
    grad_out = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
    # 4·b·h·s²·d is the forward's two matmuls (QK^T, PV); the backward's five matmuls make 3.5x
    # that in all; causal masking halves it.
    flops = 4 * b * h * s * s * d / 2 * 3.5

    def step(backend: SDPBackend | None, repeat: bool):
        def fn() -> torch.Tensor:
            kk, vv = (k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)) if repeat else (k, v)
            if backend is None:
                o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=not repeat)
            else:
                with sdpa_kernel([backend]):
                    o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=not repeat)
            o.backward(grad_out)
            return o

        return fn

    ref = None
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "shape": [b, h, kv, s, d]}))
    for name, backend in BACKENDS.items():
        for repeat in (False, True):
            fn = step(backend, repeat)
            row = {"backend": name, "kv": "repeat" if repeat else "gqa"}
            try:
                q.grad = k.grad = v.grad = None
                out = fn().detach()
                got = (out, q.grad.clone(), k.grad.clone(), v.grad.clone())
                ref = ref or got
                ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
                row |= {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9),
                        "max_diff_vs_default": max((a.float() - r.float()).abs().max().item()
                                                   for a, r in zip(got, ref))}
            except RuntimeError as e:  # a backend that does not take these inputs
                row["unavailable"] = str(e).splitlines()[0][:160]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
