"""Block-scaled Triton GEMM vs the fp32 emulation of lowbit.quant, under the Triton interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import lowbit.kernels  # noqa: E402,F401  (registers the "triton" backend)
from lowbit.kernels import backend as kb  # noqa: E402
from lowbit.kernels.gemm import scaled_gemm, why_not  # noqa: E402
from lowbit.nn.quant_linear import QuantLinear  # noqa: E402
from lowbit.quant import QuantSpec, quantize  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _operands(m, n, k, spec_a, spec_b, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-3, 4, (m, 1), generator=g).float())
    b = torch.randn(n, k, generator=g)
    return quantize(a.to(DEV), spec_a, seed=1), quantize(b.to(DEV), spec_b, seed=2)


def _reference(qa, qb):
    return (qa.dequantize_lastdim().double() @ qb.dequantize_lastdim().double().T).float()


def _assert_close(out, ref, fp8_mma: bool = False):
    # fp32 accumulation over K: error bound ~ K * eps * max|a||b|; compare against that scale.
    # On CUDA the fp8 MMA (fp8 and fp6 elements) adds inside one K-step (a scale group, or BK) with
    # fewer bits than fp32 before the kernel promotes into its fp32 accumulator: up to
    # 1.6e-4 * max|out| measured on the H100 (fp8_blockwise, K-steps of 128), hence
    # test_gpu_large's bound for those; int MMAs and the bf16 path stay exact.
    rel, tol = (1e-3, 2e-4) if out.is_cuda and fp8_mma else (1e-4, 1e-5)
    atol = tol * ref.abs().max().item() + 1e-6
    torch.testing.assert_close(out.float().cpu(), ref.cpu(), rtol=rel, atol=atol)


MX8 = QuantSpec("fp8_e4m3", 32, "e8m0")
MX4 = QuantSpec("fp4_e2m1", 32, "e8m0")
MX4_SR = QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic")
NV, NV_W = QuantSpec("fp4_e2m1", 16, "e4m3"), QuantSpec("fp4_e2m1", (16, 16), "e4m3")
NV_SR = QuantSpec("fp4_e2m1", 16, "e4m3", "stochastic")
PAIRS = [
    ("mxfp8", MX8, MX8, 96),
    ("mxfp4", MX4, MX4, 96),
    ("mxfp4_sr", MX4_SR, MX4_SR, 64),
    ("nvfp4_fprop", NV, NV_W, 96),  # 1-D blocks × 16×16 tiles: 2-D scale indexing, bf16 path
    ("nvfp4_wgrad", NV_SR, NV, 80),
    ("fp8_blockwise", QuantSpec("fp8_e4m3", 128), QuantSpec("fp8_e4m3", (128, 128)), 300),
    ("fp8_tensor_e5m2", QuantSpec("fp8_e5m2"), QuantSpec("fp8_e4m3"), 64),
    ("fp8_row", QuantSpec("fp8_e4m3", "row"), QuantSpec("fp8_e4m3", "row"), 64),
    ("int8_row", QuantSpec("int8", "row"), QuantSpec("int8", "row"), 96),
    ("int4_row", QuantSpec("int4", "row"), QuantSpec("int4", "row"), 96),
    ("int4_group32", QuantSpec("int4", 32), QuantSpec("int4", 32), 96),
    ("mxfp6", QuantSpec("fp6_e3m2", 32, "e8m0"), QuantSpec("fp6_e2m3", 32, "e8m0"), 64),
]


@pytest.mark.parametrize("name,spec_a,spec_b,k", PAIRS, ids=[p[0] for p in PAIRS])
def test_matches_fp32_emulation(name, spec_a, spec_b, k):
    qa, qb = _operands(40, 36, k, spec_a, spec_b)  # M, N not multiples of the 32-wide tiles
    assert why_not(qa, qb) is None
    _assert_close(scaled_gemm(qa, qb), _reference(qa, qb), fp8_mma=spec_a.fmt.startswith(("fp8", "fp6")))


@pytest.mark.parametrize("split,path", [(1, "fp8"), (4, "fp8"), (2, "bf16")])
def test_fused_quantize_operands_and_k_steps(split, path):
    # Operands from the fused quantize kernel (group-major scale strides), mixed packed fp4 ×
    # unpacked fp8 (both read in the permuted K order), several scale groups per K step.
    from lowbit.kernels.quantize import quantize as fused_quantize

    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(24, 200, generator=g).to(DEV), torch.randn(40, 200, generator=g).to(DEV)
    qa, qb = fused_quantize(a, MX4), fused_quantize(b, MX8)
    assert qa.scale.stride(0) == 1  # group-major
    cfg = {"BM": 16, "BN": 32, "SPLIT": split, "GROUP_M": 1, "num_warps": 4, "num_stages": 1}
    _assert_close(scaled_gemm(qa, qb, config=cfg, path=path, bf16_exact=True), _reference(qa, qb))


def test_ragged_k_bias_and_bf16_output():
    qa, qb = _operands(17, 23, 70, MX8, MX8)  # K=70: the last 32-block is partial
    bias = torch.randn(23).to(DEV)
    out = scaled_gemm(qa, qb, bias=bias, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (17, 23)
    ref = _reference(qa, qb).cpu() + bias.cpu()
    torch.testing.assert_close(out.float().cpu(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_declines_what_it_cannot_do():
    qa, _ = _operands(8, 8, 64, QuantSpec("nf4", 64), MX8)
    _, qb = _operands(8, 8, 64, MX8, MX8)
    assert "element storage" in why_not(qa, qb)
    qi, qf = _operands(8, 8, 64, QuantSpec("int8", "row"), MX8)
    assert "int and one float" in why_not(qi, qf)
    q32, q16 = _operands(8, 8, 64, MX4, NV)
    assert "groups along K differ" in why_not(q32, q16)
    # 16-wide groups run on the bf16 path, exact only for power-of-two / E4M3 scales.
    f16a, f16b = _operands(8, 8, 64, QuantSpec("fp8_e4m3", 16, "fp32"), QuantSpec("fp8_e4m3", 16, "fp32"))
    assert "16-wide groups" in why_not(f16a, f16b)
    with pytest.raises(ValueError, match="bf16_exact"):
        scaled_gemm(*_operands(8, 8, 64, MX8, MX8), path="bf16")
    with pytest.raises(ValueError, match="does not support"):
        scaled_gemm(q32, q16)


def _layer_grads(recipe, backend, x, seed=3):
    torch.manual_seed(0)
    layer = QuantLinear(64, 48, bias=True, recipe=recipe, backend=backend, seed=seed)
    xx = x.clone().requires_grad_(True)
    y = layer(xx)
    y.backward(torch.ones_like(y) + torch.linspace(-1, 1, y.shape[-1]))
    return y.detach(), xx.grad, layer.weight.grad


# CPU tensors through Triton's interpreter; on CUDA test_gpu_quant_linear_auto_uses_triton covers it.
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4", "int8"])
def test_quant_linear_triton_backend_matches_emulation(recipe, monkeypatch):
    monkeypatch.setattr(kb, "ALLOW_INTERPRETER_ON_CPU", True)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    got = _layer_grads(recipe, "triton", x)
    ref = _layer_grads(recipe, "emulate", x)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())


def test_backend_declines_cpu_and_leverage_sampling(monkeypatch):
    from lowbit.quant.gemm import prepare_operand
    from lowbit.quant.recipes import get_recipe

    t = torch.randn(16, 64)
    spec = get_recipe("mxfp8").fprop
    a = prepare_operand(t, spec.a, spec, 0, 1)
    b = prepare_operand(t, spec.b, spec, 0, 2)
    assert kb.triton_gemm_backend(a, b, spec) is None  # CPU without the interpreter switch
    assert "runs on CUDA tensors" in kb.why_not_triton(a, b, spec)
    wg = get_recipe("int4_hq").wgrad
    a = prepare_operand(t, wg.a, wg, 0, 1)
    b = prepare_operand(t, wg.b, wg, 0, 2)
    monkeypatch.setattr(kb, "ALLOW_INTERPRETER_ON_CPU", True)
    assert kb.triton_gemm_backend(a, b, wg) is None
    assert "leverage sampling" in kb.why_not_triton(a, b, wg)


def test_a_layer_that_names_a_declining_backend_says_why():
    # backend="triton" with CPU tensors (no interpreter switch): one error at the first forward
    # that names the GEMM's formats and the reason, not a silent fallback to emulation.
    layer = QuantLinear(64, 48, recipe="mxfp8", backend="triton")
    msg = r"'triton' does not run this GEMM \(fp8_e4m3/32/e8m0 x fp8_e4m3/32/e8m0\): the operands are on cpu"
    with pytest.raises(ValueError, match=msg):
        layer(torch.randn(4, 64))


def test_auto_emulates_fp8_where_cublas_fp8_fails(monkeypatch):
    # A GPU without fp8 tensor cores (A100): torch._scaled_mm raises and the Triton GEMM declines
    # fp8 (compute capability 8.0), so backend="auto" warns once and emulates.
    from lowbit.kernels import gemm as kg
    from lowbit.quant import gemm as qgemm
    from lowbit.quant.recipes import get_recipe

    def no_fp8(*args, **kwargs):
        raise RuntimeError("fp8 GEMMs need compute capability 8.9")

    spec = get_recipe("fp8_tensorwise").fprop
    x, w = torch.randn(32, 64), torch.randn(16, 64)
    a, b = qgemm.prepare_operand(x, spec.a, spec, 0, 1), qgemm.prepare_operand(w, spec.b, spec, 0, 2)
    monkeypatch.setattr(qgemm.Operand, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(kb, "_runnable", lambda a: True)
    monkeypatch.setattr(qgemm, "_scaled_mm", no_fp8)
    monkeypatch.setattr(qgemm, "_warned", set())
    why_not = kg.why_not
    monkeypatch.setattr(kg, "why_not", lambda qa, qb, exact=None: why_not(qa, qb, exact, (8, 0)))
    assert kb.triton_gemm_backend(a, b, spec) is None
    with pytest.warns(UserWarning, match="emulating"):
        out = qgemm.gemm_operands(a, b, spec, backend="auto")
    torch.testing.assert_close(out, a.dequantize() @ b.dequantize().T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,spec_a,spec_b,k", PAIRS, ids=[p[0] for p in PAIRS])
def test_gpu_large(name, spec_a, spec_b, k, monkeypatch):
    # Real autotuning for the MX/NV formats; a fixed config for the rest (bounded compile time).
    from lowbit.kernels import gemm as kg

    monkeypatch.setattr(kg, "AUTOTUNE", name in ("mxfp8", "nvfp4_fprop"))
    qa, qb = _operands(1000, 1500, 4096 + 128, spec_a, spec_b)
    out = scaled_gemm(qa, qb)
    ref = _reference(qa, qb)
    tol = 2e-4 * ref.abs().max().item()  # fp8 MMA accumulates inside a K-step with fewer bits
    torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=1e-3, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe", ["mxfp8", "mxfp4", "nvfp4", "fp8_blockwise", "int8", "int4_hq"])
def test_gpu_quant_linear_auto_uses_triton(recipe, monkeypatch):
    from lowbit.kernels import gemm as kg

    monkeypatch.setattr(kg, "AUTOTUNE", False)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1)).cuda()
    got = _layer_grads_gpu(recipe, "auto", x)
    ref = _layer_grads_gpu(recipe, "emulate", x)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=2e-4 * r.abs().max().item())


def _layer_grads_gpu(recipe, backend, x):
    torch.manual_seed(0)
    layer = QuantLinear(64, 128, bias=True, recipe=recipe, backend=backend, seed=3).cuda()
    xx = x.clone().requires_grad_(True)
    y = layer(xx)
    y.backward(torch.ones_like(y))
    return y.detach(), xx.grad, layer.weight.grad


def test_declines_float_pairs_below_compute_capability_8_9():
    """Pre-Ada GPUs (A100 is 8.0) have no fp8 tensor cores: float pairs (fp8, fp6-as-e4m3 and fp4,
    decoded to e4m3) are declined instead of reaching Triton's fp8 types; int pairs still run."""
    from lowbit.kernels.gemm import capability_reason

    f8a, f8b = _operands(8, 8, 64, MX8, MX8)
    f4a, f4b = _operands(8, 8, 64, MX4, MX4)
    e5, e4 = _operands(8, 8, 64, QuantSpec("fp8_e5m2"), QuantSpec("fp8_e4m3"))
    ia, ib = _operands(8, 8, 64, QuantSpec("int8", "row"), QuantSpec("int8", "row"))
    for qa, qb in [(f8a, f8b), (f4a, f4b), (e5, e4)]:
        for cap in [(7, 5), (8, 0), (8, 6), (8, 7)]:
            reason = why_not(qa, qb, capability=cap)
            assert reason is not None and "compute capability >= 8.9" in reason, (cap, reason)
            assert f"{cap[0]}.{cap[1]}" in reason
        for cap in [(8, 9), (9, 0), (10, 0), (12, 0)]:
            assert why_not(qa, qb, capability=cap) is None
        if not qa.data.is_cuda:
            assert why_not(qa, qb) is None  # CPU operands (interpreter): not checked
    for cap in [(7, 5), (8, 0), (9, 0)]:
        assert why_not(ia, ib, capability=cap) is None
    # Other reasons come first; the pure decision on element kinds (fp8 e4m3 0, fp4 1, int8 2, int4 3).
    assert "int and one float" in why_not(ia, f8b, capability=(8, 0))
    assert capability_reason(0, 4, (8, 0)) is not None and capability_reason(1, 1, (8, 9)) is None
    assert capability_reason(2, 3, (8, 0)) is None and capability_reason(0, 0, None) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capability_taken_from_the_cuda_device():
    qa, qb = _operands(8, 8, 64, MX8, MX8)
    cap = torch.cuda.get_device_capability(qa.data.device)
    assert (why_not(qa, qb) is None) == (cap >= (8, 9))


