"""Fused Triton steps for low-bit AdamW: dequantize → update → requantize in registers.

One pass reads param, grad and the quantized moments and writes param and moments back: 16 B/param
for fp32 params at 8 bits (fused fp32 AdamW moves 28). The 4-bit second moment of a matrix is
rank-1 normalized by the row/column maxima of the *new* moment, known only after the update, so
that step adds a first pass recomputing v and taking the maxima with atomics (+4.5 B/param) and a
tiny kernel between the passes (state ← new maxima, reciprocals for pass 2); the fused rank-1 path
needs ncols % 128 == 0 (other matrices take the torch reference). BF16 parameters
with fp32 states (no master copy) get their own single pass. Every kernel is multi-tensor: one
launch covers all tensors of a state kind (see `fused_adamw_multi_`).

Every fp32 operation mirrors lowbit/optim/adamw.py (`adamw_math`) and lowbit/optim/qmaps.py
(`normalize`, nearest code) in the same order with IEEE division and square root, so under
TRITON_INTERPRET=1 the kernels reproduce the reference bit for bit (on GPUs the compiler fuses
multiply-adds: last-ulp differences, which can flip a code; CONFIG["fma4"] = 0 turns that off for
the 4-bit kernels, which are then bit-identical on the GPU too). Nearest 8-bit codes come from the byte LUT of
`qmaps.search_lut` (two gathers instead of an 8-step binary search); 4-bit codes from register
compares (first moment, stochastic rounding like `qmaps.stochastic_code`, with the same hash
bits), one table gather and compare (first moment, nearest: `m_code_lut`) and arithmetic (second
moment, rounded up like `qmaps.up_code`). The rank-1 pass 2 takes square roots and divisions by
the fast paths of the IEEE ops with one range test per tile (same results). BF16 params
are rounded in integer arithmetic (nearest-even, stochastic with the lowbias32 hash of (element
index, seed), or Kahan-compensated), so the final cast is exact. 4-bit codes use the split-half packing of
`qmaps.pack_nibbles`, so every load and store is a contiguous run.

This module is the host side (which kernel steps a tensor, program tables, launches); the
kernels themselves are in _optim_adamw_triton.py and _optim_adamw4_rank1_triton.py.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from lowbit.kernels._optim_adamw4_rank1_triton import (
    adamw4bit_rank1_multi,
    rank1_swap_multi,
    v_rowcol_max_multi,
)
from lowbit.kernels._optim_adamw_triton import (
    M_LUT_BASE,
    M_LUT_N,
    adamw4bit_flat_multi,
    adamw8bit_multi,
    adamw32_multi,
)
from lowbit.optim import qmaps
from lowbit.optim.adamw import moment_seed
from lowbit.optim.rounding import step_seed
from lowbit.quant.rounding import seed_offset

ROUNDING_CODE = {"nearest": 0, "stochastic": 1, "kahan": 2}
# Launch shapes (the benchmark may sweep them). 8-bit and 4-bit flat: blocks per program, warps.
# 4-bit rank-1 pass 2: rows per tile (br4), segments per program (l4), warps (warps4r), register cap
# (maxnreg4, 0: none); with 16-byte vectors a [br4, 64] tile per nibble half fills a warp at br4 = 2
# per warp. Pass 1: rows per program (rb1), rows per iteration (br1), 128-column segments (s1), warps
# (warps1). "align": 16-byte vector hints when every address allows (0 turns them off, to compare).
# "fma4": let the compiler fuse multiply-adds in the 4-bit kernels (faster; 0 gives the reference's
# separately rounded products and sums, bit for bit on the GPU too; 2% slower). Measured on the
# H100 (docs/BENCHMARKS.md, "Optimizer step"): one 2-row tile per 1-warp program was the fastest
# pass 2 and capping it at 64 registers (72 uncapped, no spills) faster still, as more programs fit
# per SM; looping over segments was slower; pass 1 shapes differ by a few percent.
# Pass 2 instructions (807 SASS per 2-row tile on sm_90, was 948): "mlut4" codes the
# first moment by one table gather (_code16_lut) instead of 7 compares; "fast4" takes square roots
# and divisions by their fast paths with one range test per tile (_adam_fast; bit-identical results);
# "evict4" loads parameters and gradients with evict_first. "relax1": pass 1's maxima by relaxed
# integer atomics (_amax_nonneg) instead of fenced float ones. Each 0 restores the former code.
# Run D (docs/BENCHMARKS.md): pass 2 6.27 → 6.09 ms (code table −0.23, fast ops −0.12, evict_first
# +0.18: off), pass 1 2.07 → 1.70 ms (relaxed atomics) → 1.64 ms (4 rows per iteration, 80 registers
# instead of 164 at 8). "ns4" / "ns1": software-pipeline stages of pass 2's segment loop (with
# "l4" > 1) and pass 1's row loop (1: none). Run E: pass 1 1.64 → 1.62 / 1.60 ms at 2 / 3 stages;
# pass 2 with 4-8 segments per program and 2-3 stages 10.2-13.9 ms (was 6.08: 137-192 registers).
CONFIG = {"bpp8": 1, "warps8": 2, "bpp4": 4, "warps4": 4, "br4": 2, "l4": 1, "warps4r": 1, "maxnreg4": 64,
          "rb1": 256, "br1": 4, "s1": 2, "warps1": 2, "block32": 1024, "warps32": 4, "align": 1, "fma4": 1,
          "mlut4": 1, "fast4": 1, "evict4": 0, "relax1": 1, "ns4": 1, "ns1": 3}
SWAP_BLOCK = 1024


def kind_of(opt: Any, p: torch.Tensor) -> str | None:
    """Which fused kernel steps this parameter, or None for the torch path."""
    if not p.is_contiguous():
        return None
    if not opt._quantized(p):
        # fp32 params with fp32 states use torch's multi-tensor ops; BF16 ones need our rounding.
        return "32" if p.dtype == torch.bfloat16 else None
    if opt.state_bits == 8:
        return "8"
    if not opt._uses_rank1(p):
        return "4flat"
    return "4rank1" if (p.numel() // p.shape[0]) % 128 == 0 else None


def supports(opt: Any, p: torch.Tensor) -> bool:
    """Whether a fused kernel steps `p` under `opt`'s settings (else the torch reference does)."""
    return kind_of(opt, p) is not None


