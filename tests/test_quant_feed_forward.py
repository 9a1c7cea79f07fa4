"""The fused fp8 feed-forward: SwiGLU's kernels against the reference, the module against its three
unfused layers, compiled against eager, and when convert_model fuses (or does not)."""

import copy

import pytest
import torch

from lowbit.kernels.quantize import interpret, triton_available
from lowbit.nn import convert_model
from lowbit.nn.llama import FeedForward, Llama, LlamaConfig
from lowbit.nn.quant_feed_forward import QuantFeedForward, why_not_fused
from lowbit.quant import QuantSpec, get_recipe, quantize
from lowbit.quant.gemm import AmaxHistory
from lowbit.quant.swiglu import swiglu_fp32, swiglu_grad_fp32

pytestmark = pytest.mark.usefixtures("single_thread")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
kernels = pytest.mark.skipif(
    not triton_available() or (DEV == "cpu" and not interpret()),
    reason="needs Triton (CUDA or its interpreter)",
)


def _codes_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    # fp8 codes of values computed in fp32 by two implementations (a GPU's exp and division are
    # not the CPU's to the last bit): equal, but for a rare value on a rounding boundary, which
    # may land on the neighbouring code of the same sign.
    a, b = got.view(torch.uint8).cpu().int(), ref.view(torch.uint8).cpu().int()
    diff = a != b
    assert diff.float().mean() <= 1e-3, f"{what}: {int(diff.sum())} of {a.numel()} codes differ"
    assert ((a - b)[diff].abs() == 1).all(), f"{what}: codes differ by more than one step"


def _reference_pair(t: torch.Tensor, fmt: str, rows: tuple[torch.Tensor, torch.Tensor]):
    # Delayed scaling by AmaxHistory's rules and the reference quantizer, on CPU copies of the rows.
    own = t.abs().amax()
    amax = AmaxHistory(rows[0]).scale_amax(own)
    for row in rows:
        AmaxHistory(row).record(own)
    spec = QuantSpec(fmt)
    return quantize(t, spec, amax=amax), quantize(t.t(), spec, amax=amax)


def _check_pair(got, ref, what: str) -> None:
    d, s, d_t, s_t = got
    q, q_t = ref
    assert d.dtype == q.data.dtype and d.shape == q.data.shape and d_t.shape == q_t.data.shape
    assert s.data_ptr() != s_t.data_ptr()  # outputs of a custom op may not alias
    torch.testing.assert_close(s.cpu(), q.scale.reshape(()), rtol=1e-6, atol=0)
    torch.testing.assert_close(s_t.cpu(), q.scale.reshape(()), rtol=1e-6, atol=0)
    _codes_close(d, q.data, what)
    _codes_close(d_t, q_t.data, what + "^T")


@kernels
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernels_match_the_reference(fmt, dtype):
    # Forward (h and h^T) and backward (dg, du and their transposes) over three calls on one
    # history: a first call on empty rows scales by the result's own amax, the next by the
    # history's (3x larger inputs saturate), the last with small inputs; a ragged shape.
    from lowbit.kernels.swiglu_pair import swiglu_grad_pairs_delayed, swiglu_pair_delayed

    hist, ref = torch.zeros(6, 16, device=DEV), torch.zeros(6, 16)
    gen = torch.Generator().manual_seed(5)
    for step, mag in enumerate((1.0, 3.0, 0.25)):
        g, u, dh = ((torch.randn(70, 131, generator=gen) * mag).to(dtype) for _ in range(3))
        # Signed zeros of h, dg and du (zeros of u and dh against g of either sign): -0's code
        # differs from +0's by 128, far past _codes_close's one step.
        u[0, :4] = dh[1, :4] = torch.tensor([0.0, -0.0, 0.0, -0.0], dtype=dtype)
        g[0, :4] = g[1, :4] = torch.tensor([1.5, 1.5, -2.0, -2.0], dtype=dtype)
        got = swiglu_pair_delayed(g.to(DEV), u.to(DEV), fmt, hist[0], hist[5])
        h = swiglu_fp32(g, u)
        _check_pair(got, _reference_pair(h, fmt, (ref[0], ref[5])), f"h step {step}")
        if step == 2:  # scaled by the history's max, far above these small inputs' own amax
            assert got[1].item() > 4 * h.abs().amax().item() / QuantSpec(fmt).format.max
        got = swiglu_grad_pairs_delayed(dh.to(DEV), g.to(DEV), u.to(DEV), fmt, (hist[2], hist[4]),
                                        (hist[1], hist[3]))
        dg, du = swiglu_grad_fp32(dh, g, u)
        _check_pair(got[:4], _reference_pair(dg, fmt, (ref[2], ref[4])), f"dg step {step}")
        _check_pair(got[4:], _reference_pair(du, fmt, (ref[1], ref[3])), f"du step {step}")
        torch.testing.assert_close(hist.cpu(), ref, rtol=1e-6, atol=0)
    assert hist[:, :3].ne(0).all() and hist[:, 3:].eq(0).all()


