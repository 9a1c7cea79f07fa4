"""Check the quantizers' reciprocal-and-correction division (_quant_math_triton._div_scale) against
the GPU's IEEE division (tl.div_rn) for every pair of fp32 significands: dividends and divisors in
[1, 2), so the quotients cover both binades below and above 1. Scaling either operand by a power
of two scales the quotient exactly, so this covers every pair the kernels divide in the fast form
(divisors >= 2^-64, quotients >= 2^-20; see _div_scale). Needs CUDA.

    python benchmarks/div_scale_check.py              # 2^23 x 2^23 pairs (about a minute on an H100)
    python benchmarks/div_scale_check.py --a-bits 16  # every divisor, 2^16 dividends spread evenly
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lowbit.kernels._quant_math_triton import _div_scale  # noqa: E402


@triton.jit
def _check_kernel(bad_ptr, A_BITS: tl.constexpr, BD: tl.constexpr, BA: tl.constexpr, DIV: tl.constexpr):
    # Program p divides BD consecutive divisor significands into 2^A_BITS dividend significands.
    dsig = tl.program_id(0) * BD + tl.arange(0, BD)
    d = ((127 << 23) | dsig).to(tl.float32, bitcast=True)[:, None]
    bad = tl.zeros([BD, BA], tl.int32)
    for a0 in range(0, 1 << A_BITS, BA):
        asig = (a0 + tl.arange(0, BA)) << (23 - A_BITS)
        x = ((127 << 23) | asig).to(tl.float32, bitcast=True)[None, :] + tl.zeros([BD, BA], tl.float32)
        got = _div_scale(x, d, DIV).to(tl.int32, bitcast=True)
        ref = tl.div_rn(x, d).to(tl.int32, bitcast=True)
        bad += (got != ref).to(tl.int32)
    tl.atomic_add(bad_ptr, tl.sum(tl.sum(bad, axis=1), axis=0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a-bits", type=int, default=23, help="dividend significand bits to enumerate (1-23)")
    ap.add_argument("--div", type=int, default=1, choices=(1, 2, 3), help="_div_scale's form (1, 2 or 3)")
    args = ap.parse_args()
    if not 1 <= args.a_bits <= 23:
        ap.error(f"--a-bits must be in 1..23, got {args.a_bits}")
    if not torch.cuda.is_available():
        print("div_scale_check: needs a CUDA GPU (the fma and division under test are the GPU's)",
              file=sys.stderr)
        return 2
    bad = torch.zeros(1, dtype=torch.int32, device="cuda")
    bd, ba = 8, min(1024, 1 << args.a_bits)
    t0 = time.perf_counter()
    _check_kernel[((1 << 23) // bd,)](bad, A_BITS=args.a_bits, BD=bd, BA=ba, DIV=args.div, num_warps=8)
    torch.cuda.synchronize()
    pairs = (1 << 23) * (1 << args.a_bits)
    n = int(bad.item())
    print(f"div_scale_check: {pairs:,} pairs (2^23 divisors x 2^{args.a_bits} dividends), DIV={args.div}: "
          f"{n} differ from tl.div_rn; {time.perf_counter() - t0:.1f} s on {torch.cuda.get_device_name()}")
    return 1 if n else 0


if __name__ == "__main__":
    raise SystemExit(main())
