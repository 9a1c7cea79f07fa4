"""The row-scaled pair (fp8_rowwise's and int8's X and X^T from two reads, no transposed copy)
against lowbit.quant.quantize, on inputs that stress its two passes: NaN and Inf in one row and
one column, all-zero rows and columns, strided views, and shapes off the tile sizes.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1); the same
tests run on CUDA when a GPU is present (test_kernels_pair_quantize.py covers the common cases).
"""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels import _row_pair_triton as rpt
from lowbit.kernels.pair_quantize import quantize_pair
from lowbit.quant import gemm as qgemm
from lowbit.quant.gemm import OperandPlan, prepare_operand_pair
from lowbit.quant.quantize import QuantSpec, quantize
from lowbit.quant.recipes import GemmSpec

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROW = QuantSpec("fp8_e4m3", "row")


def _same(q, ref) -> None:
    assert q.data.dtype == ref.data.dtype and q.data.shape == ref.data.shape
    assert torch.equal(q.data.view(torch.uint8).cpu(), ref.data.view(torch.uint8))
    assert q.scale.shape == ref.scale.shape
    torch.testing.assert_close(q.scale.cpu(), ref.scale.float(), rtol=0, atol=0, equal_nan=True)
    assert (q.block, q.fmt.name, tuple(q.shape)) == ("row", ref.fmt.name, tuple(ref.shape))


def _check(x: torch.Tensor, spec: QuantSpec = ROW, spec_t: QuantSpec = ROW) -> tuple:
    q, q_t = quantize_pair(x, spec, spec_t, seed=3, seed_t=4)
    _same(q, quantize(x.cpu(), spec, seed=3))
    _same(q_t, quantize(x.cpu().t(), spec_t, seed=4))
    return q, q_t


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8"])
def test_nan_inf_and_zero_rows_and_columns(fmt):
    # A NaN row and column make those scales NaN (as the reference's); an Inf elsewhere saturates
    # or gives NaN codes as the reference does; zero rows and columns take scale 1.
    spec = QuantSpec(fmt, "row")
    x = torch.randn(70, 90) * 3
    x[5, 7] = float("nan")
    x[40, 60] = float("inf")
    x[41, 61] = float("-inf")
    x[20, :] = 0.0
    x[:, 30] = 0.0
    x[:, 31] = -0.0
    _check(x.to(DEV), spec, spec)
    q, q_t = quantize_pair(x.to(DEV), spec, spec)
    assert q.scale[5].isnan() and q_t.scale[7].isnan() and q.scale[20].item() == 1.0
    assert q_t.scale[30].item() == q_t.scale[31].item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_strided_views_and_ragged_shapes(dtype):
    # A transposed view (W^T, dY^T) and a column slice read in place; shapes off the 64 x 64 tile
    # and off pass 1's 32 x 256 block, including a single row and a single column.
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(130, 300, generator=g) * torch.logspace(-2, 2, 300)).to(dtype).to(DEV)
    views = [base.t(), base[:, 7:250]] + [torch.randn(r, c, generator=g).to(dtype).to(DEV)
                                          for r, c in ((1, 33), (33, 1), (257, 65))]
    for x in views:
        q, q_t = _check(x)
        r, c = x.shape
        assert q.scale.shape == (r,) and q_t.scale.shape == (c,) and q_t.data.shape == (c, r)
        assert q.data.is_contiguous() and q_t.data.is_contiguous()


def test_pass_one_takes_several_row_blocks_a_program(monkeypatch):
    # Pass 1's programs loop over row blocks (ITERS > 1) once there are enough of them: forced here
    # with small blocks, the row and column amaxes (so the codes) stay the reference's.
    monkeypatch.setattr(rpt, "AMAX_TILE", (4, 16))
    monkeypatch.setattr(rpt, "AMAX_ITERS_MAX", 3)
    x = torch.randn(4 * 264 + 5, 40).to(DEV)  # 266 row blocks x 3 column blocks: 3 row blocks a program
    seen = []
    launch = rpt.launch_row_col_amax

    def spy(x2, rbits, cbits):
        seen.append(min(rpt.AMAX_ITERS_MAX, -(-x2.shape[0] // 4) * 3 // 264))
        launch(x2, rbits, cbits)

    monkeypatch.setattr(rpt, "launch_row_col_amax", spy)
    _check(x)
    assert seen == [3]


def test_operand_pair_seam_uses_the_row_pair(monkeypatch):
    # prepare_operand_pair with the kernels' pair quantizer registered: rows pair up (no decline),
    # and the operands are the two reference quantizations.
    from lowbit.kernels.pair_quantize import quantize_pair_or_none

    calls = []

    def counting(*args, **kwargs):
        out = quantize_pair_or_none(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setitem(qgemm._PAIR_QUANTIZERS, DEV, counting)
    x = torch.randn(48, 80, device=DEV)
    plan = OperandPlan(ROW, GemmSpec(ROW, ROW), 9, 0)
    plan_t = OperandPlan(ROW, GemmSpec(ROW, ROW), 9, 1)
    a, a_t = prepare_operand_pair(x, plan, plan_t)
    assert calls == [True]
    _same(a.parts[0], quantize(x.cpu(), ROW))
    _same(a_t.parts[0], quantize(x.cpu().t(), ROW))


def test_row_pair_refuses_an_amax_override_or_a_tile():
    x = torch.randn(32, 48, device=DEV)
    with pytest.raises(ValueError, match="block='tensor'"):
        quantize_pair(x, ROW, ROW, amax=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="not row scaling"):
        quantize_pair(x, ROW, ROW, tile=(64, 64))