@kernels
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("case", ["tiny history", "one huge value", "NaN and Inf", "normal"])
def test_swiglu_backward_fix_up_gives_the_division_bits(fmt, case, monkeypatch):
    # The backward divides by the scale without a guard and lists the tiles where that form would
    # not be exact for a second launch with tl.div_rn (FAST_GRAD_DIVISION). Every tile must come
    # out with the bits of the plain tl.div_rn kernel: all of them from the fix-up under a history
    # whose scale is under 2^-64, one from it for one value 2^100 times the scale, two for NaN and
    # Inf, none otherwise. (Outputs are torch.empty: a tile nobody stores would not match.)
    import lowbit.kernels._swiglu_pair_triton as kt
    from lowbit.kernels.swiglu_pair import swiglu_grad_pairs_delayed

    gen = torch.Generator().manual_seed(9)
    dh, g, u = (torch.randn(70, 200, generator=gen) for _ in range(3))  # 3 x 2 tiles of 32 x 128
    if case == "one huge value":
        dh[5, 7] = 1e30
    elif case == "NaN and Inf":
        dh[40, 150], dh[69, 3] = float("nan"), float("inf")
    amax = 1e-36 if case == "tiny history" else 4.0
    outs = {}
    for fast in (False, True):
        monkeypatch.setattr(kt, "FAST_GRAD_DIVISION", fast)
        hist = torch.full((4, 8), amax, device=DEV)
        outs[fast] = swiglu_grad_pairs_delayed(dh.to(DEV), g.to(DEV), u.to(DEV), fmt, (hist[0], hist[1]),
                                               (hist[2], hist[3]))
    for i, (a, b) in enumerate(zip(outs[False], outs[True])):
        a, b = a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b
        assert torch.equal(a.nan_to_num(-1.0) if a.is_floating_point() else a,
                           b.nan_to_num(-1.0) if b.is_floating_point() else b), (case, i)


@kernels
@pytest.mark.parametrize("grad", [False, True])
def test_swiglu_gate_needs_no_zeroed_words(grad):
    # The fused SwiGLU's gate, as the pair quantizer's (test_kernels_pair_quantize): its words come
    # from torch.empty, so it zeroes the record words itself, and on a first call leaves partial
    # maxes whose max is the result's own amax (h, or dg and du). Every word starts as garbage.
    from lowbit.kernels._pair_quantize_triton import delayed_words
    from lowbit.kernels._swiglu_pair_triton import launch_amax_if_empty

    gen = torch.Generator().manual_seed(5)
    dh, g, u = (torch.randn(70, 200, generator=gen).to(DEV) for _ in range(3))
    words = delayed_words(g.device, 2 if grad else 1)
    parts, recs = words[0::2], words[1::2]
    if grad:  # and the count of the backward's fix-up tiles
        recs = (*recs, torch.empty(1, dtype=torch.int32, device=DEV))
    for w in (*parts, *recs):
        w.fill_(0x7F000000)
    rows = (torch.zeros(4, device=DEV),) * len(parts)
    launch_amax_if_empty((dh, g, u) if grad else (g, u), parts, recs, rows)
    results = swiglu_grad_fp32(dh, g, u) if grad else (swiglu_fp32(g, u),)
    assert all(r.item() == 0 for r in recs)
    for p, t in zip(parts, results):
        got = p.max().view(torch.float32).item()
        assert got == pytest.approx(t.abs().amax().item(), rel=1e-6)  # exp/division to the last bit


