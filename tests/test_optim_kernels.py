"""Fused Triton low-bit AdamW steps against the torch reference.

Most tests run the kernels in the Triton interpreter on CPU tensors (`interp`: conftest turns the
interpreter on for machines without a GPU, as in CI); they are skipped on a GPU machine rather than
switching the whole session to the interpreter. The `gpu` tests run the compiled kernels on CUDA
(skipped without a GPU): the fast square root and division against the IEEE ops, and the fused
4-bit step against the reference, bit for bit without multiply-add fusion (CONFIG["fma4"] = 0).
"""

import os

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lowbit.kernels._optim_adamw_triton import (  # noqa: E402
    _code16_lut,
    _code16_sym,
    _div_fast,
    _mids_sym,
    _sqrt_fast,
)
from lowbit.optim.adamw import LowBitAdamW  # noqa: E402

INTERP = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERP, reason="CPU-interpreter test: needs no CUDA and TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                         reason="compiled-kernel test: needs CUDA")
pytestmark = pytest.mark.skipif(not (INTERP or torch.cuda.is_available()), reason="no Triton backend")


@triton.jit
def _sym_codes(x_ptr, mid_ptr, lut_ptr, out_ptr, n, BLOCK: tl.constexpr, LUT: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0)
    if LUT:
        c = _code16_lut(x, lut_ptr)
    else:
        c = _code16_sym(x, _mids_sym(mid_ptr))
    tl.store(out_ptr + offs, c, mask=offs < n)


@triton.jit
def _fast_ops(a_ptr, b_ptr, sq_ptr, dv_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs, mask=offs < n, other=1.0)
    b = tl.load(b_ptr + offs, mask=offs < n, other=1.0)
    tl.store(sq_ptr + offs, _sqrt_fast(b, True), mask=offs < n)
    tl.store(dv_ptr + offs, _div_fast(a, b, True), mask=offs < n)


