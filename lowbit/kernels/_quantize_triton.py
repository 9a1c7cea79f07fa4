"""Triton side of the fused quantize kernel (imported lazily: lowbit imports without Triton):
tile loads, the kernel's branches per group shape, launch shapes. The element and scale math is
in _quant_math_triton.py; see lowbit/kernels/quantize.py for what the kernel computes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels import quantize as kq
from lowbit.kernels._hadamard_triton import _rotate_tile, rotation_constants
from lowbit.kernels._quant_math_triton import _e2m1_magnitude, _quant_tile, _scaled, _scales, _tensor_scale
from lowbit.kernels.fast_launch import aligned
from lowbit.kernels.launch import launchable, seed_args
from lowbit.kernels.quantize import interpret
from lowbit.quant.formats import ElementFormat


@triton.jit
def _load_tile(x_ptr, rows, cols, R, K, sxr, sxk, TRANS: tl.constexpr, EV: tl.constexpr):
    # [BR, BC] fp32 tile; zeros outside the matrix (they never raise an amax). EV: the load's L2
    # eviction policy ("": the default; long rows' two reads, see _quantize_kernel).
    if TRANS:  # rows are the contiguous axis (X^T of a row-major X): load [BC, BR], coalesced
        m = (cols[:, None] < K) & (rows[None, :] < R)
        p = x_ptr + cols.to(tl.int64)[:, None] * sxk + rows.to(tl.int64)[None, :] * sxr
        return tl.trans(tl.load(p, m, other=0.0, eviction_policy=EV).to(tl.float32))
    else:
        m = (rows[:, None] < R) & (cols[None, :] < K)
        p = x_ptr + rows.to(tl.int64)[:, None] * sxr + cols.to(tl.int64)[None, :] * sxk
        return tl.load(p, m, other=0.0, eviction_policy=EV).to(tl.float32)


@triton.jit
def _abs_bits(x):
    # |x| as int32 bits: integer max orders them like floats and keeps NaN (> Inf) on top, so one
    # integer reduction gives an amax that propagates NaN as the reference's does.
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _store_codes(d_ptr, codes, rows, cols, c0, R, K, sdr, BR: tl.constexpr, BC: tl.constexpr,
                 PACK: tl.constexpr):
    if PACK:  # element 2i in the low nibble
        lo, hi = tl.split(tl.reshape(codes, [BR, BC // 2, 2]))
        pc = c0 // 2 + tl.arange(0, BC // 2)
        m = (rows[:, None] < R) & (pc[None, :] < K // 2)
        tl.store(d_ptr + rows[:, None].to(tl.int64) * sdr + pc[None, :], (lo | (hi << 4)).to(tl.uint8), m)
    else:
        m = (rows[:, None] < R) & (cols[None, :] < K)
        tl.store(d_ptr + rows[:, None].to(tl.int64) * sdr + cols[None, :], codes.to(tl.uint8), m)


@triton.jit
def _load_rotated(x_ptr, rows, cols, R, K, sxr, sxk, sign_off, TRANS: tl.constexpr, BR: tl.constexpr,
                  BC: tl.constexpr, HAD: tl.constexpr, LOG: tl.constexpr, SCALE: tl.constexpr,
                  SIGNS: tl.constexpr, GMODE: tl.constexpr, EV: tl.constexpr):
    # The tile, Hadamard-rotated in blocks of HAD along K when HAD > 1 (_hadamard_triton.py; the
    # shuffle form measured faster next to 1-D groups, the split/join form next to rows).
    x = _load_tile(x_ptr, rows, cols, R, K, sxr, sxk, TRANS, EV)
    return _rotate_tile(x, cols, sign_off, BR, BC, HAD, LOG, SCALE, SIGNS, GMODE == 0)


@triton.jit
def _load_words(x_ptr, rows, hc, R, K, sxr, EV: tl.constexpr):
    # Packed 4-bit codes of a bf16 matrix: each int32 word holds elements 2c (low half) and 2c + 1
    # (high half), which become one byte's two nibbles. Loading words and splitting them into the
    # even and odd columns by shifts (bf16 -> fp32 is exact as a shift) needs no register shuffle
    # to pair the nibbles up (the [BR, BC // 2, 2] split of _store_codes). -> (even, odd, mask).
    wm = (rows[:, None] < R) & (hc[None, :] < K // 2)
    wp = x_ptr.to(tl.pointer_type(tl.int32)) + rows.to(tl.int64)[:, None] * (sxr // 2) + hc[None, :]
    w = tl.load(wp, wm, other=0, eviction_policy=EV)
    return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True), wm


@triton.jit
def _word_key(rows, hc, K, seed_off):
    # Noise-hash keys of the even elements of words hc (odd: + 1), kept as the hash's uint32 key
    # (index + seed offset) mod 2^32: one 32-bit add per element instead of int64 arithmetic
    # (SR only; unused else).
    return (rows.to(tl.int64) * K + seed_off).to(tl.uint32)[:, None] + (2 * hc).to(tl.uint32)[None, :]


@triton.jit
def _word_codes(xe, xo, eff, ie, seed_off, KIND_INT: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                EMAX: tl.constexpr, FMAX: tl.constexpr, HAS_INF: tl.constexpr, ENC: tl.constexpr,
                SR: tl.constexpr, SMODE: tl.constexpr, HW_FP8: tl.constexpr, DIV: tl.constexpr):
    # One byte per word: the even element's code in the low nibble, the odd one's in the high.
    if ENC == 3 and not SR:
        # FP4 rounded to nearest, in ~3 fewer integer ops an element than _quant_tile's codes (this
        # kernel is ALU-bound for FP4): the magnitudes' codes from |x| scaled (where the group amax
        # came from the same tile, |x|'s bits are shared with it); both signs straight from x's
        # bits (y = x / scale keeps x's sign);
        # and no per-element NaN test: every byte of a group whose divisor is NaN (a NaN or Inf in
        # the group, or a NaN tensor scale) or 0 (an NVFP4 block scale that underflowed) is cleared
        # by one AND, as the reference stores code 0 for all of them (+0 for the zero blocks).
        be = xe.to(tl.int32, bitcast=True)
        bo = xo.to(tl.int32, bitcast=True)
        ae = (be & 0x7FFFFFFF).to(tl.float32, bitcast=True)
        ao = (bo & 0x7FFFFFFF).to(tl.float32, bitcast=True)
        me = _e2m1_magnitude(_scaled(ae, eff, SMODE, DIV).to(tl.int32, bitcast=True))
        mo = _e2m1_magnitude(_scaled(ao, eff, SMODE, DIV).to(tl.int32, bitcast=True))
        keep = tl.where((eff == eff) & (eff != 0.0), 0xFF, 0)
        sign = ((be >> 28) & 8) | ((bo >> 24) & 0x80)
        return ((me | (mo << 4) | sign) & keep).to(tl.uint8)
    ce = _quant_tile(xe, eff, ie, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, SR, SMODE,
                     HW_FP8, False, DIV)
    co = _quant_tile(xo, eff, ie + 1, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, SR, SMODE,
                     HW_FP8, False, DIV)
    return (ce | (co << 4)).to(tl.uint8)


@triton.jit
def _chunk(i, n, REVERSE: tl.constexpr):
    # The i-th of n chunks a long row's second read visits: last first when REVERSE (the chunks
    # read last by the first pass are the likeliest still in L2).
    if REVERSE:
        return n - 1 - i
    else:
        return i


@triton.jit(do_not_specialize=["seed_off", "sign_off"])
def _quantize_kernel(
    x_ptr, d_ptr, s_ptr, ts_ptr, ga_ptr, ta_ptr, R, K, sxr, sxk, sdr, ssr, ssc, seed_off, sign_off,
    MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, FMAX: tl.constexpr,
    HAS_INF: tl.constexpr, KIND_INT: tl.constexpr, ENC: tl.constexpr, PACK: tl.constexpr,
    SMODE: tl.constexpr, GMODE: tl.constexpr, SR: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, G: tl.constexpr, BLK_R: tl.constexpr, BLK_C: tl.constexpr,
    TRANS: tl.constexpr, HW_FP8: tl.constexpr,
    ONE_TILE: tl.constexpr, WORDS: tl.constexpr, REVERSE: tl.constexpr, EV1: tl.constexpr,
    EV2: tl.constexpr, HAD: tl.constexpr, LOG: tl.constexpr, SCALE: tl.constexpr, SIGNS: tl.constexpr,
    DIV: tl.constexpr, FLIP: tl.constexpr, SEED_PTR: tl.constexpr = False,
):
    if SEED_PTR:  # the offsets are one-element int64 tensors (lowbit.kernels.launch.seed_args)
        seed_off = tl.load(seed_off)
        sign_off = tl.load(sign_off)
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    if FLIP:  # tiles last-first: the amax pre-pass read the last tiles last (likeliest in L2)
        pid_r = tl.num_programs(0) - 1 - pid_r
        pid_c = tl.num_programs(1) - 1 - pid_c
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < R
    t_amax = 1.0
    if SMODE == 3:
        t_amax = tl.load(ta_ptr)  # the data's own amax (NVFP4 tensor scale), not an override
    if GMODE == 1 and not ONE_TILE and WORDS:  # a long row of packed codes read as words (below)
        H: tl.constexpr = BC // 2
        amax = tl.zeros([BR], tl.int32)
        for h0 in range(0, K // 2, H):
            xe, xo, wm = _load_words(x_ptr, rows, h0 + tl.arange(0, H), R, K, sxr, EV1)
            amax = tl.maximum(amax, tl.maximum(tl.max(_abs_bits(xe), axis=1), tl.max(_abs_bits(xo), axis=1)))
        s, eff = _scales(amax.to(tl.float32, bitcast=True), t_amax, FMAX, EMAX, SMODE)
        tl.store(s_ptr + rows * ssr, s, rmask)
        nh = tl.cdiv(K // 2, H)
        for i in range(0, nh):
            hc = _chunk(i, nh, REVERSE) * H + tl.arange(0, H)
            xe, xo, wm = _load_words(x_ptr, rows, hc, R, K, sxr, EV2)
            b = _word_codes(xe, xo, eff[:, None], _word_key(rows, hc, K, seed_off), seed_off, KIND_INT, MBITS,
                            EMIN, EMAX, FMAX, HAS_INF, ENC, SR, SMODE, HW_FP8, DIV)
            tl.store(d_ptr + rows.to(tl.int64)[:, None] * sdr + hc[None, :], b, wm)
    elif GMODE == 1 and not ONE_TILE:  # long row: amax over the row, then quantize (re-read from L2)
        amax = tl.zeros([BR], tl.int32)
        for k0 in range(0, K, BC):
            cols = k0 + tl.arange(0, BC)
            x = _load_rotated(x_ptr, rows, cols, R, K, sxr, sxk, sign_off, TRANS, BR, BC, HAD, LOG, SCALE,
                              SIGNS, GMODE, EV1)
            amax = tl.maximum(amax, tl.max(_abs_bits(x), axis=1))
        amax = amax.to(tl.float32, bitcast=True)
        s, eff = _scales(amax, t_amax, FMAX, EMAX, SMODE)
        tl.store(s_ptr + rows * ssr, s, rmask)
        nch = tl.cdiv(K, BC)
        for i in range(0, nch):
            k0 = _chunk(i, nch, REVERSE) * BC
            cols = k0 + tl.arange(0, BC)
            x = _load_rotated(x_ptr, rows, cols, R, K, sxr, sxk, sign_off, TRANS, BR, BC, HAD, LOG, SCALE,
                              SIGNS, GMODE, EV2)
            idx = rows.to(tl.int64)[:, None] * K + cols[None, :]
            codes = _quant_tile(x, eff[:, None], idx, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF,
                                ENC, SR, SMODE, HW_FP8, TRANS, DIV)
            _store_codes(d_ptr, codes, rows, cols, k0, R, K, sdr, BR, BC, PACK)
    elif WORDS:  # packed 1-D groups, or a row in one tile (G == BC then: one group per tile row)
        H: tl.constexpr = BC // 2
        NG: tl.constexpr = BC // G
        hc = pid_c * H + tl.arange(0, H)
        xe, xo, wm = _load_words(x_ptr, rows, hc, R, K, sxr, "")
        ie = _word_key(rows, hc, K, seed_off)
        if NG == 1:  # one group per row of the tile: 2-D (see _quant_tile on reshapes)
            amax = tl.maximum(tl.max(_abs_bits(xe), axis=1), tl.max(_abs_bits(xo), axis=1))
            s, eff = _scales(amax.to(tl.float32, bitcast=True), t_amax, FMAX, EMAX, SMODE)
            tl.store(s_ptr + rows * ssr + pid_c * ssc, s, rmask)
            b = _word_codes(xe, xo, eff[:, None], ie, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF,
                            ENC, SR, SMODE, HW_FP8, DIV)
        else:
            GH: tl.constexpr = G // 2
            xe3 = tl.reshape(xe, [BR, NG, GH])
            xo3 = tl.reshape(xo, [BR, NG, GH])
            amax = tl.maximum(tl.max(_abs_bits(xe3), axis=2), tl.max(_abs_bits(xo3), axis=2))
            s, eff = _scales(amax.to(tl.float32, bitcast=True), t_amax, FMAX, EMAX, SMODE)
            gcols = pid_c * NG + tl.arange(0, NG)
            gm = rmask[:, None] & (gcols[None, :] < (K + G - 1) // G)
            tl.store(s_ptr + rows[:, None] * ssr + gcols[None, :] * ssc, s, gm)
            b = tl.reshape(_word_codes(xe3, xo3, eff[:, :, None], tl.reshape(ie, [BR, NG, GH]), seed_off,
                                       KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, SR, SMODE, HW_FP8,
                                       DIV), [BR, H])
        tl.store(d_ptr + rows.to(tl.int64)[:, None] * sdr + hc[None, :], b, wm)
    else:
        cols = pid_c * BC + tl.arange(0, BC)
        x = _load_rotated(x_ptr, rows, cols, R, K, sxr, sxk, sign_off, TRANS, BR, BC, HAD, LOG, SCALE, SIGNS,
                          GMODE, "")
        idx = rows.to(tl.int64)[:, None] * K + cols[None, :]
        if GMODE == 1 or BC == G:  # a row that fits one tile (one read), or one 1-D group per row:
            # 2-D; a row's program has pid_c == 0, so both store their scale at rows * ssr.
            amax = tl.max(_abs_bits(x), axis=1).to(tl.float32, bitcast=True)
            s, eff = _scales(amax, t_amax, FMAX, EMAX, SMODE)
            tl.store(s_ptr + rows * ssr + pid_c * ssc, s, rmask)
            codes = _quant_tile(x, eff[:, None], idx, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX,
                                HAS_INF, ENC, SR, SMODE, HW_FP8, TRANS, DIV)
        elif GMODE == 0:  # several 1-D groups of G along K: the tile reshaped once to [BR, NG, G]
            NG: tl.constexpr = BC // G
            x3 = tl.reshape(x, [BR, NG, G])
            amax = tl.max(_abs_bits(x3), axis=2).to(tl.float32, bitcast=True)
            s, eff = _scales(amax, t_amax, FMAX, EMAX, SMODE)
            gcols = pid_c * NG + tl.arange(0, NG)
            gm = rmask[:, None] & (gcols[None, :] < (K + G - 1) // G)
            tl.store(s_ptr + rows[:, None] * ssr + gcols[None, :] * ssc, s, gm)
            codes = tl.reshape(_quant_tile(x3, eff[:, :, None], tl.reshape(idx, [BR, NG, G]), seed_off,
                                           KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, SR, SMODE,
                                           HW_FP8, TRANS, DIV), [BR, BC])
        else:
            if GMODE == 2:  # tensor: amax from the pre-pass (or the delayed-scaling history)
                amax = tl.load(ga_ptr) + tl.zeros([1, 1], tl.float32)
                s, eff = _scales(amax, t_amax, FMAX, EMAX, SMODE)
                if (pid_r == 0) & (pid_c == 0):
                    tl.store(s_ptr + tl.zeros([1, 1], tl.int32), s)
            elif BLK_R == BR and BLK_C == BC:  # one 2-D block: this program's whole tile
                a = tl.max(tl.max(_abs_bits(x), axis=1), axis=0).to(tl.float32, bitcast=True)
                s, eff = _scales(a + tl.zeros([1, 1], tl.float32), t_amax, FMAX, EMAX, SMODE)
                tl.store(s_ptr + pid_r * ssr + pid_c * ssc + tl.zeros([1, 1], tl.int32), s)
            else:  # small 2-D blocks (NVFP4's 16 x 16): several per tile, as [NBR, BLK_R, NBC, BLK_C]
                NBR: tl.constexpr = BR // BLK_R
                NBC: tl.constexpr = BC // BLK_C
                a = tl.max(tl.max(tl.reshape(_abs_bits(x), [NBR, BLK_R, NBC, BLK_C]), axis=3), axis=1)
                s, e = _scales(a.to(tl.float32, bitcast=True), t_amax, FMAX, EMAX, SMODE)
                br_ = pid_r * NBR + tl.arange(0, NBR)
                bc_ = pid_c * NBC + tl.arange(0, NBC)
                bm = (br_[:, None] < (R + BLK_R - 1) // BLK_R) & (bc_[None, :] < (K + BLK_C - 1) // BLK_C)
                tl.store(s_ptr + br_[:, None] * ssr + bc_[None, :] * ssc, s, bm)
                eff = tl.reshape(tl.broadcast_to(e[:, None, :, None], [NBR, BLK_R, NBC, BLK_C]), [BR, BC])
            codes = _quant_tile(x, eff, idx, seed_off, KIND_INT, MBITS, EMIN, EMAX, FMAX, HAS_INF, ENC, SR,
                                SMODE, HW_FP8, TRANS, DIV)
        _store_codes(d_ptr, codes, rows, cols, pid_c * BC, R, K, sdr, BR, BC, PACK)
    if SMODE == 3:
        if (pid_r == 0) & (pid_c == 0):
            t = _tensor_scale(t_amax, FMAX) + tl.zeros([1], tl.float32)
            tl.store(ts_ptr + tl.zeros([1], tl.int32), t)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# Tile sizes: elements per program (GPU; the interpreter takes the same shapes, just slower).
TILE_ELEMS = 4096
# Columns per program for unrotated 1-D groups (MX/NV/int groups). H100 sweep (run 101 of
# docs/BENCHMARKS.md, `benchmarks/tile_sweep.py quantize`, device time): 128-512 columns x
# 4096-16384 elements on 4 or 8 warps moved MXFP4 / MXFP4-SR / NVFP4 by at most 0.01 of a copy,
# MXFP8 by +0.02 at most: left at 128.
GROUP_COLS = 128
# Row scaling: rows up to ROW_CHUNK elements are held in registers whole (one read); longer rows
# are read twice in ROW_CHUNK pieces (amax, then quantize; the second read mostly from L2). H100,
# `benchmarks/quantize_bw.py --graph --ab "ROW_CHUNK=4096;8192"` (run 169 of docs/BENCHMARKS.md,
# both settings interleaved in one process, bit-exact): 8192 over 4096 took rows of 14336 from 0.92
# / 0.83 / 0.72 of a copy to 0.99 / 0.93 / 0.78 (fp8 / int8 / int4) and rows of 8192 (now one
# tile) from 0.98 / 0.91 / 0.81 to 1.00 / 0.96 / 0.89; 16384 (a whole row of 14336 in one tile) gave
# fp8 rows of 14336 0.73, integer rows within 0.02 of 8192. (Runs 34 and 133, before the integer
# codes from fp32 bits and _div_scale, had found 8192 no better than 4096.) With _div_scale's
# bounded division free of its branch (twenty-fourth pass), 16384 over 8192 (run 210, `quantize_bw.py
# --ab "ROW_CHUNK=8192;16384" --shapes 8192x14336 --specs int8_row,int4_row,fp8_row`, CUDA graphs,
# bit-exact): rows of 14336 in one tile, one read, 0.81 / 0.85 / 0.80 -> 1.00 / 0.91 / 1.01 of a
# copy (int8 / int4 / fp8), with 161 / 167 / 128 registers and no spills (Triton 3.6, sm_90,
# benchmarks/offline_sass.py). Rows rotated by a fused Hadamard keep 4096 (ROTATED_ROW_CHUNK): 8192
# was not measured for them.
ROW_CHUNK = 16384
ROTATED_ROW_CHUNK = 4096
# Rotated (Hadamard) 1-D-group tiles: columns and elements per program, and warps (0: as
# unrotated). Knobs for sweeps: H100 run 60 tried 16-512 columns, 2048-8192 elements, 4 or 8 warps,
# and none moved the fused kernel beyond +-0.03 of a copy (docs/BENCHMARKS.md, seventh pass).
ROTATED_COLS = 128
ROTATED_ELEMS = 4096
ROTATED_WARPS = 0
# Rotated views not contiguous along K (strided tile loads): rows x columns per program, warps
# (0: as unrotated). H100 sweep (run 86, X^T of 8192 x 4096 and 8192 x 14336, MXFP4 and NVFP4
# with SR): 8 x 512 on 8 warps best or within 5% of it among 4 x 1024 to 128 x 32 on 4 or 8 warps.
STRIDED_TILE = (8, 512)
STRIDED_WARPS = 8
# Long rows' two reads (rows wider than ROW_CHUNK): the second visits the chunks last-first
# (LONG_ROW_REVERSE), and the two reads' L2 eviction policies (LONG_ROW_EVICT: "" for the default,
# or the first read's and the second's, e.g. ("evict_last", "evict_first")).
LONG_ROW_REVERSE = False
LONG_ROW_EVICT = ("", "")
# Packed (fp4/int4) 1-D groups and rows of a bf16 matrix read as int32 words of two elements.
PAIRED_WORDS = True
# Divisions by fp32 scales (and NVFP4's e4m3 x fp32) as a reciprocal per group and one fma
# correction an element (_quant_math_triton._div_scale), bit-identical to the IEEE division.
FAST_DIVISION = True
# Tiles whose scales hang on a tensor amax read by a pre-pass (NVFP4; a tensor scale of the data's
# own) are visited last-first: the pre-pass read the last tiles last, so those may still be in L2.
TENSOR_AMAX_FLIP = True


# Warps of a 2-D tile program (128 x 128 weight blocks: 16384 elements). H100 sweep (run 43 of
# docs/BENCHMARKS.md), device time: 16 warps 0.86-0.91 of a copy on four shapes; 4 and 8 warps
# 0.68-0.83, 32 warps 0.64-0.68.
TILE2D_WARPS = 16
# 2-D blocks smaller than TILE_ELEMS (NVFP4 weights' 16 x 16) are grouped into tiles of this many
# rows x columns (columns x rows for an X^T read); one block per program ran at 0.21 of a copy
# (run 137).
TILE2D_SMALL = (16, 256)


# Warps of a row program, for fp8 and for integer rows: a row in one tile (ROW_WARPS), a longer
# row read twice in ROW_CHUNK-wide chunks (LONG_ROW_WARPS). Measured with 4096-wide chunks: fp8 8
# (runs 34 and 44: 0.97 of a copy at 4096 wide, 0.84 against 0.80 at 14336); int 4 in one tile,
# 8 for long rows (run 148, with _div_scale's division: int8 / int4 rows of 14336 0.82 / 0.70 of a
# copy on 8 warps against 0.72 / 0.66 on 4, and 0.76 / 0.60 on 16 in run 168; rows of 4096 0.94 /
# 0.83 on 8 against 0.97 / 0.89 on 4).
ROW_WARPS = (8, 4)
LONG_ROW_WARPS = (8, 8)


def _warps(gmode: int, br: int, bc: int, enc: int, one_tile: bool) -> int:
    if gmode == 3 and br * bc > 4096:
        return TILE2D_WARPS
    if gmode == 1 and br == 1:
        warps = ROW_WARPS if one_tile else LONG_ROW_WARPS
        return warps[0] if enc in (0, 1) else warps[1]
    return 8 if br * bc > 4096 else 4


def launch(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, tscale: torch.Tensor | None,
           g_amax: torch.Tensor | None, t_amax: torch.Tensor | None, fmt: ElementFormat, enc: int,
           packed: bool, smode: int, gmode: int, block, sr: bool, seed_off: int | torch.Tensor,
           hadamard: int = 1, sign_off: int | torch.Tensor | None = None, own_amax: bool = True) -> None:
    """Quantize x2 into the given buffers (quantize.py's quantize_2d allocates them). `hadamard`
    > 1 rotates K in blocks of that size first (random signs from `sign_off` when given); the
    caller checks that the tiles below hold whole blocks (K a multiple of it, 2-D tiles' widths).
    `own_amax`: g_amax is x2's own (not an override), so x2 / scale is bounded."""
    r, k = x2.shape
    kp, rp = _next_pow2(k), _next_pow2(r)
    # A rotated view not contiguous along K is loaded by plain strided tiles (quantize.py's
    # ROTATED_STRIDED_READ); other such views (X^T, rows contiguous) as [BC, BR] tiles transposed
    # in registers (TRANSPOSED_READ): make BR wide.
    strided = x2.stride(1) != 1 and hadamard > 1 and kq.ROTATED_STRIDED_READ
    trans = x2.stride(1) != 1 and x2.stride(0) == 1 and r > 1 and not strided
    g = int(block) if gmode == 0 else 1
    if gmode == 3:
        br, bc = int(block[0]), int(block[1])
        if br * bc < TILE_ELEMS:  # small blocks: several whole blocks per program (TILE2D_SMALL,
            # capped by the matrix's padded size; all powers of two, so whole blocks still)
            tr, tc = TILE2D_SMALL[::-1] if trans else TILE2D_SMALL
            br, bc = max(br, min(rp, tr)), max(bc, min(kp, tc))
    elif strided:
        bc = max(g, hadamard, min(kp, STRIDED_TILE[1]))
        br = max(1, min(rp, STRIDED_TILE[0] * STRIDED_TILE[1] // bc))
    elif trans:
        br = max(1, min(rp, 64))
        bc = max(g, hadamard, min(kp, TILE_ELEMS // br))
    else:
        if gmode == 1:
            chunk = ROTATED_ROW_CHUNK if hadamard > 1 else ROW_CHUNK
        else:
            chunk = ROTATED_COLS if hadamard > 1 else GROUP_COLS
        bc = max(g, 2, hadamard, min(kp, chunk))
        br = max(1, min(rp, (ROTATED_ELEMS if hadamard > 1 else TILE_ELEMS) // bc))
    one_tile = gmode == 1 and bc >= k
    # bf16 words of two elements for packed 1-D groups and rows (see the kernel's _load_words).
    words = (PAIRED_WORDS and packed and hadamard == 1 and gmode in (0, 1) and not trans
             and x2.dtype == torch.bfloat16
             and x2.stride(1) == 1 and x2.stride(0) % 2 == 0 and aligned(x2, 4))
    if words and gmode == 1:
        g = bc  # a row in one tile is the words branch's one group per tile row
    grid = (triton.cdiv(r, br), 1 if gmode == 1 else triton.cdiv(k, bc))
    # The division's form: none for transposed tiles (_quant_tile) or a scale broadcast per element
    # (small 2-D blocks); a guarded one where an outside tensor amax leaves quotients unbounded.
    small_blocks = gmode == 3 and (br, bc) != (int(block[0]), int(block[1]))
    div = 0 if not FAST_DIVISION or trans or small_blocks else (2 if gmode == 2 and not own_amax else 1)
    flip = TENSOR_AMAX_FLIP and gmode != 1 and (smode == 3 or (gmode == 2 and own_amax))
    warps = ((strided and STRIDED_WARPS) or (hadamard > 1 and ROTATED_WARPS)
             or _warps(gmode, br, bc, enc, one_tile))
    dummy = scale
    (seed_arg, sign_arg), on_device = seed_args(seed_off, sign_off)
    launchable(_quantize_kernel)[grid](
        x2, data, scale, tscale if tscale is not None else dummy,
        g_amax if g_amax is not None else dummy, t_amax if t_amax is not None else dummy,
        r, k, x2.stride(0), x2.stride(1), data.stride(0), scale.stride(0), scale.stride(1),
        seed_arg, sign_arg,
        MBITS=fmt.mbits, EMIN=fmt.emin, EMAX=fmt.emax, FMAX=float(fmt.max), HAS_INF=fmt.has_inf,
        KIND_INT=fmt.kind == "int", ENC=enc, PACK=packed, SMODE=smode, GMODE=gmode, SR=sr,
        BR=br, BC=bc, G=g, BLK_R=int(block[0]) if gmode == 3 else 1, BLK_C=int(block[1]) if gmode == 3 else 1,
        TRANS=trans, HW_FP8=not interpret(), ONE_TILE=one_tile, WORDS=words,
        REVERSE=LONG_ROW_REVERSE, EV1=LONG_ROW_EVICT[0], EV2=LONG_ROW_EVICT[1], DIV=div, FLIP=flip,
        SIGNS=sign_off is not None, SEED_PTR=on_device, **rotation_constants(hadamard), num_warps=warps,
    )
