"""lowbit.kernels.transpose.row_major: a strided matrix view copied row-major on the tiled Triton
kernel, bit for bit (Triton's interpreter on the CPU, or CUDA)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lowbit.kernels.transpose import row_major  # noqa: E402
from lowbit.quant.quantize import QuantSpec  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(200, 136), (3, 40), (1, 1), (130, 70), (64, 64)])
def test_a_transposed_view_is_copied_bit_for_bit(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(dtype)
    flat = x.view(-1)
    flat[0], flat[-1] = float("nan"), -0.0  # payloads the copy must keep
    x = x.to(DEV)
    v = x.t()  # rows not contiguous: the kernel's case
    out = row_major(v)
    assert out.is_contiguous() and out.shape == v.shape and out.dtype == dtype
    assert torch.equal(_bits(out), _bits(v.contiguous()))


def test_any_strides_and_the_plain_cases():
    x = torch.randn(96, 80, device=DEV)
    v = x[::3, ::2]  # neither axis contiguous
    assert torch.equal(row_major(v), v.contiguous())
    assert row_major(x) is x  # already row-major: no copy
    rows = x[:, 5:40]  # rows contiguous: torch's copy
    assert torch.equal(row_major(rows), rows.contiguous())
    assert row_major(x[:0].t()).shape == (80, 0)
    with pytest.raises(ValueError, match="matrix"):
        row_major(torch.zeros(2, 3, 4, device=DEV))


def test_the_quantizer_reads_a_transposed_view_as_its_copy(monkeypatch):
    # quantize of X^T (row scales along tokens, as fp8_rowwise's wgrad operand) goes through
    # row_major: the same bits as quantizing the contiguous copy.
    from lowbit.kernels import transpose
    from lowbit.kernels.quantize import quantize

    seen = []
    monkeypatch.setattr(transpose, "row_major", lambda t: seen.append(t.shape) or row_major(t))
    x = torch.randn(72, 136, device=DEV, dtype=torch.bfloat16)
    for spec in (QuantSpec("fp8_e4m3", "row"), QuantSpec("int8", "row")):
        a, b = quantize(x.t(), spec), quantize(x.t().contiguous(), spec)
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
        assert torch.equal(a.scale, b.scale)
    assert seen == [(136, 72), (136, 72)]