def _run(shape, bits, dtype, rounding, fused, steps=3, m_rounding="stochastic"):
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
    opt = LowBitAdamW([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_bits=bits,
                      bf16_rounding=rounding, seed=5, fused=fused, min_quant_numel=1024,
                      m_rounding=m_rounding)
    for _ in range(steps):
        p.grad = torch.randn(shape, generator=gen).to(dtype)
        opt.step()
    return p.detach(), opt.state[p]


CASES = [
    ((40, 130), 8, torch.float32, "nearest"),  # 5200: last 256-block partial
    ((1300,), 8, torch.bfloat16, "stochastic"),
    ((8, 200), 8, torch.bfloat16, "kahan"),
    ((24, 256), 4, torch.float32, "nearest"),  # rank-1 second moment: two-pass kernel
    ((20, 384), 4, torch.bfloat16, "stochastic"),
    ((16, 128), 4, torch.bfloat16, "kahan"),
    ((2049,), 4, torch.float32, "nearest"),  # 1-D: both moments block-wise, odd length
    ((33, 65), 4, torch.float32, "nearest"),  # ncols % 128 != 0: falls back to the reference
    ((30, 50), 32, torch.bfloat16, "stochastic"),  # fp32 states, BF16 params without master copy
    ((30, 50), 32, torch.bfloat16, "kahan"),
]


@interp
@pytest.mark.parametrize("shape,bits,dtype,rounding", CASES)
def test_fused_step_matches_reference_bitwise(shape, bits, dtype, rounding):
    p_ref, st_ref = _run(shape, bits, dtype, rounding, fused=False)
    p_fused, st_fused = _run(shape, bits, dtype, rounding, fused=True)
    assert set(st_ref) == set(st_fused)
    for key, val in st_ref.items():
        if torch.is_tensor(val):
            assert torch.equal(val, st_fused[key]), key
        else:
            assert val == st_fused[key], key
    assert torch.equal(p_ref, p_fused)


@interp
@pytest.mark.parametrize("shape,dtype", [((24, 256), torch.float32), ((2049,), torch.float32),
                                         ((20, 384), torch.bfloat16)])
def test_fused_step_matches_reference_bitwise_nearest_first_moment(shape, dtype):
    """m_rounding="nearest" (the coding before stochastic rounding) stays bit-exact too."""
    rounding = "stochastic" if dtype == torch.bfloat16 else "nearest"
    p_ref, st_ref = _run(shape, 4, dtype, rounding, fused=False, m_rounding="nearest")
    p_fused, st_fused = _run(shape, 4, dtype, rounding, fused=True, m_rounding="nearest")
    for key, val in st_ref.items():
        assert torch.equal(val, st_fused[key]) if torch.is_tensor(val) else val == st_fused[key], key
    assert torch.equal(p_ref, p_fused)


@interp
def test_fused_path_is_taken():
    from lowbit.kernels import optim_adamw_lowbit as k

    p = torch.nn.Parameter(torch.zeros(24, 256))
    opt = LowBitAdamW([p], state_bits=4, fused=True, min_quant_numel=1024)
    assert opt._use_fused(p) and k.supports(opt, p)
    q = torch.nn.Parameter(torch.zeros(33, 65))
    assert not LowBitAdamW([q], state_bits=4, fused=True, min_quant_numel=1024)._use_fused(q)


@interp
@pytest.mark.parametrize(
    "bits,dtype,rounding",
    [(8, torch.float32, "nearest"), (4, torch.bfloat16, "stochastic"), (4, torch.float32, "nearest")],
)
def test_multi_tensor_launch_matches_reference(bits, dtype, rounding):
    """Many tensors of mixed kinds in one optimizer: one launch per kind, same bits as per tensor."""
    shapes = [(24, 256), (40, 384), (2049,), (130,), (8, 200), (16, 128)]

    def run(fused):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
        opt = LowBitAdamW(ps, lr=1e-2, state_bits=bits, bf16_rounding=rounding, fused=fused,
                          min_quant_numel=1024)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        return ps, opt

    ref_ps, ref = run(False)
    ps, opt = run(True)
    for a, b in zip(ref_ps, ps):
        assert torch.equal(a, b)
        for key, val in ref.state[a].items():
            other = opt.state[b][key]
            assert torch.equal(val, other) if torch.is_tensor(val) else val == other, key


@interp
@pytest.mark.parametrize("cfg,shapes", [
    # One row per pass-2 program: the interpreter's time goes with the row count. 24 rows: two
    # pass-1 row programs (16 + 8), whole 4-row iterations; 22 rows: 16 + 6, the last iteration
    # partial. Three and two 128-column segments.
    ({"br4": 1, "l4": 1, "warps4r": 1, "rb1": 16, "br1": 4, "s1": 1, "warps1": 1, "align": 0},
     [(24, 384), (22, 256)]),
    # 40 rows: 32 + 8 (whole 8-row iterations); 70 rows: 32 + 32 + 6 (a partial one); 3 and 2
    # segments: partial 4-segment groups in pass 1, and 3 a partial 2-segment group in pass 2.
    ({"br4": 4, "l4": 2, "warps4r": 2, "rb1": 32, "br1": 8, "s1": 4, "warps1": 2, "ns4": 2, "ns1": 2},
     [(40, 384), (70, 256)]),
])
def test_rank1_launch_shapes_match_reference(monkeypatch, cfg, shapes):
    """Pass 1 over several row programs and partial segment groups, pass 2 with other tiles: the
    same bits as the reference (the launch shape changes only which program computes what)."""
    from lowbit.kernels import optim_adamw_lowbit as k

    monkeypatch.setattr(k, "CONFIG", {**k.CONFIG, **cfg})
    for shape in shapes:
        p_ref, st_ref = _run(shape, 4, torch.float32, "nearest", fused=False, steps=2)
        p_fused, st_fused = _run(shape, 4, torch.float32, "nearest", fused=True, steps=2)
        for key, val in st_ref.items():
            assert torch.equal(val, st_fused[key]) if torch.is_tensor(val) else val == st_fused[key], key
        assert torch.equal(p_ref, p_fused)


@interp
def test_symmetric_first_moment_code_matches_searchsorted():
    """_code16_sym (7 compares) against the reference's searchsorted over all 15 midpoints, on the
    midpoints themselves, their fp32 neighbours, ±0 and ±1: where ties and signs matter."""
    from lowbit.optim import qmaps

    mid = qmaps.midpoints(qmaps.dynamic_map(4, True))
    inner = mid[:14]
    up, down = torch.nextafter(inner, torch.tensor(2.0)), torch.nextafter(inner, torch.tensor(-2.0))
    edges = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])
    x = torch.cat([inner, up, down, edges, torch.linspace(-1, 1, 101)])
    from lowbit.kernels.optim_adamw_lowbit import m_code_lut

    lut = m_code_lut(x.device)
    for use_lut in (False, True):
        out = torch.empty(x.numel(), dtype=torch.int32)
        _sym_codes[(1,)](x, mid, lut, out, x.numel(), BLOCK=256, LUT=use_lut)
        assert torch.equal(out.long(), qmaps.nearest_code(x, mid).long()), use_lut


