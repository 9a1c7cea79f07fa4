"""Block-scaled GEMM of two quantized operands on tensor cores: out = dequant(A) · dequant(B)^T.

`scaled_gemm(qa, qb)` takes the QTensors that lowbit.quant.quantize (or lowbit.kernels.quantize)
produced along K and returns fp32 (or bf16) M × N, matching `qa.dequantize_lastdim() @
qb.dequantize_lastdim().T` within fp32-accumulation tolerance. Supported (see _gemm_triton.py):
    elements  fp8 e4m3/e5m2 (and fp6 stored as e4m3), packed fp4 e2m1, int8, packed int4
    scales    tensor / row (epilogue), 1-D groups along K or 2-D tiles (per K step), NVFP4 tensor
              scales; both operands float or both int; group sizes along K must agree; 16-wide
              groups only with power-of-two/E4M3 scales (they run on the exact bf16 path)
    shapes    any M, N, K (masked); odd-K fp4/int4 (stored one code a byte) is declined
`why_not(qa, qb)` says why a pair is declined; `triton_gemm_backend` is the lowbit.quant.gemm
backend ("triton"): it declines (returns None) what it cannot do, and the caller then emulates.
FP8 tensorwise/rowwise pairs go to cuBLAS (torch._scaled_mm) when that applies: measured faster
(docs/BENCHMARKS.md), and the issue allows it. On CUDA the exact bf16 path (MX, NVFP4) also ends
in cuBLAS: both operands dequantized to BF16 by lowbit.kernels.dequant, then one BF16 GEMM
(`DEQUANT_CUBLAS`; 2-4x the fused kernel on the H100), and packed int4 is unpacked to int8 first
(`INT4_AS_INT8`), as the in-loop nibble unpack ran at a quarter of the int8 kernel's speed.
"""

from __future__ import annotations

import torch

from lowbit.kernels.launch import launchable
from lowbit.kernels.quantize import interpret as _interpret
from lowbit.quant.qtensor import QTensor


def _elem(q: QTensor) -> int | None:
    if q.data.dtype == torch.float8_e4m3fn:
        return 0
    if q.data.dtype == torch.float8_e5m2:
        return 4
    if q.fmt.name == "fp4_e2m1" and q.packed:
        return 1
    if q.data.dtype == torch.int8:
        return 2
    if q.fmt.name == "int4" and q.packed:
        return 3
    return None


def _smode(q: QTensor) -> tuple[int, int, int]:
    """(scale mode, row divisor, group size along K): tensor 0, row 1, group 2."""
    b = q.block
    if b == "tensor":
        return 0, 1, 0
    if b == "row":
        return 1, 1, 0
    if isinstance(b, int):
        return 2, 1, b
    return 2, int(b[0]), int(b[1])


def _e4m3_scaled(qa: QTensor, qb: QTensor) -> bool:
    # Group scales that are E4M3 (NVFP4: a tensor scale is present) make value × scale exact in bf16.
    return all(q.tensor_scale is not None for q in (qa, qb) if _smode(q)[0] == 2)


# fp8 tensor-core instructions (and Triton's fp8 types) need compute capability 8.9 (Ada, Hopper).
FP8_MIN_CAPABILITY = (8, 9)


def capability_reason(ea: int, eb: int, capability: tuple[int, int] | None) -> str | None:
    """Why a pair of element kinds (`_elem`) cannot run on a GPU of `capability`, else None.

    Float pairs (fp8; fp6 stored as e4m3; packed fp4, which the kernel decodes to e4m3) use Triton's
    fp8 types, which need compute capability >= 8.9; int pairs run anywhere. None: not checked (CPU).
    """
    if capability is None or ea in (2, 3) or eb in (2, 3):
        return None
    if tuple(capability) < FP8_MIN_CAPABILITY:
        need = ".".join(map(str, FP8_MIN_CAPABILITY))
        return f"fp8 operands need compute capability >= {need}; this GPU has {capability[0]}.{capability[1]}"
    return None