@pytest.mark.parametrize("spec", [MX8, MX4, NV, NV_W, QuantSpec("fp8_e5m2", 32, "e8m0")],
                         ids=["mxfp8", "mxfp4", "nvfp4", "nvfp4_16x16", "mx_e5m2"])
def test_dequantize_bf16_is_exact(spec):
    # The operands of the cuBLAS BF16 route: element values x group scales, exactly, in BF16
    # (NVFP4's tensor scale is applied to the GEMM output instead). Ragged rows and K.
    from lowbit.kernels.dequant import dequantize_bf16
    from lowbit.kernels.gemm import _elem, _smode
    from lowbit.quant.qtensor import expand_scale

    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 100, generator=g) * torch.exp2(torch.randint(-20, 20, (37, 1), generator=g).float())
    q = quantize(x.to(DEV), spec)
    mode, rd, gk = _smode(q)
    got = dequantize_bf16(q, _elem(q), mode, rd, gk).cpu()
    qc = quantize(x, spec)
    want = qc.values() * expand_scale(qc.scale, qc.block, qc.shape)
    assert torch.equal(want.to(torch.bfloat16).float(), want)  # the oracle itself is exact in BF16
    assert got.dtype == torch.bfloat16 and torch.equal(got.float(), want)


@pytest.mark.parametrize("spec", [QuantSpec("int4", "row"), QuantSpec("int4", 32)], ids=["row", "group32"])
def test_unpack_int4_gives_the_same_values_as_int8(spec):
    # The int8 route of int4 pairs: codes unpacked to one int8 each, scales untouched.
    from lowbit.kernels.dequant import unpack_int4

    x = torch.randn(37, 100, generator=torch.Generator().manual_seed(2)) * 3
    q = quantize(x.to(DEV), spec)
    u = unpack_int4(q)
    assert u.data.dtype == torch.int8 and not u.packed and u.data.shape == (37, 100)
    assert torch.equal(u.data.cpu().float(), quantize(x, spec).values())
    assert torch.equal(u.dequantize().cpu(), q.dequantize().cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", [QuantSpec("int4", "row"), QuantSpec("int4", 32)], ids=["row", "group32"])
def test_gpu_int4_as_int8_is_bitwise_the_int4_kernel(spec, monkeypatch):
    # Integer MMAs sum exactly, and both routes share the epilogue: the same bits.
    from lowbit.kernels import gemm as kg

    monkeypatch.setattr(kg, "AUTOTUNE", False)
    qa, qb = _operands(1000, 1500, 4096 + 128, spec, spec)
    monkeypatch.setattr(kg, "INT4_AS_INT8", False)
    want = scaled_gemm(qa, qb)
    monkeypatch.setattr(kg, "INT4_AS_INT8", True)
    assert torch.equal(scaled_gemm(qa, qb), want)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_scales", [0, 1, 2])
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float32])
def test_scale_output_is_the_eager_epilogue_bit_for_bit(out_dtype, n_scales, bias_dtype):
    # The dequantized-cuBLAS path's epilogue (tensor scales, bias, cast) in one kernel pass, against
    # the eager ops it replaced; on CUDA launched without fp fusion (no fma of the last multiply
    # and the bias add).
    from lowbit.kernels.dequant import scale_output

    gen = torch.Generator().manual_seed(4)
    out = torch.randn(37, 300, generator=gen) * 1e3
    out[0, 0], out[1, 1], out[2, 2] = float("nan"), float("inf"), 1e-40
    scales = [torch.tensor(0.37), torch.tensor(3.3e-3)][:n_scales]
    bias = None if bias_dtype is None else torch.randn(300, generator=gen).to(bias_dtype)
    out, scales = out.to(DEV), [s.to(DEV) for s in scales]
    bias = None if bias is None else bias.to(DEV)
    ref = out.clone()
    for s in scales:
        ref.mul_(s)
    if bias is not None:
        ref.add_(bias.float())
    ref = ref.to(out_dtype)
    got = scale_output(out.clone(), scales, bias, out_dtype)
    nan = ref.isnan()
    assert got.dtype == out_dtype and torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan], ref[~nan])


def test_scale_output_with_nothing_to_apply_returns_its_input():
    # An fp32 wgrad output without tensor scales or bias takes no pass over memory.
    from lowbit.kernels.dequant import scale_output

    out = torch.randn(8, 16, device=DEV)
    assert scale_output(out, [], None, torch.float32) is out
