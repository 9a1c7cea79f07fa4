"""QuantLinear under torch.compile: traced recipes compile without graph breaks and compute what the
eager layer computes; the rest keep running eagerly."""

import pytest
import torch
from torch import nn

from lowbit.nn import QuantLinear, convert_model
from lowbit.nn.quant_linear_traced import why_not_traced
from lowbit.quant import RECIPES
from lowbit.quant.quantize import QuantSpec, quantize

pytestmark = pytest.mark.usefixtures("single_thread")
K, N = 64, 96


def _grads(layer, x, gy):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(gy)
    return [y.detach(), x.grad, layer.weight.grad] + ([layer.bias.grad] if layer.bias is not None else [])


def _pair(recipe, dtype=torch.float32, bias=True):
    eager = QuantLinear(K, N, bias=bias, recipe=recipe, dtype=dtype)
    traced = QuantLinear(K, N, bias=bias, recipe=recipe, dtype=dtype)
    traced.load_state_dict(eager.state_dict())
    return eager, traced


def test_traced_recipes_are_the_host_state_free_fp8_ones():
    traced = [name for name, r in RECIPES.items() if not r.is_identity and why_not_traced(r) is None]
    assert traced == ["fp8_tensorwise", "fp8_delayed", "fp8_rowwise"]
    assert "seeds" in why_not_traced(RECIPES["int4_hq"])
    assert "per-tensor or per-row" in why_not_traced(RECIPES["mxfp8"])
    # The traced op quantizes with fp32 scales, so an fp8 tensor recipe with e8m0 scales stays eager.
    import dataclasses

    base = RECIPES["fp8_tensorwise"]
    e8m0 = dataclasses.replace(base.fprop, a=QuantSpec("fp8_e4m3", "tensor", "e8m0"))
    assert "fp32 scales" in why_not_traced(dataclasses.replace(base, name="fp8_e8m0", fprop=e8m0))
    assert "registered kernel backend" in why_not_traced(RECIPES["fp8_tensorwise"], "triton")
    # Delayed scaling is traced for per-tensor scales only.
    rowwise_delayed = dataclasses.replace(RECIPES["fp8_rowwise"], name="rows_delayed", amax_history=4)
    assert "delayed scaling" in why_not_traced(rowwise_delayed)