@kernels
def test_swiglu_kernels_refuse_bad_inputs():
    from lowbit.kernels.swiglu_pair import swiglu_grad_pairs_delayed, swiglu_pair_delayed

    g, row = torch.randn(8, 16, device=DEV), torch.zeros(4, device=DEV)
    with pytest.raises(ValueError, match="fmt='fp4_e2m1', expected one of"):
        swiglu_pair_delayed(g, g, "fp4_e2m1", row, torch.zeros(4, device=DEV))
    with pytest.raises(ValueError, match="matrices of one shape"):
        swiglu_pair_delayed(g, g[:4], "fp8_e4m3", row, torch.zeros(4, device=DEV))
    with pytest.raises(ValueError, match="must be distinct"):
        swiglu_pair_delayed(g, g, "fp8_e4m3", row, row)
    with pytest.raises(ValueError, match="contiguous fp32 vectors"):
        rows = (row, torch.zeros(4, device=DEV, dtype=torch.bfloat16))
        swiglu_grad_pairs_delayed(g, g, g, "fp8_e5m2", rows, (torch.zeros(4, device=DEV),) * 2)


@pytest.fixture(params=["reference", "kernels"])
def ffn_path(request, monkeypatch):
    # "kernels": the module's ops run lowbit.kernels.swiglu_pair (interpreted on CPU) as on CUDA,
    # so the kernels' history rows are checked too; "reference": lowbit.quant.swiglu + the
    # reference quantizer, the path off CUDA.
    if request.param == "kernels":
        if not triton_available() or not interpret():  # these module tests run on CPU tensors
            pytest.skip("needs Triton's interpreter")
        import lowbit.nn.quant_feed_forward as qff

        monkeypatch.setattr(qff, "_kernels", lambda t: t.numel() > 0)
    return request.param


def _ffn_pair(dtype=torch.float32, dim=64, hidden=96, with_base=False):
    cfg = LlamaConfig(dim=dim, ffn_hidden=hidden)
    base = FeedForward(cfg).to(dtype)
    unfused, fused = copy.deepcopy(base), copy.deepcopy(base)
    holder_u, holder_f = torch.nn.ModuleDict({"ffn": unfused}), torch.nn.ModuleDict({"ffn": fused})
    convert_model(holder_u, "fp8_delayed", skip=[], fuse_feed_forward=False)
    convert_model(holder_f, "fp8_delayed", skip=[])
    return (holder_u["ffn"], holder_f["ffn"]) + ((base.float(),) if with_base else ())


