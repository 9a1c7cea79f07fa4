"""MXFP4 folded into e4m3 values with a scale a 1 x 128 chunk or 128 x 128 tile: the reference
(lowbit.quant.scale_fold.fold_blocks) against the dequantized operand and torch's e4m3 cast, the
Triton chunk fold and the column quantizer's folded output bit for bit against it (interpreter on
CPU), and cuBLAS's blockwise GEMM on such operands against the float64 product (CUDA)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest  # noqa: E402
import torch  # noqa: E402

from lowbit.quant import QuantSpec, quantize  # noqa: E402
from lowbit.quant.scale_fold import exact_range_log2, fold_blocks, is_block_folded  # noqa: E402
from tests.test_scale_fold import MX4, MX4_SR, _groups, _same_bits  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
E4 = torch.float8_e4m3fn
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLAS fp8 runs on CUDA")


def _spread(x: torch.Tensor) -> torch.Tensor:
    # (K x R) data as the column quantizer's tests build it, then groups far apart along K: rows
    # 32..63 (group 1) 2^-15 below the rest (beyond e4m3's exact range in a chunk), rows 128..159
    # 2^-9 (within it), a block of zeros and a NaN.
    x = x.clone()
    x[32:64] *= 2.0**-15
    x[128:160] *= 2.0**-9
    x[224:256, 150:] = 0
    x[200, 5] = float("nan")
    return x


@pytest.mark.parametrize("rows", [1, 128])
def test_fold_blocks_is_exact_within_a_block_and_rounds_beyond_it(rows):
    lim = -exact_range_log2(E4)  # 14
    q = quantize(_groups(200, 384, lim // 2 - 1, 0), MX4)  # every block spans < 2^14
    f = fold_blocks(q, rows)
    assert is_block_folded(f) and f.data.dtype == E4
    assert f.scale.shape == ((200, 3) if rows == 1 else (2, 3))
    assert torch.equal(f.dequantize_lastdim(), q.dequantize_lastdim())
    # Beyond the range: the fold is torch's e4m3 cast (nearest even) of value x group / block scale.
    x = _groups(256, 256, 24, 1)
    q = quantize(x, MX4_SR, seed=2)
    f = fold_blocks(q, rows)
    from lowbit.quant.qtensor import expand_scale

    cast = (q.dequantize_lastdim() / expand_scale(f.scale, f.block, q.shape)).to(E4)
    _same_bits(f.data, cast)
    assert not torch.equal(f.dequantize_lastdim(), q.dequantize_lastdim())  # the case is reached


def test_fold_blocks_nan_makes_its_block_nan():
    x = _groups(256, 256, 3, 2)
    x[3, 140] = float("nan")  # row 3, chunk 1
    q = quantize(x, MX4)
    chunks, tiles = fold_blocks(q, 1), fold_blocks(q, 128)
    d = chunks.dequantize_lastdim()
    assert d[3, 128:].isnan().all() and not d[3, :128].isnan().any() and d.isnan().sum() == 128
    assert tiles.dequantize_lastdim()[:128, 128:].isnan().all() and tiles.scale[0, 1].isnan()
    assert tiles.dequantize_lastdim().isnan().sum() == 128 * 128


def test_fold_blocks_refuses_what_it_cannot_fold():
    q = quantize(_groups(4, 256, 3, 2), MX4)
    with pytest.raises(ValueError, match="rows=2"):
        fold_blocks(q, 2)
    with pytest.raises(ValueError, match="not a multiple of 128"):
        fold_blocks(quantize(_groups(4, 96, 3, 2), MX4), 1)
    with pytest.raises(ValueError, match="tensor scale"):
        fold_blocks(quantize(_groups(4, 256, 3, 2), QuantSpec("fp4_e2m1", 16, "e4m3")), 1)


# --- the Triton folds ------------------------------------------------------------------------

triton = pytest.importorskip("triton")
kernels_run = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not kernels_run, reason="needs CUDA or TRITON_INTERPRET=1")


@needs_kernels
@pytest.mark.parametrize("spread", [2, 9, 20])
def test_triton_chunk_fold_matches_the_reference(spread):
    from lowbit.kernels.scale_fold import fold_chunks

    x = _groups(40, 384, spread, 3, DEV)
    x[7, 300] = float("nan")
    x[9] = 0.0
    q = quantize(x, MX4_SR, seed=5)
    got, ref = fold_chunks(q), fold_blocks(q, 1)
    assert got.block == 128 and got.scale.stride(0) == 1  # cuBLAS's 1 x 128 layout
    _same_bits(got.data, ref.data)
    torch.testing.assert_close(got.scale, ref.scale, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="chunks of 128"):
        fold_chunks(quantize(_groups(4, 96, 2, 1, DEV), MX4))


@needs_kernels
@pytest.mark.parametrize("fold,rows,spec,spread", [
    ("chunk", 1, MX4_SR, True), ("tile", 128, MX4, True),
    ("chunk", 1, MX4, False), ("tile", 128, MX4_SR, False),
], ids=["chunk-sr-spread", "tile-nearest-spread", "chunk-nearest", "tile-sr"])
def test_column_fold_matches_the_reference(fold, rows, spec, spread):
    # X^T of a (256 x 200) matrix: 200 rows leave a partial tile; the spread data takes the
    # kernel's rounding path, a NaN block and a block of zeros.
    from lowbit.kernels.column_quantize import column_quantize, why_not_column_fold
    from lowbit.quant.rounding import seed_offset
    from tests.test_column_quantize import _reference
    from tests.test_kernels_quantize import _x

    x = _x((256, 200), seed=1, dtype=torch.float32 if spread else torch.bfloat16)
    x = (_spread(x) if spread else x).to(DEV)
    x_t = x.t()
    assert why_not_column_fold(x_t, spec, 32, fold) is None
    data, scale, tscale, packed = column_quantize(x_t, spec, 32, seed_offset(11), seed_offset(5), fold=fold)
    ref = fold_blocks(_reference(x_t, spec, 32, 11, 5), rows)
    assert data.dtype == E4 and tscale is None and not packed
    _same_bits(data.cpu(), ref.data)
    torch.testing.assert_close(scale.cpu(), ref.scale, rtol=0, atol=0, equal_nan=True)
    if fold == "chunk":
        assert scale.stride(0) == 1


def test_column_fold_declines_what_it_does_not_fold():
    from lowbit.kernels.column_quantize import column_fold_for, why_not_column_fold

    x_t = torch.randn(256, 128).t()
    assert "valid choices: chunk, tile" in why_not_column_fold(x_t, MX4, 32, "rows")
    from lowbit.kernels.column_quantize import column_quantize

    with pytest.raises(ValueError, match="fold='rows'; valid choices: chunk, tile"):
        column_quantize(x_t, MX4, 32, None, 0, fold="rows")
    assert "not MXFP4" in why_not_column_fold(x_t, QuantSpec("fp4_e2m1", 16, "e4m3"), 16, "tile")
    assert "not a multiple of 128" in why_not_column_fold(torch.randn(96, 128).t(), MX4, 32, "chunk")
    assert "contiguous rows" in why_not_column_fold(x_t.contiguous(), MX4, 32, "tile")
    # Only where the folded GEMM runs (CUDA, not the interpreter): codes otherwise, and without a role.
    assert column_fold_for(x_t, MX4, 32, 2) is None
    if torch.cuda.is_available():
        assert column_fold_for(x_t.cuda(), MX4, 32, 2) == "tile"
        assert column_fold_for(x_t.cuda(), MX4, 32, 1) == "chunk"
        assert column_fold_for(x_t.cuda(), MX4, 32, None) is None


# --- cuBLAS's blockwise GEMM on folded operands ------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gpu_blockwise_folded_gemm_matches_the_product(out_dtype):
    from lowbit.kernels.scale_fold import folded_gemm, why_not_blockwise

    qa = quantize(_groups(256, 512, 0, 5, DEV), MX4_SR, seed=3)
    qb = quantize(_groups(384, 512, 0, 6, DEV), MX4)
    exact = qa.dequantize_lastdim().double() @ qb.dequantize_lastdim().double().t()
    tol = 2e-5 if out_dtype == torch.float32 else 8e-3
    for a, b in ((fold_blocks(qa, 1), fold_blocks(qb, 128)), (qa, fold_blocks(qb, 128)),
                 (fold_blocks(qa, 1), qb), (fold_blocks(qa, 128), fold_blocks(qb, 1))):
        assert why_not_blockwise(a, b) is None
        out = folded_gemm(a, b, out_dtype)
        assert out.dtype == out_dtype
        torch.testing.assert_close(out.float(), exact.float(), rtol=tol, atol=tol * exact.abs().max().item())
    # Pairs cuBLAS's blockwise GEMM does not take come out right through exact BF16 operands.
    tiles = fold_blocks(qa, 128), fold_blocks(qb, 128)
    assert "two 128 x 128" in why_not_blockwise(*tiles)
    out = folded_gemm(*tiles, out_dtype)
    torch.testing.assert_close(out.float(), exact.float(), rtol=tol, atol=tol * exact.abs().max().item())
    ragged = quantize(_groups(200, 512, 0, 7, DEV), MX4)
    assert "multiples of" in why_not_blockwise(fold_blocks(qa, 1), ragged)
    ref = qa.dequantize_lastdim().double() @ ragged.dequantize_lastdim().double().t()
    out = folded_gemm(fold_blocks(qa, 1), ragged, out_dtype)
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())


@needs_cuda
@pytest.mark.parametrize("graph", [False, True])
def test_gpu_quant_linear_with_folded_columns(graph, monkeypatch):
    # An mxfp4 layer's backward with X^T, dY^T and W^T folded by the column quantizer: the same
    # gradients as with codes and the separate fold (the seeds match; only the GEMMs' fp32 sums run
    # on other cuBLAS kernels), and the operands really were folded.
    from lowbit.kernels import column_quantize as kc
    from lowbit.kernels import scale_fold
    from lowbit.nn import QuantLinear
    from lowbit.nn.quant_linear_graph import graph_quant_linear

    folded = []
    real = scale_fold._blockwise_folded

    def spy(qa, qb, out_dtype, bias):
        folded.append((qa.block, qb.block))
        return real(qa, qb, out_dtype, bias)

    monkeypatch.setattr(scale_fold, "_blockwise_folded", spy)

    def run(fold: bool):
        monkeypatch.setattr(kc, "FOLD_ENABLED", fold)
        torch.manual_seed(0)
        layer = QuantLinear(1024, 2048, bias=False, recipe="mxfp4", seed=3, device="cuda")
        x = torch.randn(4096, 1024, device="cuda", requires_grad=True)
        # the graph ops save X^T and W^T as tensors and rebuild them as operands for the backward
        y = graph_quant_linear(x, layer.weight, None, layer) if graph else layer(x)
        y.backward(torch.randn_like(y))
        return x.grad, layer.weight.grad

    on = run(True)
    assert (128, (128, 128)) in folded  # wgrad: dY^T chunks and X^T tiles; dgrad: dY chunked, W^T tiles
    off = run(False)
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3 * b.abs().max().item())


def test_blockwise_scales_are_laid_out_as_cublas_reads_them():
    # 1 x 128 scales: (rows, K/128) with the rows contiguous, without a copy when they already are
    # (the column quantizer and fold_chunks write them so); tiles: (L4, rows/128), stride (1, L4),
    # L4 = K/128 rounded up to 4, the padding zero.
    from lowbit.kernels.scale_fold import fold_chunks
    from lowbit.quant.gemm import blockwise_scales

    q = quantize(_groups(256, 640, 3, 1), MX4)
    chunks = fold_chunks(q) if os.environ.get("TRITON_INTERPRET") == "1" else fold_blocks(q, 1)
    sc, kind = blockwise_scales(chunks)
    assert kind.name == "BlockWise1x128" and sc.shape == (256, 5) and sc.stride(0) == 1
    assert torch.equal(sc, chunks.scale)
    if chunks.scale.stride(0) == 1:
        assert sc.data_ptr() == chunks.scale.data_ptr()
    tiles = fold_blocks(q, 128)
    sc, kind = blockwise_scales(tiles)
    assert kind.name == "BlockWise128x128" and sc.shape == (8, 2) and sc.stride() == (1, 8)
    assert torch.equal(sc[:5].t(), tiles.scale) and not sc[5:].any()