@pytest.mark.parametrize("recipe", ["fp8_tensorwise", "fp8_rowwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_layer_matches_eager_with_one_graph(recipe, dtype):
    torch._dynamo.reset()
    eager, traced = _pair(recipe, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, K, generator=g).to(dtype)
    gy = torch.randn(2, 32, N, generator=g).to(dtype)
    ref = _grads(eager, x, gy)
    got = _grads(torch.compile(traced, fullgraph=True), x, gy)  # fullgraph: a break would raise
    for name, a, b in zip(("y", "dx", "dw"), ref, got):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    # The bias gradient is a sum whose order Inductor may change.
    torch.testing.assert_close(ref[3], got[3], rtol=1e-5, atol=1e-4)


def test_compiled_layer_under_autocast_and_no_grad():
    torch._dynamo.reset()
    eager, traced = _pair("fp8_tensorwise", bias=False)
    compiled = torch.compile(traced, fullgraph=True)
    x = torch.randn(16, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = eager(x), compiled(x)
    assert got.dtype == torch.bfloat16 and torch.equal(ref, got)
    with torch.no_grad():
        assert torch.equal(eager(x), compiled(x))


@pytest.mark.parametrize("block", ["tensor", "row"])
def test_operand_pair_op_is_the_reference_quantizer(block):
    layer = QuantLinear(K, N, recipe="fp8_tensorwise")  # registers the op
    del layer
    x = torch.randn(48, 80) * 5
    args = ("fp8_e4m3", block, "fp8_e5m2", block)
    amax = x.abs().amax() if block == "tensor" else None
    d, s, d_t, s_t = torch.ops.lowbit.quantize_operand_pair(x, amax, *args, True, True)
    q, q_t = quantize(x, QuantSpec("fp8_e4m3", block)), quantize(x.t(), QuantSpec("fp8_e5m2", block))
    for got, ref in ((d, q.data), (s, q.scale), (d_t, q_t.data), (s_t, q_t.scale)):
        assert got.dtype == ref.dtype and torch.equal(
            got.view(torch.uint8) if got.element_size() == 1 else got,
            ref.view(torch.uint8) if ref.element_size() == 1 else ref,
        )
    # Fake (meta) shapes and dtypes, aliasing and schema: torch's own checker.
    torch.library.opcheck(torch.ops.lowbit.quantize_operand_pair, (x, amax, *args, True, True))
    torch.library.opcheck(torch.ops.lowbit.quantize_operand_pair, (x, None, *args, True, False))


def test_untraced_recipes_still_run_under_compile():
    # Per-call seeds are drawn on the host: such a layer graph-breaks and runs the eager path.
    torch._dynamo.reset()
    eager, traced = _pair("int8", bias=False)
    x = torch.randn(8, K)
    assert torch.equal(torch.compile(traced)(x), eager(x))


@pytest.fixture(params=["reference", "kernels"])
def pair_path(request, monkeypatch):
    # "kernels": the Triton pair quantizer (interpreted on CPU) behind prepare_operand_pair, as on
    # CUDA, so the history is chosen and recorded inside the kernels; else the torch reference.
    if request.param == "kernels":
        from lowbit.kernels.pair_quantize import quantize_pair_or_none
        from lowbit.quant import gemm as qgemm

        monkeypatch.setitem(qgemm._PAIR_QUANTIZERS, "cpu", quantize_pair_or_none)
    return request.param


def test_compiled_delayed_scaling_matches_eager_step_by_step(pair_path):
    # fp8_delayed traced into one graph: every call scales by its histories (the tensor's own
    # amax on the first) and records into them on the device, as the eager layer does, so the
    # outputs, gradients and the six history rows agree bit for bit over several steps, including
    # a no-grad call (which records only the forward rows) and a jump in magnitude (saturation).
    torch._dynamo.reset()
    eager, traced = _pair("fp8_delayed")
    compiled = torch.compile(traced, fullgraph=True)
    g = torch.Generator().manual_seed(3)
    for step, mag in enumerate((1.0, 2.0, 50.0, 0.5)):
        x = torch.randn(40, K, generator=g) * mag
        gy = torch.randn(40, N, generator=g) * mag
        if step == 1:
            with torch.no_grad():
                assert torch.equal(eager(x), compiled(x))
        ref, got = _grads(eager, x, gy), _grads(compiled, x, gy)
        for name, a, b in zip(("y", "dx", "dw"), ref, got):
            assert torch.equal(a, b), (step, name)
        assert torch.equal(eager.amax_history, traced.amax_history), step
    # Five recorded calls of X (one without grad), four of dY; the newest X amax is the last x's.
    assert torch.count_nonzero(traced.amax_history[0]) == 5
    assert torch.count_nonzero(traced.amax_history[2]) == 4
    assert traced.amax_history[0, 0] == x.abs().max()


@pytest.mark.parametrize("recipe", ["fp8_tensorwise", "fp8_delayed"])
def test_compiled_layer_with_only_the_bias_trainable(recipe):
    # A frozen weight and an input without grad: backward computes only the bias gradient (no dY
    # quantization, no GEMM), as the eager layer does.
    torch._dynamo.reset()
    eager, traced = _pair(recipe)
    for layer in (eager, traced):
        layer.weight.requires_grad_(False)
    x = torch.randn(16, K)
    compiled = torch.compile(traced, fullgraph=True)
    for layer in (eager, compiled):
        layer(x).square().sum().backward()
    assert traced.bias.grad is not None and torch.allclose(eager.bias.grad, traced.bias.grad)


@pytest.mark.parametrize("use", ["same_input", "two_inputs", "chained"])
def test_compiled_delayed_layer_used_twice_records_every_call(use, pair_path):
    # One layer called twice in a graph: no call may be merged with the other (CSE) or dropped,
    # so the compiled run keeps the eager run's outputs, gradients and histories.
    torch._dynamo.reset()
    square = QuantLinear(K, K, bias=False, recipe="fp8_delayed")
    twin = QuantLinear(K, K, bias=False, recipe="fp8_delayed")
    twin.load_state_dict(square.state_dict())

    def f(layer, x):
        if use == "same_input":
            return layer(x) + 2 * layer(x)
        if use == "two_inputs":
            return layer(x) + 3 * layer(x * 3 + 1)
        return layer(layer(x))

    compiled = torch.compile(lambda x: f(twin, x), fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(16, K, generator=g) * (1 + 10 * step)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = f(square, xe), compiled(xc)
        gy = torch.randn(ye.shape, generator=g)
        ye.backward(gy)
        yc.backward(gy)
        assert torch.equal(ye, yc) and torch.equal(xe.grad, xc.grad), step
        assert torch.equal(square.amax_history, twin.amax_history), step


def test_compiled_delayed_backward_writes_the_layer_itself(pair_path):
    # The backward finds the history through the layer, not through a saved tensor: saved-tensor
    # hooks that hand back copies (activation offloading) must not divert dY's records, and
    # autograd must not see the buffer as a saved tensor modified in place (a no-grad call or a
    # second forward between a forward and its backward). A deep copy writes its own buffer.
    import copy

    torch._dynamo.reset()
    eager, traced = _pair("fp8_delayed", bias=False)
    compiled = torch.compile(traced, fullgraph=True)
    g = torch.Generator().manual_seed(2)

    def xs():
        return torch.randn(16, K, generator=g).requires_grad_()

    for _ in range(2):
        x1, x2, x3 = xs(), xs(), xs()
        for layer in (eager, compiled):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
                y1 = layer(x1)
                with torch.no_grad():
                    layer(x2)
                y3 = layer(x3)
            (y1.sum() + y3.sum()).backward()
        assert torch.equal(eager.amax_history, traced.amax_history)
    assert torch.count_nonzero(traced.amax_history[2]) == 4
    copied = copy.deepcopy(traced)
    assert copied.history_key != traced.history_key
    torch.compile(copied, fullgraph=True)(xs()).sum().backward()
    assert torch.count_nonzero(copied.amax_history[2]) == 5  # its own copy of the rows
    assert torch.count_nonzero(traced.amax_history[2]) == 4


def test_whole_model_compiles_as_one_graph():
    torch._dynamo.reset()
    # ReLU, not GELU: Inductor's GELU may differ from ATen's in the last bit on some CPUs (run 24),
    # and this test is about the quantized layers.
    model = nn.Sequential(nn.Linear(K, K), nn.ReLU(), nn.Linear(K, N))
    convert_model(model, "fp8_tensorwise")
    ref = nn.Sequential(nn.Linear(K, K), nn.ReLU(), nn.Linear(K, N))
    convert_model(ref, "fp8_tensorwise")
    ref.load_state_dict(model.state_dict())
    x = torch.randn(32, K)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), ref(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe,triton_op", [("fp8_tensorwise", False), ("fp8_tensorwise", True),
                                               ("fp8_rowwise", False)])
def test_cuda_compiled_layer_matches_eager_fused_path(recipe, triton_op, monkeypatch):
    # Both run lowbit.kernels' quantizers (the compiled one through the custom op, or with
    # LOWBIT_TRITON_OP=1 the triton_op Inductor launches), so the codes are the same; cuBLAS could
    # still pick another algorithm for the compiled graph's layouts, so outputs are compared to
    # accumulation order (a few BF16 ulps).
    import lowbit.nn.quant_linear_traced as traced_module

    monkeypatch.setattr(traced_module, "USE_TRITON_OP", triton_op)
    torch._dynamo.reset()
    eager, traced = (m.cuda() for m in _pair(recipe, torch.bfloat16))
    x = torch.randn(4, 256, K, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(4, 256, N, device="cuda", dtype=torch.bfloat16)
    ref = _grads(eager, x, gy)
    got = _grads(torch.compile(traced, fullgraph=True), x, gy)
    for name, a, b in zip(("y", "dx", "dw", "db"), ref, got):
        err = float((a.float() - b.float()).norm() / a.float().norm())
        assert err < 2e-3, f"{name}: relative error {err:.2e}"


def test_operand_pair_with_a_given_amax_is_the_same_and_excludes_a_history():
    from lowbit.quant.gemm import AmaxHistory, OperandPlan, prepare_operand_pair
    from lowbit.quant.recipes import GemmSpec

    spec = QuantSpec("fp8_e4m3", "tensor")
    plan, plan_t = OperandPlan(spec, GemmSpec(), 0, 1), OperandPlan(spec, GemmSpec(), 0, 2)
    x = torch.randn(40, 24) * 3
    ref = prepare_operand_pair(x, plan, plan_t)
    got = prepare_operand_pair(x, plan, plan_t, amax=x.abs().amax())
    for r, g in zip(ref, got):
        assert torch.equal(r.parts[0].data.view(torch.uint8), g.parts[0].data.view(torch.uint8))
        assert torch.equal(r.parts[0].scale, g.parts[0].scale)
    with_history = OperandPlan(spec, GemmSpec(), 0, 1, history=AmaxHistory(torch.zeros(4)))
    with pytest.raises(ValueError, match="either amax or an amax history"):
        prepare_operand_pair(x, with_history, plan_t, amax=x.abs().amax())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_compiled_delayed_scaling_matches_eager(mode):
    # fp8_delayed compiled, and replayed as CUDA graphs: the pair kernels choose each amax from the
    # histories and record into them on the device, so the six history rows must follow the eager
    # layer's exactly, call after call (under CUDA graphs the replays must write the module's own
    # buffer, not a copy); outputs to cuBLAS's accumulation order.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, traced = (m.cuda() for m in _pair("fp8_delayed", torch.bfloat16))
    compiled = torch.compile(traced, mode=mode, fullgraph=True)
    g = torch.Generator(device="cuda").manual_seed(3)
    for step, mag in enumerate((1.0, 2.0, 50.0, 0.5, 1.0, 4.0)):
        torch.compiler.cudagraph_mark_step_begin()
        x = torch.randn(4, 256, K, device="cuda", generator=g).to(torch.bfloat16) * mag
        gy = torch.randn(4, 256, N, device="cuda", generator=g).to(torch.bfloat16) * mag
        ref, got = _grads(eager, x, gy), _grads(compiled, x, gy)
        for name, a, b in zip(("y", "dx", "dw", "db"), ref, got):
            err = float((a.float() - b.float()).norm() / a.float().norm())
            assert err < 1e-2, (step, name, err)
        assert torch.equal(eager.amax_history, traced.amax_history), step
    assert torch.count_nonzero(traced.amax_history[2]) == 6  # dY recorded by every backward
    # The forward op's declared write into a module buffer must not make torch skip CUDA graphs.
    assert counters["inductor"]["cudagraph_skips"] == 0
