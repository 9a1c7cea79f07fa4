"""Hadamard rotation on the Triton kernels (alone, and fused into the quantize pass) vs the
reference rotation followed by the reference quantizer, bit for bit, under the Triton interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import lowbit.quant.gemm as qgemm  # noqa: E402
from lowbit.kernels import _quantize_triton as kqt  # noqa: E402
from lowbit.kernels.hadamard import hadamard_rotate, rotate_quantize, why_not_fused  # noqa: E402
from lowbit.nn import QuantLinear  # noqa: E402
from lowbit.quant import QuantSpec, get_recipe, quantize, random_signs  # noqa: E402
from lowbit.quant import hadamard_rotate as reference_rotate  # noqa: E402
from tests.test_kernels_quantize import _x, check_same_qtensor  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x: torch.Tensor, spec: QuantSpec, block: int, signs_seed, seed: int):
    signs = random_signs(block, signs_seed, x.device) if signs_seed is not None else None
    return quantize(reference_rotate(x.float(), block, signs), spec, seed=seed)


@pytest.mark.parametrize("block", [2, 16, 32, 128, 256])
@pytest.mark.parametrize("signs_seed", [None, 7])
def test_rotate_matches_reference(block, signs_seed):
    x = _x((5, 3 * block), seed=block).to(DEV)
    signs = random_signs(block, signs_seed) if signs_seed is not None else None
    want = reference_rotate(x.float().cpu(), block, signs)
    for t in (x, x.bfloat16(), x.t().contiguous().t()):  # fp32, bf16, a column-major view
        got = hadamard_rotate(t, block, signs_seed)
        assert got.dtype == torch.float32
        ref = want if t.dtype == torch.float32 else reference_rotate(t.float().cpu(), block, signs)
        assert torch.equal(got.cpu(), ref)


# (spec, Hadamard block): the recipes' rotated operands (MXFP4 and NVFP4 with SR, int4 rows) and
# every other granularity: tensor-wise (a rotated amax first), 1x128 groups inside 256-blocks,
# 2-D tiles holding whole blocks, int8 rows.
FUSED = [
    (QuantSpec("fp4_e2m1", 32, "e8m0"), 32),
    (QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic"), 32),
    (QuantSpec("fp4_e2m1", 16, "e4m3", "stochastic"), 16),
    (QuantSpec("fp4_e2m1", 16, "e4m3"), 64),
    (QuantSpec("int4", "row"), 32),
    (QuantSpec("int8", "row", rounding="stochastic"), 128),
    (QuantSpec("fp8_e4m3", "tensor"), 32),
    (QuantSpec("fp8_e5m2", "tensor", rounding="stochastic"), 16),
    (QuantSpec("fp8_e4m3", 128), 256),
    (QuantSpec("fp8_e4m3", 32, "e8m0"), 16),
    (QuantSpec("fp4_e2m1", (16, 16), "e4m3"), 16),
]


@pytest.mark.parametrize("spec,block", FUSED, ids=lambda v: str(v) if isinstance(v, int) else v.fmt)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_quantize_matches_rotate_then_quantize(spec, block, dtype):
    x = _x((37, 2 * max(block, 64)), seed=block, dtype=dtype).to(DEV)  # ragged rows
    got = rotate_quantize(x, spec, block, 11, seed=5)
    assert got is not None
    check_same_qtensor(_reference(x.cpu(), spec, block, 11, 5), got)
    assert torch.equal(got.dequantize().cpu(), _reference(x.cpu(), spec, block, 11, 5).dequantize())


def test_rotate_quantize_long_rows_read_in_chunks(monkeypatch):
    # Rotated rows longer than ROTATED_ROW_CHUNK are read twice (amax, then quantize): both reads
    # rotate.
    monkeypatch.setattr(kqt, "ROTATED_ROW_CHUNK", 64)
    x = _x((9, 320), seed=3).to(DEV)
    for spec in (QuantSpec("int4", "row"), QuantSpec("fp8_e4m3", "row", rounding="stochastic")):
        check_same_qtensor(_reference(x.cpu(), spec, 32, None, 2), rotate_quantize(x, spec, 32, None, seed=2))


@pytest.mark.parametrize("spec,block", FUSED, ids=lambda v: str(v) if isinstance(v, int) else v.fmt)
def test_rotate_quantize_reads_views_not_contiguous_along_k(spec, block, monkeypatch):
    # ROTATED_STRIDED_READ: wgrad's X^T (a transposed view) rotated and quantized straight from
    # strided tile loads, bit for bit the reference on its contiguous copy; ragged on both axes.
    from lowbit.kernels import column_quantize as kc
    from lowbit.kernels import quantize as kq

    monkeypatch.setattr(kq, "ROTATED_STRIDED_READ", True)
    monkeypatch.setattr(kc, "ENABLED", False)  # 1-D groups would take the column quantizer
    x_t = _x((3 * max(block, 64), 13), seed=block, dtype=torch.bfloat16).to(DEV).t()  # partial row tiles
    assert x_t.stride(1) != 1 and why_not_fused(x_t, spec, block) is None
    got = rotate_quantize(x_t, spec, block, 11, seed=5)
    check_same_qtensor(_reference(x_t.contiguous().cpu(), spec, block, 11, 5), got)
    monkeypatch.setattr(kqt, "STRIDED_TILE", (4, 64))  # another tile shape, same bits
    check_same_qtensor(_reference(x_t.contiguous().cpu(), spec, block, 11, 5),
                       rotate_quantize(x_t, spec, block, 11, seed=5))


def test_rotate_quantize_nan_and_inf_spread_over_their_block():
    x = _x((4, 64), seed=1).to(DEV)
    x[1, 5] = float("nan")
    x[2, 40] = float("inf")
    for spec in (QuantSpec("fp4_e2m1", 32, "e8m0"), QuantSpec("fp8_e4m3", "row")):
        got = rotate_quantize(x, spec, 32, 3, seed=0)
        ref = _reference(x.cpu(), spec, 32, 3, 0)
        check_same_qtensor(ref, got)
    # Row scales make the whole row NaN; 1-D groups only the rotated block that held the NaN.
    d = rotate_quantize(x, QuantSpec("fp4_e2m1", 32, "e8m0"), 32, 3).dequantize()
    assert torch.isnan(d[1, :32]).all() and not torch.isnan(d[1, 32:]).any()


def test_rotation_rejects_a_block_that_is_not_a_power_of_two(monkeypatch):
    # The kernel's butterfly needs a power of two: such a block goes to the reference, which says so.
    x = torch.randn(4, 48, device=DEV)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_rotate(x, 24, 3)
    gemm = qgemm.GemmSpec(QuantSpec("int4", "row"), QuantSpec("int4", "row"), hadamard=24)
    monkeypatch.setitem(qgemm._ROTATORS, DEV, hadamard_rotate)
    monkeypatch.setitem(qgemm._ROTATE_QUANTIZERS, DEV, rotate_quantize)
    with pytest.raises(ValueError, match="power of two"):
        qgemm.prepare_operand(x, gemm.a, gemm, 1, 1)


def test_rotate_keeps_a_nans_sign_as_the_reference():
    # Signs are applied by a multiply, as the reference does (a select of -x flips a NaN's sign).
    x = torch.randn(2, 32)
    x[0, :] = torch.tensor(-0x400000, dtype=torch.int32).view(torch.float32)  # NaN, sign bit set
    x[1, :] = float("nan")
    signs = random_signs(32, 5)
    want = reference_rotate(x, 32, signs)
    got = hadamard_rotate(x.to(DEV), 32, 5).cpu()
    if DEV == "cpu":  # the GPU's adds give one canonical NaN either way
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.isnan(got).all()


def test_rotate_quantize_declines_what_it_does_not_fuse():
    x = torch.randn(8, 96, device=DEV)
    assert "not a multiple" in why_not_fused(x, QuantSpec("fp4_e2m1", 32, "e8m0"), 64)
    assert rotate_quantize(x, QuantSpec("fp4_e2m1", 32, "e8m0"), 64) is None
    assert "whole Hadamard blocks" in why_not_fused(x, QuantSpec("fp4_e2m1", (16, 16), "e4m3"), 32)
    assert "power of two" in why_not_fused(x, QuantSpec("int4", "row"), 24)
    assert "Triton quantizer" in why_not_fused(x, QuantSpec("nf4", 64), 32)
    x_t = torch.randn(64, 8, device=DEV).t()
    from lowbit.kernels import quantize as kq

    with pytest.MonkeyPatch.context() as m:
        m.setattr(kq, "ROTATED_STRIDED_READ", False)  # the default: such views take the rotation kernel
        assert "not contiguous along K" in why_not_fused(x_t, QuantSpec("int4", "row"), 32)
    with pytest.raises(ValueError):  # bad arguments are the quantizer's errors, not a silent None
        rotate_quantize(x, QuantSpec("fp8_e4m3", 32), 32, amax=torch.ones(1))


def _operands(gemm, t: torch.Tensor, role: int, fused: bool, monkeypatch):
    with monkeypatch.context() as m:
        if fused:  # the CUDA registration, here for the interpreter's CPU tensors
            m.setitem(qgemm._ROTATORS, DEV, hadamard_rotate)
            m.setitem(qgemm._ROTATE_QUANTIZERS, DEV, rotate_quantize)
        else:
            m.delitem(qgemm._ROTATORS, DEV, raising=False)
            m.delitem(qgemm._ROTATE_QUANTIZERS, DEV, raising=False)
        return qgemm.prepare_operand(t, gemm.a if role == 1 else gemm.b, gemm, 9, role)


@pytest.mark.parametrize("recipe,name", [("mxfp4", "wgrad"), ("nvfp4", "wgrad"), ("int4_hq", "fprop"),
                                         ("int4_hq", "dgrad"), ("mxfp4", "dgrad")])
@pytest.mark.parametrize("k", [64, 80])  # 80: padded to whole blocks, so the rotation runs alone
def test_prepare_operand_with_the_kernels_is_bitwise_the_reference(recipe, name, k, monkeypatch):
    gemm = get_recipe(recipe).gemm(name)
    t = _x((24, k), seed=k).bfloat16().to(DEV)
    # int4_hq's dgrad A is bit-split: rotated by the kernel, quantized twice. The transposed view
    # (as wgrad's X^T) takes the column quantizer for 1-D groups, else the rotation kernel reading
    # it in place, then the quantize kernel.
    for role, tt in ((1, t), (2, t), (1, t.t().contiguous().t())):
        got = _operands(gemm, tt, role, True, monkeypatch)
        ref = _operands(gemm, tt, role, False, monkeypatch)
        assert len(got.parts) == len(ref.parts)
        for g, r in zip(got.parts, ref.parts):
            check_same_qtensor(r, g)


def test_quant_linear_mxfp4_gradients_unchanged_by_the_fused_rotation(monkeypatch):
    def run(fused: bool):
        with monkeypatch.context() as m:
            if fused:
                m.setitem(qgemm._ROTATORS, DEV, hadamard_rotate)
                m.setitem(qgemm._ROTATE_QUANTIZERS, DEV, rotate_quantize)
            torch.manual_seed(0)
            layer = QuantLinear(64, 32, recipe="mxfp4", seed=3).to(DEV)
            x = torch.randn(32, 64, device=DEV, requires_grad=True)
            layer(x).square().sum().backward()
            return x.grad, layer.weight.grad

    for g, r in zip(run(True), run(False)):
        assert torch.equal(g, r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec,block", FUSED, ids=lambda v: str(v) if isinstance(v, int) else v.fmt)
def test_gpu_rotate_quantize_large(spec, block):
    x = _x((2048, 4096), seed=block, dtype=torch.bfloat16).cuda()
    check_same_qtensor(_reference(x.cpu(), spec, block, 5, 1), rotate_quantize(x, spec, block, 5, seed=1))
    want = reference_rotate(x.float().cpu(), block, random_signs(block, 5))
    assert torch.equal(hadamard_rotate(x, block, 5).cpu(), want)
