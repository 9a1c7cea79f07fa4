"""The lowbias32 counter hash in Triton (imported lazily, like every Triton module here).

Bit for bit lowbit.quant.rounding.lowbias32 on uint32 lanes: the stochastic-rounding noise of the
fused quantize kernel and of the fused optimizer steps, and the reference's, all come from here.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lowbias32(x):
    # x: uint32. The products wrap mod 2^32 in uint32 arithmetic, as the reference's masks do.
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)