def check_fused_equals_reference(run):
    # run(fused) -> (parameter, optimizer state): the fused kernels' result must equal the torch
    # reference's bit for bit, parameter and every state tensor.
    (p0, s0), (p1, s1) = run(False), run(True)
    for key, val in s0.items():
        assert torch.equal(val, s1[key]) if torch.is_tensor(val) else val == s1[key], key
    assert torch.equal(p0, p1)


@interp
@pytest.mark.parametrize("cfg", [{"fast4": 1, "mlut4": 1}, {"fast4": 0, "mlut4": 0}])
def test_zero_rows_take_the_ieee_recompute(monkeypatch, cfg):
    """Rows whose gradient is 0 from the start have m = v = 0: outside the fast sqrt/division range,
    so the fused step recomputes those tiles with the IEEE ops; same bits as the reference."""
    from lowbit.kernels import optim_adamw_lowbit as k

    monkeypatch.setattr(k, "CONFIG", {**k.CONFIG, **cfg})

    def run(fused):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(24, 256, generator=gen))
        opt = LowBitAdamW([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_bits=4, fused=fused,
                          min_quant_numel=1024)
        for _ in range(2):
            g = torch.randn(24, 256, generator=gen)
            g[3:5] = 0
            p.grad = g
            opt.step()
        return p.detach(), opt.state[p]

    check_fused_equals_reference(run)


@gpu
def test_fast_sqrt_and_division_are_ieee_in_their_range():
    """_sqrt_fast / _div_fast (inline PTX) equal sqrt.rn / IEEE division wherever the kernels use
    them: v in [2**-100, 2**100], |m| in [2**-60, 2**64), denominators in [2**-60, 2**61)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = 1 << 22

    def logu(lo, hi):
        e = torch.rand(n, device="cuda", generator=gen) * (hi - lo) + lo
        return torch.exp2(e) * (1 + torch.rand(n, device="cuda", generator=gen))

    a = logu(-60, 63) * torch.where(torch.rand(n, device="cuda", generator=gen) < 0.5, -1.0, 1.0)
    b = logu(-60, 60)
    v = logu(-100, 99)
    sq, dv = torch.empty_like(a), torch.empty_like(a)
    _fast_ops[(triton.cdiv(n, 1024),)](a, v, sq, torch.empty_like(a), n, BLOCK=1024)
    assert torch.equal(sq, torch.sqrt(v))  # CUDA's sqrt is IEEE
    _fast_ops[(triton.cdiv(n, 1024),)](a, b, torch.empty_like(a), dv, n, BLOCK=1024)
    assert torch.equal(dv, a / b)  # CUDA's fp32 division is IEEE


@gpu
@pytest.mark.parametrize("shape,dtype,rounding", [((1000, 1024), torch.float32, "nearest"),
                                                  ((300, 1536), torch.bfloat16, "kahan"),
                                                  ((4099,), torch.float32, "nearest")])
def test_fused_4bit_step_is_bitwise_on_gpu_without_fma(monkeypatch, shape, dtype, rounding):
    """The compiled 4-bit kernels with multiply-add fusion off reproduce the torch reference bit
    for bit (fast sqrt/division, code table, relaxed atomics included); some gradient rows are 0
    (the IEEE recompute of out-of-range tiles)."""
    from lowbit.kernels import optim_adamw_lowbit as k

    monkeypatch.setattr(k, "CONFIG", {**k.CONFIG, "fma4": 0})

    def run(fused):
        gen = torch.Generator(device="cuda").manual_seed(0)
        p = torch.nn.Parameter(torch.randn(shape, device="cuda", generator=gen).to(dtype))
        opt = LowBitAdamW([p], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, state_bits=4,
                          bf16_rounding=rounding, fused=fused)
        for _ in range(4):
            g = torch.randn(shape, device="cuda", generator=gen) * 1e-3
            g[:7] = 0
            p.grad = g.to(dtype)
            opt.step()
        return p.detach(), opt.state[p]

    check_fused_equals_reference(run)