def _maps(table: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    pmid, lut, z = qmaps.search_lut(table)
    vals, _ = qmaps.table_on(table, device)
    pmid_d, lut_d = qmaps.table_on(pmid, device)[0], qmaps.table_on(lut, device)[0]
    return vals, lut_d, pmid_d, z


def _to_device(values: list, dev: torch.device) -> torch.Tensor:
    """int64 table → device without a sync (a pageable host→device copy would wait for the GPU to
    drain). Used only when a table changes (new tensor addresses), not per step: see `_upload`."""
    host = torch.tensor(values, dtype=torch.int64, pin_memory=dev.type == "cuda")
    return host.to(dev, non_blocking=True)


class _Staging:
    """Per-step uploads (the seeds) through pinned host buffers reused round-robin. A fresh pinned
    tensor per upload lets torch's host allocator grow (cudaHostAlloc) whenever the host runs ahead
    of the GPU, since blocks whose copies are still queued cannot be reused; waiting on a slot's
    event instead bounds the host to SLOTS uploads ahead of the GPU, with no allocation."""

    SLOTS = 8

    def __init__(self) -> None:
        self.slots: list[tuple[torch.Tensor, Any]] = []
        self.i = 0

    def upload(self, values: list[int], dev: torch.device) -> torch.Tensor:
        if dev.type != "cuda":
            return torch.tensor(values, dtype=torch.int64, device=dev)
        k = self.i % self.SLOTS
        self.i += 1
        n = len(values)
        if k >= len(self.slots) or self.slots[k][0].numel() < n:
            buf, ev = torch.empty(max(n, 1024), dtype=torch.int64, pin_memory=True), None
            if k < len(self.slots):
                self.slots[k] = (buf, ev)
            else:
                self.slots.append((buf, ev))
        buf, ev = self.slots[k]
        if ev is not None:
            ev.synchronize()  # the copy that last read this slot is done
        buf[:n] = torch.tensor(values, dtype=torch.int64)
        out = torch.empty(n, dtype=torch.int64, device=dev)
        out.copy_(buf[:n], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.slots[k] = (buf, ev)
        return out


_STAGING = _Staging()


def _progs(counts: list[tuple[int, int]], dev: torch.device) -> tuple[torch.Tensor, ...]:
    """(tensor, a, b) int32 per program, for tensors with (A_t, B_t) programs: a-major, b-minor, so
    that neighbouring programs walk along a row's segments (contiguous memory). Built with torch
    ops: a 1B-parameter model has millions of programs, too many for Python lists."""
    na = torch.tensor([a for a, _ in counts], dtype=torch.int64)
    nb = torch.tensor([b for _, b in counts], dtype=torch.int64)
    per = na * nb
    t = torch.repeat_interleave(torch.arange(len(counts)), per)
    local = torch.arange(int(per.sum())) - (torch.cumsum(per, 0) - per)[t]
    return tuple(x.to(torch.int32).to(dev) for x in (t, local // nb[t], local % nb[t]))


_PLANS: dict[tuple, dict] = {}


def _plan(kind: str, ps: list[torch.Tensor]) -> dict:
    """Program tables and (4-bit rank-1) flat scratch buffers for a list of tensors: they depend
    only on shapes, device and launch config, so they are built once and cached (and shared by
    optimizers with the same shapes: each step uses the buffers in stream order)."""
    c = CONFIG
    dev = ps[0].device
    key = (kind, str(dev), tuple(tuple(p.shape) for p in ps), tuple(sorted(c.items())))
    if key in _PLANS:
        return _PLANS[key]

    def i32(x: list) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int32).to(dev)

    ns = [p.numel() for p in ps]
    if kind == "32":
        counts = [(triton.cdiv(n, c["block32"]), 1) for n in ns]
    elif kind in ("8", "4flat"):
        block, bpp = (256, c["bpp8"]) if kind == "8" else (128, c["bpp4"])
        counts = [(triton.cdiv(triton.cdiv(n, block), bpp), 1) for n in ns]
    else:
        shapes = [(p.shape[0], n // p.shape[0]) for p, n in zip(ps, ns)]
        counts = [(triton.cdiv(r, c["br4"]), triton.cdiv(cols // 128, c["l4"])) for r, cols in shapes]
    pt, pa, pb = _progs(counts, dev)
    plan = {"prog_t": pt, "prog_a": pa, "prog_b": pb, "grid": pt.numel(),
            "numels": torch.tensor(ns, dtype=torch.int64).to(dev),
            "zeros": torch.zeros(len(ps), dtype=torch.int64, device=dev)}  # seeds when unused
    if kind == "4rank1":
        p1 = _progs([(triton.cdiv(r, c["rb1"]), triton.cdiv(cols // 128, c["s1"])) for r, cols in shapes],
                    dev)
        sw = _progs([(triton.cdiv(r + cols, SWAP_BLOCK), 1) for r, cols in shapes], dev)
        sizes = [r + cols for r, cols in shapes]
        offs = [sum(sizes[:i]) for i in range(len(sizes))]
        total = sum(sizes)
        plan.update(p1_t=p1[0], p1_a=p1[1], p1_b=p1[2], grid1=p1[0].numel(),
                    sw_t=sw[0], sw_a=sw[1], grid_sw=sw[0].numel(), flat_off=i32(offs),
                    nrows=i32([r for r, _ in shapes]), ncols=i32([cols for _, cols in shapes]),
                    # new maxima (pass 1), old maxima and reciprocals of the new (pass 2)
                    new=torch.empty(total, dtype=torch.float32, device=dev),
                    old=torch.empty(total, dtype=torch.float32, device=dev),
                    inv=torch.empty(total, dtype=torch.float32, device=dev))
    if len(_PLANS) > 64:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


_TABLES: dict[tuple, tuple[torch.Tensor, bool]] = {}


def _ptr_table(cols: tuple[list[torch.Tensor], ...], dev: torch.device) -> tuple[torch.Tensor, bool]:
    """Device int64 table of the operands' addresses (one row per operand), and whether all of them
    are multiples of 16 bytes (then the kernels may use vector loads). Cached by the addresses
    themselves: rebuilt (one pinned copy) only when a tensor moved, e.g. a fresh gradient buffer."""
    key = (str(dev), tuple(x.data_ptr() for col in cols for x in col))
    hit = _TABLES.get(key)
    if hit is None:
        if len(_TABLES) > 32:
            _TABLES.clear()
        T = len(cols[0])
        flat = list(key[1])
        tab = _to_device([flat[i * T:(i + 1) * T] for i in range(len(cols))], dev)
        hit = _TABLES[key] = (tab, all(a % 16 == 0 for a in flat))
    return hit


@functools.cache
def _check_m_map_symmetric() -> None:
    """The kernels code the 4-bit first moment with 7 compares (_code16_sym), which needs its
    midpoints to be ±7 values and a last one >= 1: true of qmaps.dynamic_map(4, True)."""
    mid = qmaps.midpoints(qmaps.dynamic_map(4, True)).tolist()
    if not (len(mid) == 15 and mid[14] >= 1.0 and all(mid[7 + k] == -mid[6 - k] > 0 for k in range(7))):
        raise AssertionError("4-bit first-moment map is not symmetric; _code16_sym does not apply")


@functools.cache
def _m_code_lut_host() -> torch.Tensor:
    """int64 table of _code16_lut: entry k covers the nonnegative floats whose bits >> 22 equal
    M_LUT_BASE + k, holds (count of positive first-moment midpoints below that interval) << 32 | bits
    of the one midpoint inside it (+inf when none). Checked: at most one midpoint per interval, none
    below the first one, none from the last one on (inputs are at most nextafter(1, 2))."""
    mid = qmaps.midpoints(qmaps.dynamic_map(4, True))[7:14]  # the 7 positive midpoints, mp_0..6
    bits = [int(b) for b in mid.view(torch.int32).tolist()]
    base, n = int(M_LUT_BASE), int(M_LUT_N)
    if any((b >> 22) < base for b in bits) or any((b >> 22) >= base + n - 1 for b in bits):
        raise AssertionError("4-bit first-moment midpoints outside the code table's keys")
    table = []
    for k in range(n):
        inside = [b for b in bits if (b >> 22) == base + k]
        if len(inside) > 1:
            raise AssertionError("two first-moment midpoints share a key of the code table")
        lo = sum(1 for b in bits if (b >> 22) < base + k)
        table.append((lo << 32) | (inside[0] if inside else 0x7F800000))
    return torch.tensor(table, dtype=torch.int64)


def m_code_lut(dev: torch.device) -> torch.Tensor:
    return _m_code_lut_on(str(dev))


@functools.cache
def _m_code_lut_on(dev: str) -> torch.Tensor:
    return _m_code_lut_host().to(dev)


def fast_ok(s: dict) -> bool:
    """Whether _adam_fast's tile test covers the denominators: eps in [2**-60, 16] and
    inv_bc2_sqrt <= 2**10 (then sqrt(v) * inv_bc2_sqrt + eps lies in [2**-60, 2**61) for v <= 2**100)."""
    return 2.0**-60 <= s["eps"] <= 16.0 and 0.0 <= s["inv_bc2_sqrt"] <= 2.0**10


def _interpreting() -> bool:
    from lowbit.kernels.quantize import interpret

    return interpret()


def fused_adamw_multi_(opt: Any, kind: str, items: list[tuple], s: dict) -> None:
    """One fused step of LowBitAdamW for `items` = [(param, grad, state, seed_args)] of one kind,
    sharing dtype and the per-step scalars `s`, in a few launches. `seed_args` are the arguments
    of `rounding.step_seed`, evaluated only when a kernel reads the seeds (stochastic rounding).

    Nothing here waits for the GPU or allocates pinned memory per step: program tables, scratch
    buffers and address tables are cached, and seeds go through reused pinned buffers."""
    ps = [it[0] for it in items]
    gs = [it[1].to(ps[0].dtype).contiguous() for it in items]
    sts = [it[2] for it in items]
    dev = ps[0].device
    bf16 = ps[0].dtype == torch.bfloat16
    pdt = tl.bfloat16 if bf16 else tl.float32
    rounding = ROUNDING_CODE[opt.bf16_rounding] if bf16 else 0
    plan = _plan(kind, ps)
    T = len(ps)
    # First-moment codes: stochastic rounding with its own stream (adamw.moment_seed), or nearest.
    m_sr = kind in ("4flat", "4rank1") and getattr(opt, "m_rounding", "nearest") == "stochastic"
    seeds = mseeds = plan["zeros"]
    if rounding == 1 or m_sr:  # the only readers of the seeds
        tensor_seeds = [step_seed(*it[3]) for it in items]
        vals = [seed_offset(x) for x in tensor_seeds]
        if m_sr:
            vals += [seed_offset(moment_seed(x)) for x in tensor_seeds]
        up = _STAGING.upload(vals, dev)
        seeds, mseeds = up[:T], (up[T:] if m_sr else up[:T])
    comps = [st.get("kahan_comp", p) for p, st in zip(ps, sts)]
    names = ("beta1", "omb1", "beta2", "omb2", "step_size", "inv_bc2_sqrt", "eps", "decay")
    scal = tuple(s[k] for k in names)
    c = CONFIG

    def col(k: str) -> list[torch.Tensor]:
        return [st[k] for st in sts]

    if kind == "32":
        ptrs, _ = _ptr_table((ps, gs, col("exp_avg"), col("exp_avg_sq"), comps), dev)
        adamw32_multi[(plan["grid"],)](
            ptrs, T, plan["prog_t"], plan["prog_a"], plan["numels"], seeds, *scal,
            BLOCK=c["block32"], PDT=pdt, P_BF16=bf16, ROUNDING=rounding, num_warps=c["warps32"])
        return
    mq, ma, vq = col("exp_avg_codes"), col("exp_avg_absmax"), col("exp_avg_sq_codes")
    if kind == "8":
        mtab, mlut, mpmid, mz = _maps(qmaps.dynamic_map(8, True), dev)
        vtab, vlut, vpmid, _ = _maps(qmaps.dynamic_map(8, False), dev)
        ptrs, _ = _ptr_table((ps, gs, mq, ma, vq, col("exp_avg_sq_absmax"), comps), dev)
        adamw8bit_multi[(plan["grid"],)](
            ptrs, T, plan["prog_t"], plan["prog_a"], plan["numels"], seeds,
            mtab, mlut, mpmid, vtab, vlut, vpmid, *scal, BPP=c["bpp8"], MZ=mz,
            PDT=pdt, P_BF16=bf16, ROUNDING=rounding, num_warps=c["warps8"])
        return
    _check_m_map_symmetric()
    mtab, mmid = qmaps.table_on(qmaps.dynamic_map(4, True), dev)
    nd = qmaps.distinct_count(qmaps.dynamic_map(4, True))
    fma = bool(c["fma4"])
    mlut, use_lut = m_code_lut(dev), bool(c["mlut4"])
    if kind == "4flat":
        ptrs, _ = _ptr_table((ps, gs, mq, ma, vq, col("exp_avg_sq_absmax"), comps), dev)
        adamw4bit_flat_multi[(plan["grid"],)](
            ptrs, T, plan["prog_t"], plan["prog_a"], plan["numels"], seeds, mseeds, mtab, mmid, mlut, *scal,
            BPP=c["bpp4"], PDT=pdt, P_BF16=bf16, ROUNDING=rounding, M_SR=m_sr, ND=nd, MLUT=use_lut,
            num_warps=c["warps4"], enable_fp_fusion=fma)
        return
    # Rank-1 second moment: pass 1 (new row/column maxima into plan["new"]), the swap (state ←
    # new maxima, plan["old"] ← old ones, plan["inv"] ← reciprocals), pass 2 (everything else).
    ptrs, aligned = _ptr_table((ps, gs, mq, ma, vq, col("exp_avg_sq_row"), col("exp_avg_sq_col"), comps), dev)
    align = aligned and bool(c["align"])
    shape_args = (plan["nrows"], plan["ncols"], plan["flat_off"])
    plan["new"].zero_()
    v_rowcol_max_multi[(plan["grid1"],)](
        ptrs, T, plan["p1_t"], plan["p1_a"], plan["p1_b"], *shape_args, plan["new"], s["beta2"], s["omb2"],
        RB=c["rb1"], BR=c["br1"], S=c["s1"], PDT=pdt, ALIGN=align, RELAXED=bool(c["relax1"]), NS=c["ns1"],
        num_warps=c["warps1"], enable_fp_fusion=fma)
    rank1_swap_multi[(plan["grid_sw"],)](
        ptrs, T, plan["sw_t"], plan["sw_a"], *shape_args, plan["new"], plan["old"], plan["inv"],
        BLOCK=SWAP_BLOCK, num_warps=4)
    adamw4bit_rank1_multi[(plan["grid"],)](
        ptrs, T, plan["prog_t"], plan["prog_a"], plan["prog_b"], *shape_args, plan["old"], plan["inv"],
        seeds, mseeds, mtab, mmid, mlut, *scal, BR=c["br4"], L=c["l4"], PDT=pdt, P_BF16=bf16,
        ROUNDING=rounding, M_SR=m_sr, ND=nd, ALIGN=align, MLUT=use_lut, FAST=bool(c["fast4"]) and fast_ok(s),
        ASM=not _interpreting(), EVICT="evict_first" if c["evict4"] else "", NS=c["ns4"],
        num_warps=c["warps4r"], enable_fp_fusion=fma,
        **({"maxnreg": c["maxnreg4"]} if c["maxnreg4"] else {}))
