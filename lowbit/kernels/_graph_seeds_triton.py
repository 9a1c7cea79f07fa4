"""A traced layer's per-call seed table in one kernel (imported lazily, like every Triton module here).

lowbit.nn.quant_linear_graph hashes (layer stream, call counter, GEMM) into three seeds and expands
them into the seed table of lowbit.quant.rounding.seed_table, then advances the counter. As torch
ops that is ~24 tiny kernels per layer call (2,688 a step of a 1b mxfp4 model, ~3 ms on the H100,
docs/BENCHMARKS.md run 79); this kernel writes the same int64 table and advances the counter in
one launch, bit for bit (tests against the torch ops).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels._hash_triton import lowbias32
from lowbit.kernels.launch import launchable
from lowbit.quant.rounding import DERIVE_STEP, DERIVED_STREAMS, GOLDEN32


@triton.jit
def _graph_seeds_kernel(calls_ptr, out_ptr, stream, NG: tl.constexpr, NGP: tl.constexpr,
                        NK: tl.constexpr, NKP: tl.constexpr, STEP: tl.constexpr, GOLDEN: tl.constexpr):
    # out: int64 (2, NG, NK); [0, g, k] derived seeds of GEMM g, [1, g, k] their hash offsets.
    calls = tl.load(calls_ptr)
    g = tl.arange(0, NGP * NKP) // NKP
    k = (tl.arange(0, NGP * NKP) % NKP).to(tl.int64)
    s64 = stream.to(tl.int64)
    idx = (calls * NG + g + s64).to(tl.uint32)  # int64 wraps mod 2^64; the hash takes mod 2^32
    h = lowbias32(idx).to(tl.int64) & 0xFFFFFFFF
    seed = lowbias32((h + s64).to(tl.uint32)).to(tl.int64) & 0x7FFFFFFF
    value = tl.where(k == 0, seed, (seed + k * STEP) & 0x7FFFFFFF)
    # Masked after widening: whether a uint32 widens with zeros or with its top bit differs between
    # the interpreter and compiled Triton; the table holds offsets in [0, 2^32) as the torch ops do.
    offset = (value.to(tl.uint32) * tl.full(value.shape, GOLDEN, tl.uint32)).to(tl.int64) & 0xFFFFFFFF
    m = (k < NK) & (g < NG)
    tl.store(out_ptr + g * NK + k, value, m)
    tl.store(out_ptr + NG * NK + g * NK + k, offset, m)
    tl.debug_barrier()  # every lane has read the counter before it advances
    tl.store(calls_ptr, calls + 1)


def graph_seed_table(calls: torch.Tensor, stream: int, n_gemms: int = 3) -> torch.Tensor:
    """(seed table of the call's `n_gemms` seeds, int64 (2, n_gemms, DERIVED_STREAMS)); advances
    `calls` (a 0-d int64 device counter) by one. Bit for bit lowbit.nn.quant_linear_graph's torch ops."""
    out = torch.empty((2, n_gemms, DERIVED_STREAMS), dtype=torch.int64, device=calls.device)
    launchable(_graph_seeds_kernel)[(1,)](
        calls, out, stream, NG=n_gemms, NGP=triton.next_power_of_2(n_gemms), NK=DERIVED_STREAMS,
        NKP=triton.next_power_of_2(DERIVED_STREAMS),
        STEP=DERIVE_STEP, GOLDEN=GOLDEN32, num_warps=1,
    )
    return out
