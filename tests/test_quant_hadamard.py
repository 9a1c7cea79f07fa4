"""Blockwise random Hadamard rotation: orthonormal, invertible, product-preserving, tames outliers."""

import pytest
import torch

from lowbit.quant import (
    QuantSpec,
    hadamard_matrix,
    hadamard_rotate,
    inverse_hadamard_rotate,
    quantize,
    random_signs,
)


@pytest.mark.parametrize("n", [1, 2, 16, 32, 128])
def test_orthonormal(n):
    h = hadamard_matrix(n).double()
    assert torch.allclose(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-6)
    assert set((h * n**0.5).round().unique().tolist()) <= {-1.0, 1.0}


def test_inverse_recovers_x_and_norm_preserved():
    x = torch.randn(6, 5, 64)
    s = random_signs(32, seed=9)
    y = hadamard_rotate(x, 32, s)
    assert torch.allclose(inverse_hadamard_rotate(y, 32, s), x, atol=1e-5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_rotating_both_operands_preserves_product():
    a, b = torch.randn(20, 96, dtype=torch.float64), torch.randn(12, 96, dtype=torch.float64)
    s = random_signs(32, seed=1)
    out = hadamard_rotate(a, 32, s).double() @ hadamard_rotate(b, 32, s).double().t()
    assert torch.allclose(out, a @ b.t(), atol=1e-4)


def test_signs_from_seed():
    s = random_signs(64, seed=3)
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(s, random_signs(64, seed=3)) and not torch.equal(s, random_signs(64, seed=4))


def test_blockwise_is_block_diagonal():
    x = torch.zeros(1, 64)
    x[0, 3] = 1.0
    y = hadamard_rotate(x, 32)
    assert (y[0, :32].abs() > 0).all() and (y[0, 32:] == 0).all()


def test_spreads_an_outlier_and_lowers_fp4_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=gen)
    x[:, 0] *= 50  # one outlier per block
    spec = QuantSpec("fp4_e2m1", 32, "e8m0")
    s = random_signs(32, seed=2)
    plain = (quantize(x, spec).dequantize() - x).norm()
    xr = hadamard_rotate(x, 32, s)
    rotated = (inverse_hadamard_rotate(quantize(xr, spec).dequantize(), 32, s) - x).norm()
    assert rotated < 0.8 * plain


def test_bad_block():
    with pytest.raises(ValueError, match="power of two"):
        hadamard_rotate(torch.randn(2, 24), 24)
    with pytest.raises(ValueError, match="not a multiple of block=32"):
        hadamard_rotate(torch.randn(2, 48), 32)
