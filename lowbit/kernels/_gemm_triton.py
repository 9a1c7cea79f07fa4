"""Triton side of the block-scaled GEMM (imported lazily; see lowbit/kernels/gemm.py).

out[m, n] = sum_k qa[m, k] * sa(m, k) * qb[n, k] * sb(n, k), accumulated in fp32 (int32 for int
operands inside a scale group). Per operand the scale is one of
    tensor  one fp32 scalar                           -> applied in the epilogue
    row     one fp32 per row                          -> applied in the epilogue
    group   one fp32 per (row // RD, k // G)          -> applied per scale group to the fp32
            partial product of that group, in registers (MX: G=32, blockwise: G=128, 2-D tiles RD>1)
and NVFP4's fp32 tensor scales multiply in the epilogue. Scales are read through (row, group)
strides; the quantize kernel stores group scales group-major so one group's scales are contiguous.

Compute paths (COMPUTE):
    0  fp8 tensor cores: fp8 operands as stored, fp4 (E2M1) codes widened to E4M3 bit patterns in
       registers (every E2M1 value is exact in E4M3), tl.dot -> fp32.
    1  bf16 tensor cores with the group scales multiplied into the operands first (exact: an E2M1
       or E4M3 value times an E4M3 or power-of-two scale fits bf16's 8-bit significand); used
       when G = 16 (NVFP4), which is below the fp8 MMA's K of 32.
    2  int8 tensor cores: int8 as stored, int4 nibbles sign-extended to int8, int32 accumulation.
A K step covers SPLIT scale groups (BK = G * SPLIT; autotuned). Packed operands (two codes a byte,
element 2i low) are widened in registers with tl.join (an earlier permuted-K gather that avoided
the join measured 4-5x slower on the H100).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fp4_to_e4m3_bits(c):
    # E2M1 code (s ee m) -> E4M3 byte: magnitudes 0, .5 and 1..6 map to 0x00, 0x30, 0x38 + 4*(m-2).
    m = c & 7
    bits = tl.where(m < 2, m * 0x30, (m << 2) + 0x30)
    return bits | ((c & 8) << 4)


@triton.jit
def _load_operand(ptr, rows, R, stride, k0, K, BR: tl.constexpr, W: tl.constexpr, ELEM: tl.constexpr):
    # [BR, W] tile of the K-last operand from element k0, read as bytes: e4m3 (0) / packed fp4 (1) /
    # int8 (2) / packed int4 (3) / e5m2 (4).
    rmask = rows[:, None] < R
    roff = rows.to(tl.int64)[:, None] * stride
    if ELEM == 1 or ELEM == 3:
        cb = k0 // 2 + tl.arange(0, W // 2)
        byte = tl.load(ptr + roff + cb[None, :], rmask & (cb[None, :] < K // 2), other=0).to(tl.int32)
        lo = byte & 0xF
        hi = byte >> 4
        if ELEM == 1:
            lo = _fp4_to_e4m3_bits(lo)
            hi = _fp4_to_e4m3_bits(hi)
            codes = tl.reshape(tl.join(lo, hi), [BR, W])  # element 2i was the low nibble
            return codes.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
        else:
            lo = lo - ((lo & 8) << 1)
            hi = hi - ((hi & 8) << 1)
            return tl.reshape(tl.join(lo, hi), [BR, W]).to(tl.int8)
    else:
        cols = k0 + tl.arange(0, W)
        v = tl.load(ptr + roff + cols[None, :], rmask & (cols[None, :] < K), other=0)
        if ELEM == 0:
            return v.to(tl.float8e4nv, bitcast=True)
        elif ELEM == 4:
            return v.to(tl.float8e5, bitcast=True)
        else:
            return v.to(tl.int8, bitcast=True)


@triton.jit
def _group_scale(ptr, rows, R, s_r, s_g, kg, n_groups, RD: tl.constexpr):
    # A step's last sub-groups may lie past K (their operands are zero): never read past the scales.
    return tl.load(ptr + (rows // RD).to(tl.int64) * s_r + kg * s_g, (rows < R) & (rows * 0 + kg < n_groups),
                   other=1.0)


@triton.jit
def _scaled_gemm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, ta_ptr, tb_ptr, bias_ptr, c_ptr,
    M, N, K, stride_a, stride_b, sa_r, sa_g, sb_r, sb_g, stride_cm, stride_cn,
    A_ELEM: tl.constexpr, B_ELEM: tl.constexpr, A_SMODE: tl.constexpr, B_SMODE: tl.constexpr,
    A_RD: tl.constexpr, B_RD: tl.constexpr, G: tl.constexpr, A_TS: tl.constexpr, B_TS: tl.constexpr,
    COMPUTE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_BF16: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, GROUP_M: tl.constexpr,
):
    BK: tl.constexpr = G * SPLIT
    # Grouped tile order: GROUP_M row-tiles share their B tiles in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gm = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gm
    pid_n = (pid % width) // gm
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    GROUPED: tl.constexpr = A_SMODE == 2 or B_SMODE == 2
    if COMPUTE == 2 and not GROUPED:
        acc = tl.zeros([BM, BN], tl.int32)
    else:
        acc = tl.zeros([BM, BN], tl.float32)
    # A 2-D block scale of B that spans the whole BN tile (128 x 128 weight blocks): one scalar a
    # group, so the rescale is one multiply-add per accumulator element, not an outer product too.
    B_SCALAR: tl.constexpr = B_SMODE == 2 and B_RD % BN == 0
    for k0 in range(0, K, BK):
        if COMPUTE == 1:  # scales into the operands, one bf16 MMA over SPLIT groups
            a = _load_operand(a_ptr, rm, M, stride_a, k0, K, BM, BK, A_ELEM)
            b = _load_operand(b_ptr, rn, N, stride_b, k0, K, BN, BK, B_ELEM)
            ka = tl.reshape(a.to(tl.float32), [BM, SPLIT, G])
            kb = tl.reshape(b.to(tl.float32), [BN, SPLIT, G])
            gcols = k0 // G + tl.arange(0, SPLIT)
            gmask = gcols[None, :] < tl.cdiv(K, G)
            if A_SMODE == 2:
                sa = tl.load(sa_ptr + (rm // A_RD).to(tl.int64)[:, None] * sa_r + gcols[None, :] * sa_g,
                             (rm[:, None] < M) & gmask, other=1.0)
                ka = ka * sa[:, :, None]
            if B_SMODE == 2:
                sb = tl.load(sb_ptr + (rn // B_RD).to(tl.int64)[:, None] * sb_r + gcols[None, :] * sb_g,
                             (rn[:, None] < N) & gmask, other=1.0)
                kb = kb * sb[:, :, None]
            if DOT_BF16:
                a16 = tl.reshape(ka, [BM, BK]).to(tl.bfloat16)
                b16 = tl.reshape(kb, [BN, BK]).to(tl.bfloat16)
                acc = tl.dot(a16, tl.trans(b16), acc)
            else:  # the interpreter's bf16 dot is wrong; fp32 of the same exact values
                acc = tl.dot(tl.reshape(ka, [BM, BK]), tl.trans(tl.reshape(kb, [BN, BK])), acc,
                             input_precision="ieee")
        elif GROUPED:  # one MMA per scale group, rescaled in fp32 registers
            for s in tl.static_range(SPLIT):
                kk = k0 + s * G
                a = _load_operand(a_ptr, rm, M, stride_a, kk, K, BM, G, A_ELEM)
                b = _load_operand(b_ptr, rn, N, stride_b, kk, K, BN, G, B_ELEM)
                if COMPUTE == 2:
                    part = tl.dot(a, tl.trans(b), out_dtype=tl.int32).to(tl.float32)
                else:
                    part = tl.dot(a, tl.trans(b))
                kg = kk // G
                # One outer-product multiply and one FMA per accumulator element and group.
                if A_SMODE == 2 and B_SCALAR:
                    sbs = tl.load(sb_ptr + ((pid_n * BN) // B_RD).to(tl.int64) * sb_r + kg * sb_g,
                                  kg < tl.cdiv(K, G), other=1.0)
                    sa = _group_scale(sa_ptr, rm, M, sa_r, sa_g, kg, tl.cdiv(K, G), A_RD)
                    acc += part * (sa * sbs)[:, None]
                elif A_SMODE == 2 and B_SMODE == 2:
                    sa = _group_scale(sa_ptr, rm, M, sa_r, sa_g, kg, tl.cdiv(K, G), A_RD)
                    sb = _group_scale(sb_ptr, rn, N, sb_r, sb_g, kg, tl.cdiv(K, G), B_RD)
                    acc += part * (sa[:, None] * sb[None, :])
                elif A_SMODE == 2:
                    acc += part * _group_scale(sa_ptr, rm, M, sa_r, sa_g, kg, tl.cdiv(K, G), A_RD)[:, None]
                else:
                    acc += part * _group_scale(sb_ptr, rn, N, sb_r, sb_g, kg, tl.cdiv(K, G), B_RD)[None, :]
        else:
            a = _load_operand(a_ptr, rm, M, stride_a, k0, K, BM, BK, A_ELEM)
            b = _load_operand(b_ptr, rn, N, stride_b, k0, K, BN, BK, B_ELEM)
            if COMPUTE == 2:
                acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
            else:
                # Promote into the fp32 accumulator after every K step: Triton's sm_90 default lets
                # the fp8 MMA accumulate all of K at its reduced precision (max_num_imprecise_acc
                # 2^30), which put 0.6-6% of the outputs outside 2e-4 * max|out| for K = 2080-8192
                # (H100, run 37), growing with K.
                acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=BK)
    out = acc.to(tl.float32)
    # Epilogue: row / tensor scales, NVFP4 tensor scales, bias.
    if A_SMODE == 1:
        out = out * tl.load(sa_ptr + rm.to(tl.int64) * sa_r, rm < M, other=1.0)[:, None]
    elif A_SMODE == 0:
        out = out * tl.load(sa_ptr)
    if B_SMODE == 1:
        out = out * tl.load(sb_ptr + rn.to(tl.int64) * sb_r, rn < N, other=1.0)[None, :]
    elif B_SMODE == 0:
        out = out * tl.load(sb_ptr)
    if A_TS:
        out = out * tl.load(ta_ptr)
    if B_TS:
        out = out * tl.load(tb_ptr)
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, rn < N, other=0.0).to(tl.float32)[None, :]
    cmask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn,
             out.to(c_ptr.dtype.element_ty), cmask)


def _configs() -> list[triton.Config]:
    # H100: 128-wide tiles keep the MMA busy; SPLIT groups per K step amortize the loop. The last
    # two won a 36-setting sweep of int8 rows (run 261: 827-895 TFLOP/s on the Llama-3-8B shapes,
    # against 746-793 for the autotuner's pick among the first two).
    out = []
    for bm, bn, w, st in [(128, 128, 8, 3), (128, 256, 8, 3), (128, 128, 4, 3), (256, 128, 8, 4)]:
        for split in (1, 2, 4, 8):
            out.append(triton.Config({"BM": bm, "BN": bn, "SPLIT": split, "GROUP_M": 8},
                                     num_warps=w, num_stages=st))
    return out


def _prune(configs, named_args, **kwargs):
    # Keep K steps of 64..128 elements (32..128 for per-group MMAs); the rest waste compile time.
    g = kwargs.get("G", named_args.get("G"))
    grouped = 2 in (kwargs.get("A_SMODE", named_args.get("A_SMODE")),
                    kwargs.get("B_SMODE", named_args.get("B_SMODE")))
    compute = kwargs.get("COMPUTE", named_args.get("COMPUTE"))
    lo = 32 if grouped and compute != 1 else 64
    kept = [c for c in configs if lo <= g * c.kwargs["SPLIT"] <= 128]
    return kept or configs[:1]


_KEY = ["M", "N", "K", "A_ELEM", "B_ELEM", "A_SMODE", "B_SMODE", "COMPUTE", "G", "B_RD"]
scaled_gemm_tuned = triton.autotune(configs=_configs(), key=_KEY,
                                    prune_configs_by={"early_config_prune": _prune})(_scaled_gemm_kernel)