def why_not(
    qa: QTensor,
    qb: QTensor,
    bf16_exact: bool | None = None,
    capability: tuple[int, int] | None = None,
) -> str | None:
    """None when scaled_gemm handles the pair, else the reason (for messages and the backend).

    `bf16_exact`: the caller knows the group scales are powers of two or E4M3 (from the QuantSpec),
    so values × scales are exact in bf16; None infers it (E4M3 only; e8m0 is not visible on a QTensor).
    `capability`: the GPU's compute capability (major, minor) to check float (fp8) pairs against;
    None takes it from the operands' device when they are CUDA tensors (CPU: not checked).
    """
    ea, eb = _elem(qa), _elem(qb)
    if ea is None or eb is None:
        return f"element storage {qa.fmt.name}/{qb.fmt.name} (packed={qa.packed}/{qb.packed})"
    if (ea in (2, 3)) != (eb in (2, 3)):
        return "one int and one float operand"
    if capability is None and qa.data.is_cuda:
        capability = torch.cuda.get_device_capability(qa.data.device)
    reason = capability_reason(ea, eb, capability)
    if reason is not None:
        return reason
    if len(qa.shape) != 2 or len(qb.shape) != 2 or qa.shape[1] != qb.shape[1]:
        return f"shapes {tuple(qa.shape)} and {tuple(qb.shape)} are not (M, K) and (N, K)"
    ma, _, ga = _smode(qa)
    mb, _, gb = _smode(qb)
    if ma == 2 and mb == 2 and ga != gb:
        return f"scale groups along K differ ({ga} vs {gb})"
    g = ga or gb
    if g and (g & (g - 1) or g < 16 or g > 256):
        return f"scale group {g} along K (needs a power of two in 16..256)"
    if g == 16 and ea in (2, 3):
        return "int operands with 16-wide groups"
    exact = _e4m3_scaled(qa, qb) if bf16_exact is None else bf16_exact
    if g == 16 and not exact:
        return "16-wide groups need power-of-two or E4M3 scales (they run on the bf16 path)"
    return None


def _plan(qa: QTensor, qb: QTensor, interpret: bool) -> dict:
    ea, eb = _elem(qa), _elem(qb)
    ma, rda, ga = _smode(qa)
    mb, rdb, gb = _smode(qb)
    g = ga or gb
    if ea in (2, 3):
        compute = 2
    elif g == 16:
        compute = 1  # NVFP4: scales folded into bf16 operands
    else:
        compute = 0
    # G is the K granularity of a step (BK = G * SPLIT); without group scales any 32 will do.
    return dict(
        A_ELEM=ea,
        B_ELEM=eb,
        A_SMODE=ma,
        B_SMODE=mb,
        A_RD=rda,
        B_RD=rdb,
        G=g or 32,
        A_TS=qa.tensor_scale is not None,
        B_TS=qb.tensor_scale is not None,
        COMPUTE=compute,
        DOT_BF16=not interpret,
    )


# Float path for power-of-two group scales of 32+ along K (MX): "fp8" = fp8 MMA per group with an
# fp32 rescale, "bf16" = scales folded into bf16 operands (exact). H100, 8192x4096x4096 MXFP8:
# fp8 path 190 TFLOP/s, bf16 path 327 (docs/BENCHMARKS.md). fp32 scales (1x128 blockwise) always
# take the fp8 path (the bf16 fold would round). Exact except for blocks whose amax is below ~2^-118,
# where value x 2^e underflows bf16's subnormals.
MX_PATH = "bf16"

# On CUDA, run the BF16 path as exact BF16 operands + cuBLAS (see _dequantized_cublas) instead of
# the fused Triton kernel: H100, MXFP8 8192x4096x4096, 0.85 ms fused vs 0.41 ms (BENCHMARKS, run 37).
DEQUANT_CUBLAS = True

# On CUDA, run packed int4 operands as int8 (lowbit.kernels.dequant.unpack_int4, one pass) on the
# int8 MMA path instead of unpacking nibbles in the K loop: ~210 vs ~850 TFLOP/s on the H100.
INT4_AS_INT8 = True

# Autotune on CUDA (the first call per shape and format compiles and times the candidate configs);
# tests switch it off to bound compile time, benchmarks keep it.
AUTOTUNE = True


