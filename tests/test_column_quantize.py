"""The column quantizer (strided-K views rotated and quantized in one read) against the reference
rotation and quantizer on the view's contiguous copy, bit for bit, under the Triton interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from lowbit.kernels import _column_quantize_triton as kct  # noqa: E402
from lowbit.kernels import column_quantize as kc  # noqa: E402
from lowbit.kernels import quantize as kq  # noqa: E402
from lowbit.kernels.column_quantize import column_quantize, why_not_columns  # noqa: E402
from lowbit.kernels.hadamard import hadamard_rotate, rotate_quantize  # noqa: E402
from lowbit.quant import QuantSpec, quantize  # noqa: E402
from lowbit.quant.qtensor import QTensor  # noqa: E402
from lowbit.quant.rounding import seed_offset  # noqa: E402
from tests.test_kernels_hadamard import _reference as _rotated_reference  # noqa: E402
from tests.test_kernels_quantize import _x, check_same_qtensor  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x: torch.Tensor, spec: QuantSpec, block: int, signs_seed, seed: int):
    # the reference on the view's contiguous copy (the noise indices are the matrix's, not memory's)
    x = x.contiguous().cpu()
    if block == 1:
        return quantize(x.float(), spec, seed=seed)
    return _rotated_reference(x, spec, block, signs_seed, seed)


# (spec, Hadamard block): the recipes' strided operands (MXFP4 wgrad and dgrad with SR, NVFP4 wgrad
# with SR and nearest), and the other storage paths: e5m2/e4m3 bytes, int8 and int4 codes with fp32
# scales, groups holding several Hadamard blocks, fp6 on the e4m3 byte path.
COLUMNS = [
    (QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic"), 32),
    (QuantSpec("fp4_e2m1", 32, "e8m0"), 32),
    (QuantSpec("fp4_e2m1", 16, "e4m3", "stochastic"), 16),
    (QuantSpec("fp4_e2m1", 16, "e4m3"), 16),
    (QuantSpec("fp8_e4m3", 32, "e8m0"), 16),
    (QuantSpec("fp8_e5m2", 64, "fp32", "stochastic"), 64),
    (QuantSpec("int8", 16, rounding="stochastic"), 16),
    (QuantSpec("int4", 32), 8),
    (QuantSpec("fp6_e2m3", 32, "e8m0"), 32),
]


def _ids(v):
    return str(v) if isinstance(v, int) else f"{v.fmt}-{v.block}-{v.scale}-{v.rounding}"


@pytest.mark.parametrize("spec,block", COLUMNS, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_columns_match_the_reference_on_a_transposed_view(spec, block, dtype):
    # wgrad's X^T: a view of a row-major (tokens x features) matrix; 45 rows leave a partial tile.
    x_t = _x((2 * max(64, spec.block), 45), seed=block, dtype=dtype).to(DEV).t()
    assert why_not_columns(x_t, spec, block) is None
    got = rotate_quantize(x_t, spec, block, 11, seed=5)
    assert isinstance(got, QTensor) and got.dtype == torch.float32
    ref = _reference(x_t, spec, block, 11, 5)
    check_same_qtensor(ref, got)
    assert torch.equal(got.dequantize().cpu(), ref.dequantize())


def test_columns_without_signs_or_rotation():
    spec = QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic")
    x_t = _x((96, 40), seed=2, dtype=torch.bfloat16).to(DEV).t()
    check_same_qtensor(_reference(x_t, spec, 32, None, 3), rotate_quantize(x_t, spec, 32, None, seed=3))
    # block 1: no rotation (the kernel then quantizes X^T's groups as they are)
    data, scale, tscale, packed = column_quantize(x_t, spec, 1, None, seed_offset(3))
    got = QTensor(data, scale, spec.format, spec.block, x_t.shape, 1, torch.float32, packed, tscale)
    check_same_qtensor(_reference(x_t, spec, 1, None, 3), got)


@pytest.mark.parametrize("tile", [(512, 1, 1), (2048, 4, 2), (16384, 2, 8)])
def test_columns_same_bits_for_every_tile(tile, monkeypatch):
    # values per program and group (rows x G: 32 / 16 rows, 128 / 64, 512 / 512 for G = 16 / 32),
    # groups per program (4 does not divide 3 groups: halved to 1), warps
    monkeypatch.setattr(kct, "COLUMN_VALUES", tile[0])
    monkeypatch.setattr(kct, "COLUMN_GROUPS", tile[1])
    monkeypatch.setattr(kct, "COLUMN_WARPS", tile[2])
    for spec, block in (COLUMNS[0], COLUMNS[2]):
        x_t = _x((96, 70), seed=tile[0], dtype=torch.bfloat16).to(DEV).t()
        check_same_qtensor(_reference(x_t, spec, block, 4, 9), rotate_quantize(x_t, spec, block, 4, seed=9))


def test_columns_with_device_seeds():
    # A traced layer's seeds are int64 tensors on the device: same bits as the equal ints.
    spec = QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic")
    x_t = _x((64, 33), seed=4, dtype=torch.bfloat16).to(DEV).t()
    want = column_quantize(x_t, spec, 32, seed_offset(7), seed_offset(8))
    got = column_quantize(x_t, spec, 32, torch.tensor([seed_offset(7)], device=DEV),
                          torch.tensor([seed_offset(8)], device=DEV))
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_columns_keep_nan_and_inf_in_their_group():
    spec = QuantSpec("fp4_e2m1", 32, "e8m0")
    x = _x((64, 40), seed=1).to(DEV)
    x[5, 1] = float("nan")  # X^T row 1, group 0
    x[40, 2] = float("inf")  # X^T row 2, group 1
    x_t = x.t()
    got = rotate_quantize(x_t, spec, 32, 3, seed=0)
    check_same_qtensor(_reference(x_t, spec, 32, 3, 0), got)
    d = got.dequantize().cpu()
    assert torch.isnan(d[1, :32]).all() and not torch.isnan(d[1, 32:]).any()
    assert torch.isnan(d[2, 32:]).all() and not torch.isnan(d[2, :32]).any()
    assert not torch.isnan(d[0]).any()


def test_columns_decline_what_they_do_not_take(monkeypatch):
    spec = QuantSpec("fp4_e2m1", 32, "e8m0")
    x_t = torch.randn(64, 8, device=DEV).t()
    assert why_not_columns(x_t, spec, 32) is None
    assert "contiguous rows" in why_not_columns(x_t.contiguous(), spec, 32)
    assert "not a multiple" in why_not_columns(torch.randn(48, 8, device=DEV).t(), spec, 32)
    assert "whole Hadamard blocks" in why_not_columns(x_t, spec, 64)
    assert "1-D group" in why_not_columns(x_t, QuantSpec("int4", "row"), 32)
    assert "32-bit words" in why_not_columns(x_t, QuantSpec("fp8_e4m3", 2, "e8m0"), 2)
    assert "Triton quantizer" in why_not_columns(x_t, QuantSpec("nf4", 64), 32)
    assert "not one of" in why_not_columns(x_t.double(), spec, 32)
    huge = torch.zeros(2, device=DEV).as_strided((2, 32 * 65536), (1, 0))  # K past one launch grid
    assert "launch grid" in why_not_columns(huge, spec, 32)
    monkeypatch.setattr(kc, "ENABLED", False)
    assert "LOWBIT_COLUMN_QUANTIZE=0" in why_not_columns(x_t, spec, 32)
    # Declined views still come out right: the rotation kernel, then the quantize kernel.
    monkeypatch.setattr(kq, "ROTATED_STRIDED_READ", False)
    assert rotate_quantize(x_t, spec, 32, 1) is None
    got = kq.quantize(hadamard_rotate(x_t, 32, 1), spec)
    check_same_qtensor(_reference(x_t, spec, 32, 1, 0), got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec,block", COLUMNS[:4], ids=_ids)
def test_gpu_columns_match_the_two_kernel_path(spec, block, monkeypatch):
    # 1b shapes' X^T on the GPU: the column kernel against the rotation kernel + quantize kernel,
    # and a slice against the CPU reference.
    x = _x((16384, 2048), seed=block, dtype=torch.bfloat16).cuda()
    got = rotate_quantize(x.t(), spec, block, 5, seed=1)
    monkeypatch.setattr(kc, "ENABLED", False)
    two = kq.quantize(hadamard_rotate(x.t(), block, 5), spec, seed=1)
    check_same_qtensor(two, got)
    small = x[:512, :64]
    monkeypatch.setattr(kc, "ENABLED", True)
    got = rotate_quantize(small.t(), spec, block, 5, seed=1)
    check_same_qtensor(_reference(small.t(), spec, block, 5, 1), got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_quant_linear_same_gradients_with_the_column_quantizer(recipe, dtype, monkeypatch):
    # A layer's backward (wgrad's X^T and dY^T, dgrad's W^T through the column quantizer) gives
    # the bits of the rotation kernel + quantize kernel path, with the same seeds.
    from lowbit.nn import QuantLinear

    monkeypatch.setattr(kc, "FOLD_ENABLED", False)  # codes, as the other path writes them
    # (folded operands: tests/test_block_fold.py)

    def run(columns: bool):
        monkeypatch.setattr(kc, "ENABLED", columns)
        torch.manual_seed(0)
        layer = QuantLinear(1024, 2048, recipe=recipe, seed=3, device="cuda", dtype=dtype)
        x = torch.randn(4096, 1024, device="cuda", dtype=dtype, requires_grad=True)
        y = layer(x)
        y.backward(torch.randn_like(y))
        return y, x.grad, layer.weight.grad

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", [COLUMNS[0][0], COLUMNS[2][0], COLUMNS[3][0]], ids=_ids)
def test_fp4_groups_cleared_as_the_reference(spec):
    # FP4 codes skip the per-element NaN test and clear a whole group by one mask: a group holding
    # NaN or Inf (NaN scale; for NVFP4 the tensor scale, so every group), and for NVFP4 a block of
    # tiny values next to large ones (its E4M3 scale underflows to 0: code 0, +0 values), must
    # still store exactly the reference's codes.
    g = spec.block
    x = _x((4 * g, 40), seed=6)
    x[:, 6] = -x[:, 6].abs()  # a column of negative values: every code's sign bit set
    tiny = x.clone()
    tiny[2 * g: 3 * g, 5] = 1e-9
    bad = x.clone()
    bad[1, 3] = float("nan")
    bad[g + 2, 4] = float("-inf")
    for t in (tiny, bad):
        x_t = t.to(DEV).t()
        ref = _reference(x_t, spec, g, 2, 4)
        check_same_qtensor(ref, rotate_quantize(x_t, spec, g, 2, seed=4))
    if spec.scale == "e4m3":
        assert (_reference(tiny.t(), spec, g, 2, 4).scale[5] == 0).any()  # the case is reached