def _step(ffn, x, gy):
    x = x.detach().clone().requires_grad_(True)
    ffn.zero_grad(set_to_none=True)
    y = ffn(x)
    y.backward(gy)
    return [y.detach(), x.grad] + [getattr(ffn, n).weight.grad for n in ("w1", "w3", "w2")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_convert_model_fuses_fp8_delayed_feed_forwards_only():
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=16)
    model = Llama(cfg)
    keys = set(model.state_dict())
    convert_model(model, "fp8_delayed")
    assert all(type(b.feed_forward) is QuantFeedForward for b in model.layers)
    assert set(model.state_dict()) == keys  # same names: checkpoints load either way
    for recipe, kw in (("fp8_tensorwise", {}), ("fp8_delayed", {"fuse_feed_forward": False}),
                       ("fp8_delayed", {"skip": ["lm_head", "w2"]})):
        other = convert_model(Llama(cfg), recipe, **kw)
        assert all(type(b.feed_forward) is FeedForward for b in other.layers), (recipe, kw)
    assert "delayed scaling" in why_not_fused(get_recipe("fp8_tensorwise"))
    assert "is not fp8" in why_not_fused(get_recipe("mxfp4"))
    ffn = model.layers[0].feed_forward
    with pytest.raises(ValueError, match="w2 must be a QuantLinear without bias"):
        QuantFeedForward(ffn.w1, ffn.w3, torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="w1, w3, w2 must be distinct layers with distinct weights"):
        QuantFeedForward(ffn.w1, ffn.w1, ffn.w2)
    bad_shape = r"weights must be .* got w1 \(192, 64\), w3 \(192, 64\), w2 \(192, 64\)"
    with pytest.raises(ValueError, match=bad_shape):
        QuantFeedForward(ffn.w1, ffn.w3, copy.deepcopy(ffn.w1))
    tensorwise = convert_model(Llama(cfg), "fp8_tensorwise").layers[0].feed_forward
    with pytest.raises(ValueError, match="cannot share the input's quantization: .* for delayed scaling"):
        QuantFeedForward(tensorwise.w1, tensorwise.w3, tensorwise.w2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_feed_forward_matches_its_unfused_layers(dtype, ffn_path):
    # Same Parameters and recipe: the fused module differs only by rounding h, dg and du once
    # (fp32 -> fp8) instead of through bf16/fp32 tensors, so outputs and gradients agree to fp8's
    # resolution (e5m2 gradients: a code step is 25%), are no further from the unquantized fp32
    # module's than the unfused layers' are, and the histories hold the same amaxes (W3's X rows
    # mirror W1's).
    unfused, fused, exact = _ffn_pair(dtype, with_base=True)
    gen = torch.Generator().manual_seed(7)
    for step, mag in enumerate((1.0, 4.0, 0.5)):
        x = (torch.randn(4, 24, 64, generator=gen) * mag).to(dtype)
        gy = (torch.randn(4, 24, 64, generator=gen) * mag).to(dtype)
        ref, got, truth = _step(unfused, x, gy), _step(fused, x, gy), _step(exact, x.float(), gy.float())
        for name, a, b, t in zip(("y", "dx", "dw1", "dw3", "dw2"), got, ref, truth):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert _rel(a, b) < (0.06 if dtype == torch.bfloat16 else 0.01), (step, name, _rel(a, b))
            assert _rel(a, t) < 1.2 * _rel(b, t) + 1e-3, (step, name, _rel(a, t), _rel(b, t))
        for n in ("w1", "w3", "w2"):
            hf, hu = getattr(fused, n).amax_history, getattr(unfused, n).amax_history
            torch.testing.assert_close(hf, hu, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=0)
    assert torch.count_nonzero(fused.w3.amax_history[0]) == 3  # X recorded on W3's rows too
    assert "FusedFeedForward" in type(fused(x.detach().requires_grad_(True)).grad_fn).__name__
    # Without grad the module runs its three layers unfused, as FeedForward's forward does.
    x = torch.randn(2, 24, 64, generator=gen).to(dtype)
    twin = copy.deepcopy(fused)
    with torch.no_grad():
        assert torch.equal(fused(x), FeedForward.forward(twin, x))


def test_fused_feed_forward_without_an_input_gradient_and_under_autocast():
    # X needing no gradient (no dgrad GEMMs, no W^T made) and bf16 autocast over fp32 weights (the
    # trainer's setting): still the unfused layers' numbers to fp8's resolution.
    unfused, fused = _ffn_pair()
    gen = torch.Generator().manual_seed(4)
    for step in range(2):
        x, gy = torch.randn(3, 16, 64, generator=gen), torch.randn(3, 16, 64, generator=gen)
        outs = []
        for ffn in (unfused, fused):
            ffn.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = ffn(x)
            y.backward(gy.to(y.dtype))
            outs.append([y.detach()] + [getattr(ffn, n).weight.grad for n in ("w1", "w3", "w2")])
        for name, a, b in zip(("y", "dw1", "dw3", "dw2"), outs[1], outs[0]):
            assert a.dtype == b.dtype and _rel(a, b) < 0.06, (step, name, _rel(a, b))
    assert outs[1][0].dtype == torch.bfloat16 and outs[1][1].dtype == torch.float32


def test_fused_feed_forward_takes_its_input_in_the_autocast_dtype():
    # As its layers (and nn.Linear) do under autocast: an fp32 input is used as its bf16 cast, bit
    # for bit, and its gradient is that cast's bf16 gradient widened. The fused path runs both times.
    _, fused = _ffn_pair()
    twin = copy.deepcopy(fused)
    gen = torch.Generator().manual_seed(6)
    x, gy = torch.randn(2, 8, 64, generator=gen), torch.randn(2, 8, 64, generator=gen)
    res = []
    for ffn, inp in ((fused, x), (twin, x.to(torch.bfloat16))):
        inp = inp.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ffn(inp)
        assert "FusedFeedForward" in type(y.grad_fn).__name__
        y.backward(gy.to(y.dtype))
        res.append([y.detach(), inp.grad] + [getattr(ffn, n).weight.grad for n in ("w1", "w3", "w2")])
    assert res[0][1].dtype == torch.float32 and res[1][1].dtype == torch.bfloat16  # each input's own
    for name, a, b in zip(("y", "dx", "dw1", "dw3", "dw2"), *res):
        assert torch.equal(a.float(), b.float()), name


def test_compiled_fused_feed_forward_matches_eager_step_by_step(ffn_path):
    # One graph (fullgraph), the three custom ops inside; compiled and eager run the same ops, so
    # outputs, gradients and every history row agree bit for bit, call after call.
    torch._dynamo.reset()
    _, eager = _ffn_pair()
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, fullgraph=True)
    gen = torch.Generator().manual_seed(9)
    for step, mag in enumerate((1.0, 2.0, 50.0, 0.5)):
        x = torch.randn(40, 64, generator=gen) * mag
        gy = torch.randn(40, 64, generator=gen) * mag
        ref, got = _step(eager, x, gy), _step(compiled, x, gy)
        for name, a, b in zip(("y", "dx", "dw1", "dw3", "dw2"), ref, got):
            assert torch.equal(a, b), (step, name)
        for n in ("w1", "w3", "w2"):
            h_eager, h_compiled = getattr(eager, n).amax_history, getattr(compiled_mod, n).amax_history
            assert torch.equal(h_eager, h_compiled), (step, n)
    assert torch.count_nonzero(compiled_mod.w1.amax_history[2]) == 4  # dG recorded by every backward


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_compiled_fused_feed_forward_matches_eager(mode):
    # The fused kernels compiled and replayed as CUDA graphs: histories follow the eager module's
    # exactly, outputs to cuBLAS's accumulation order, and no CUDA graph skipped for the ops'
    # buffer writes. Against the unfused layers: to fp8's resolution.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    unfused, eager = (m.cuda() for m in _ffn_pair(torch.bfloat16, 256, 512))
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, mode=mode, fullgraph=True)
    g = torch.Generator(device="cuda").manual_seed(3)
    for step, mag in enumerate((1.0, 2.0, 50.0, 0.5, 1.0, 4.0)):
        torch.compiler.cudagraph_mark_step_begin()
        x = torch.randn(4, 256, 256, device="cuda", generator=g).to(torch.bfloat16) * mag
        gy = torch.randn(4, 256, 256, device="cuda", generator=g).to(torch.bfloat16) * mag
        ref, got, base = _step(eager, x, gy), _step(compiled, x, gy), _step(unfused, x, gy)
        for name, a, b, c in zip(("y", "dx", "dw1", "dw3", "dw2"), ref, got, base):
            assert _rel(b, a) < 1e-2, (step, name, _rel(b, a))
            assert _rel(a, c) < 0.05, (step, name, _rel(a, c))
        for n in ("w1", "w3", "w2"):
            h_eager, h_compiled = getattr(eager, n).amax_history, getattr(compiled_mod, n).amax_history
            assert torch.equal(h_eager, h_compiled), (step, n)
            # The kernels' rows are the unfused layers' rows (amaxes to bf16 rounding of h, dG, dU).
            torch.testing.assert_close(h_eager, getattr(unfused, n).amax_history, rtol=2e-2, atol=0)
    assert counters["inductor"]["cudagraph_skips"] == 0