def fixed_config(plan: dict, interpret: bool = False) -> dict:
    """A reasonable config without autotuning: K steps of 64..128 elements, 128-wide tiles."""
    if interpret:
        return {"BM": 32, "BN": 32, "SPLIT": 2, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}
    split = max(1, 128 // plan["G"]) if plan["COMPUTE"] == 1 or plan["G"] > 32 else 2
    grouped = 2 in (plan["A_SMODE"], plan["B_SMODE"])
    if not grouped:
        split = 4
    return {"BM": 128, "BN": 128, "SPLIT": split, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _data2d(q: QTensor) -> torch.Tensor:
    d = q.data if q.data.element_size() != 1 else q.data.view(torch.uint8)  # fp8 as bytes
    return d if d.stride(-1) == 1 else d.contiguous()


def _scale2d(q: QTensor) -> torch.Tensor:
    """Scales as (rows, groups) with any strides (the kernel reads both); one column otherwise."""
    s = q.scale.float()
    if s.dim() == 0:
        return s.reshape(1, 1)
    if s.dim() == 1:
        return s.reshape(-1, 1)
    return s


def scaled_gemm(
    qa: QTensor,
    qb: QTensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    config: dict | None = None,
    path: str | None = None,
    bf16_exact: bool | None = None,
) -> torch.Tensor:
    """fp32/bf16 (M × N) = dequant(qa) · dequant(qb)^T (+ bias), fp32 accumulation on the Triton GEMM.

    `config` ({"BM", "BN", "SPLIT", "GROUP_M", "num_warps", "num_stages"}) skips autotuning.
    `path` forces the float compute path of group-scaled operands: "fp8" (fp8 MMA per group,
    rescaled in fp32) or "bf16" (scales folded into bf16 operands: only when that is exact, i.e.
    power-of-two or E4M3 group scales, `bf16_exact`); None picks MX_PATH / bf16 for 16-wide groups.
    """
    reason = why_not(qa, qb, bf16_exact)
    if reason is not None:
        raise ValueError(f"scaled_gemm does not support this pair: {reason}")
    from lowbit.kernels import _gemm_triton as kt

    interpret = _interpret()
    m, k = qa.shape
    n = qb.shape[0]
    a, b = _data2d(qa), _data2d(qb)
    sa, sb = _scale2d(qa), _scale2d(qb)
    dev = a.device
    out = torch.empty((m, n), dtype=out_dtype, device=dev)
    ta = qa.tensor_scale.float().reshape(1) if qa.tensor_scale is not None else sa
    tb = qb.tensor_scale.float().reshape(1) if qb.tensor_scale is not None else sb
    plan = _plan(qa, qb, interpret)
    exact = _e4m3_scaled(qa, qb) if bf16_exact is None else bf16_exact
    if path == "bf16" and not exact:
        raise ValueError(
            "path='bf16' folds the group scales into bf16 operands, exact only for "
            "power-of-two or E4M3 scales: pass bf16_exact=True if they are"
        )
    grouped = 2 in (plan["A_SMODE"], plan["B_SMODE"])
    chosen = path or (MX_PATH if exact else "fp8")
    if plan["COMPUTE"] != 2 and grouped and plan["G"] >= 32:
        plan["COMPUTE"] = 1 if chosen == "bf16" else 0
    args = (
        a,
        b,
        sa,
        sb,
        ta,
        tb,
        bias if bias is not None else sa,
        out,
        m,
        n,
        k,
        a.stride(0),
        b.stride(0),
        sa.stride(0),
        sa.stride(1),
        sb.stride(0),
        sb.stride(1),
        out.stride(0),
        out.stride(1),
    )
    if m == 0 or n == 0:
        return out
    if plan["COMPUTE"] == 1 and DEQUANT_CUBLAS and a.is_cuda and not interpret:
        return _dequantized_cublas(qa, qb, plan, bias, out_dtype)
    if 3 in (plan["A_ELEM"], plan["B_ELEM"]) and INT4_AS_INT8 and a.is_cuda and not interpret:
        from lowbit.kernels.dequant import unpack_int4

        qa, qb = (unpack_int4(q) if _elem(q) == 3 else q for q in (qa, qb))
        return scaled_gemm(qa, qb, bias, out_dtype, config, path, bf16_exact)
    if interpret or config is not None or not AUTOTUNE:
        cfg = config or fixed_config(plan, interpret)
        grid = (triton_cdiv(m, cfg["BM"]) * triton_cdiv(n, cfg["BN"]),)
        launchable(kt._scaled_gemm_kernel)[grid](*args, **plan, HAS_BIAS=bias is not None, **cfg)
    else:
        grid = lambda meta: (triton_cdiv(m, meta["BM"]) * triton_cdiv(n, meta["BN"]),)
        launchable(kt.scaled_gemm_tuned)[grid](*args, **plan, HAS_BIAS=bias is not None)
    return out


def _dequantized_cublas(qa: QTensor, qb: QTensor, plan: dict, bias: torch.Tensor | None,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """The BF16 path as exact BF16 operands (lowbit.kernels.dequant) and one cuBLAS BF16 GEMM
    with fp32 accumulation; tensor scales and bias applied to the fp32 product, as the kernel's
    epilogue does."""
    from lowbit.kernels.dequant import dequantize_bf16

    _, rda, ga = _smode(qa)
    _, rdb, gb = _smode(qb)
    a16 = dequantize_bf16(qa, plan["A_ELEM"], plan["A_SMODE"], rda, ga)
    b16 = dequantize_bf16(qb, plan["B_ELEM"], plan["B_SMODE"], rdb, gb)
    scales = [q.tensor_scale.float() for q in (qa, qb) if q.tensor_scale is not None]
    return bf16_gemm(a16, b16, scales, bias, out_dtype)


def bf16_gemm(a16: torch.Tensor, b16: torch.Tensor, scales: list[torch.Tensor], bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
    """a16 · b16^T on cuBLAS BF16 with fp32 accumulation, then the 1-element tensor scales, the bias
    and out_dtype in one pass (lowbit.kernels.dequant.scale_output)."""
    from lowbit.kernels.dequant import scale_output

    if not scales and bias is None and out_dtype == torch.bfloat16:
        return a16 @ b16.t()
    out = torch.mm(a16, b16.t(), out_dtype=torch.float32)
    return scale_output(out, scales, bias, out_dtype)


def triton_cdiv(a: int, b: int) -> int:
    """ceil(a / b), as triton.cdiv, without importing triton on the host path."""
    return -(-a // b)
