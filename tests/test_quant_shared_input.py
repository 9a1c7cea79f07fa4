"""Attention's q/k/v layers quantizing their one input once (fp8 delayed scaling): the same numbers
and histories as three separate layers, compiled as eager, and when convert_model builds it."""

import copy

import pytest
import torch

from lowbit.nn import convert_model
from lowbit.nn.llama import Attention, Llama, LlamaConfig, rotary_tables
from lowbit.nn.quant_shared_input import QuantAttention, why_not_shared
from lowbit.quant import get_recipe

pytestmark = pytest.mark.usefixtures("single_thread")
CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=32)


def _attention_pair(dtype=torch.float32, cfg=CFG):
    base = Attention(cfg).to(dtype)
    holders = [torch.nn.ModuleDict({"attn": copy.deepcopy(base)}) for _ in range(2)]
    convert_model(holders[0], "fp8_delayed", skip=[], share_attention_input=False)
    convert_model(holders[1], "fp8_delayed", skip=[])
    return holders[0]["attn"], holders[1]["attn"]


def _step(attn, x, gy, cos, sin):
    x = x.detach().clone().requires_grad_(True)
    attn.zero_grad(set_to_none=True)
    y = attn(x, cos, sin)
    y.backward(gy)
    return [y.detach(), x.grad] + [getattr(attn, n).weight.grad for n in ("wq", "wk", "wv", "wo")]


def test_convert_model_shares_attention_inputs_for_fp8_delayed_only():
    model = Llama(CFG)
    keys = set(model.state_dict())
    convert_model(model, "fp8_delayed")
    assert all(type(b.attention) is QuantAttention for b in model.layers)
    assert set(model.state_dict()) == keys
    for recipe, kw in (("fp8_tensorwise", {}), ("fp8_delayed", {"share_attention_input": False}),
                       ("fp8_delayed", {"skip": ["lm_head", "wk"]})):
        other = convert_model(Llama(CFG), recipe, **kw)
        assert all(type(b.attention) is Attention for b in other.layers), (recipe, kw)
    assert "delayed scaling" in why_not_shared(get_recipe("fp8_tensorwise"))
    plain = convert_model(Llama(CFG), "fp8_delayed", share_attention_input=False).layers[0].attention
    plain.wk = plain.wq
    with pytest.raises(ValueError, match="wq, wk, wv must be distinct layers with distinct weights"):
        QuantAttention(plain)
    tensorwise = convert_model(Llama(CFG), "fp8_tensorwise").layers[0].attention
    with pytest.raises(ValueError, match="cannot share the input's quantization"):
        QuantAttention(tensorwise)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_input_matches_three_separate_layers(dtype):
    # X quantized once on wq's history, mirrored into wk's and wv's: the same scales and codes as
    # each layer's own, so outputs and weight gradients are equal bit for bit and dX up to the
    # order its three dgrads are summed in; every history row the same.
    separate, shared = _attention_pair(dtype)
    cos, sin = rotary_tables(CFG.dim // CFG.n_heads, 24, CFG.rope_theta)
    gen = torch.Generator().manual_seed(2)
    for step, mag in enumerate((1.0, 8.0, 0.25)):
        x = (torch.randn(2, 24, 64, generator=gen) * mag).to(dtype)
        gy = (torch.randn(2, 24, 64, generator=gen) * mag).to(dtype)
        ref, got = _step(separate, x, gy, cos, sin), _step(shared, x, gy, cos, sin)
        for name, a, b in zip(("y", "dx", "dwq", "dwk", "dwv", "dwo"), got, ref):
            if name == "dx":  # bf16: each partial sum rounded, so a few elements move by an ulp
                err = float((a.float() - b.float()).norm() / b.float().norm())
                assert err < (4e-3 if dtype == torch.bfloat16 else 1e-6), (step, err)
            else:
                assert torch.equal(a, b), (step, name)
        for n in ("wq", "wk", "wv", "wo"):
            assert torch.equal(getattr(shared, n).amax_history, getattr(separate, n).amax_history), (step, n)
    assert torch.count_nonzero(shared.wv.amax_history[0]) == 3  # X recorded on wv's rows too
    q, _, _ = shared.project_qkv(x.detach().requires_grad_(True))
    assert "SharedInput3" in type(q.grad_fn).__name__  # the shared path ran, not the layers


def test_shared_input_takes_its_input_in_the_autocast_dtype():
    # As the separate layers (and nn.Linear) do under autocast: an fp32 input is used as its bf16
    # cast, bit for bit, and its gradient is that cast's bf16 gradient widened (the three dgrad
    # GEMMs write bf16). The shared path runs both times.
    _, shared = _attention_pair()
    twin = copy.deepcopy(shared)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 16, 64, generator=gen)
    gys = [torch.randn(2, 16, n, generator=gen) for n in (64, 32, 32)]
    res = []
    for attn, inp in ((shared, x), (twin, x.to(torch.bfloat16))):
        inp = inp.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = attn.project_qkv(inp)
        assert "SharedInput3" in type(outs[0].grad_fn).__name__
        torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(gys, outs)])
        res.append([o.detach() for o in outs] + [inp.grad]
                   + [getattr(attn, n).weight.grad for n in ("wq", "wk", "wv")])
    assert res[0][3].dtype == torch.float32 and res[1][3].dtype == torch.bfloat16  # each input's own
    for name, a, b in zip(("q", "k", "v", "dx", "dwq", "dwk", "dwv"), *res):
        assert torch.equal(a.float(), b.float()), name


def test_shared_input_without_an_input_gradient_under_autocast_and_with_hooks():
    # X needing no gradient (no dgrad: dY is quantized for wgrad only, as the separate layers do)
    # under bf16 autocast: outputs, weight gradients and histories equal to the separate layers'.
    # A hook on one layer makes the module run the layers themselves (the hook must see its call).
    separate, shared = _attention_pair()
    cos, sin = rotary_tables(CFG.dim // CFG.n_heads, 16, CFG.rope_theta)
    gen = torch.Generator().manual_seed(8)
    for step in range(2):
        x, gy = torch.randn(2, 16, 64, generator=gen), torch.randn(2, 16, 64, generator=gen)
        outs = []
        for attn in (separate, shared):
            attn.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = attn(x, cos, sin)
            y.backward(gy.to(y.dtype))
            outs.append([y.detach()] + [getattr(attn, n).weight.grad for n in ("wq", "wk", "wv", "wo")])
        for name, a, b in zip(("y", "dwq", "dwk", "dwv", "dwo"), outs[1], outs[0]):
            assert a.dtype == b.dtype and torch.equal(a, b), (step, name)
        for n in ("wq", "wk", "wv", "wo"):
            assert torch.equal(getattr(shared, n).amax_history, getattr(separate, n).amax_history), (step, n)
    assert torch.count_nonzero(shared.wq.amax_history[2]) == 0  # no dgrad: dY's dgrad row untouched
    calls = []
    handle = shared.wk.register_forward_pre_hook(lambda mod, args: calls.append(1))
    q, _, _ = shared.project_qkv(x.requires_grad_(True))
    handle.remove()
    assert calls == [1] and "SharedInput3" not in type(q.grad_fn).__name__
    hooked_attn = Attention(CFG)
    hooked_attn.register_forward_hook(lambda *args: None)
    holder = convert_model(torch.nn.ModuleDict({"attn": hooked_attn}), "fp8_delayed", skip=[])
    assert type(holder["attn"]) is Attention  # replacing it would have dropped its hook


def test_compiled_shared_input_matches_eager_step_by_step():
    torch._dynamo.reset()
    _, eager = _attention_pair()
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, fullgraph=True)
    cos, sin = rotary_tables(CFG.dim // CFG.n_heads, 16, CFG.rope_theta)
    gen = torch.Generator().manual_seed(6)
    for step, mag in enumerate((1.0, 3.0, 40.0)):
        x = torch.randn(2, 16, 64, generator=gen) * mag
        gy = torch.randn(2, 16, 64, generator=gen) * mag
        ref, got = _step(eager, x, gy, cos, sin), _step(compiled, x, gy, cos, sin)
        for name, a, b in zip(("y", "dx", "dwq", "dwk", "dwv", "dwo"), ref, got):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{step} {name}")
        for n in ("wq", "wk", "wv", "wo"):
            h_eager, h_compiled = getattr(eager, n).amax_history, getattr(compiled_mod, n).amax_history
            assert torch.equal(h_eager, h_compiled), (step, n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_shared_input_under_cuda_graphs():
    # Compiled with CUDA graphs: no graph skipped for the op's writes into wk's and wv's buffers,
    # histories equal to the eager module's, outputs to cuBLAS's accumulation order.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = LlamaConfig(dim=256, n_heads=4, n_kv_heads=2, max_seq_len=256)
    _, eager = (m.cuda() for m in _attention_pair(torch.bfloat16, cfg))
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, mode="reduce-overhead", fullgraph=True)
    cos, sin = (t.cuda() for t in rotary_tables(cfg.dim // cfg.n_heads, 256, cfg.rope_theta))
    g = torch.Generator(device="cuda").manual_seed(3)
    for step, mag in enumerate((1.0, 2.0, 50.0, 0.5)):
        torch.compiler.cudagraph_mark_step_begin()
        x = torch.randn(4, 256, 256, device="cuda", generator=g).to(torch.bfloat16) * mag
        gy = torch.randn(4, 256, 256, device="cuda", generator=g).to(torch.bfloat16) * mag
        ref, got = _step(eager, x, gy, cos, sin), _step(compiled, x, gy, cos, sin)
        for name, a, b in zip(("y", "dx", "dwq", "dwk", "dwv", "dwo"), ref, got):
            err = float((a.float() - b.float()).norm() / a.float().norm())
            assert err < 1e-2, (step, name, err)
        for n in ("wq", "wk", "wv", "wo"):
            h_eager, h_compiled = getattr(eager, n).amax_history, getattr(compiled_mod, n).amax_history
            assert torch.equal(h_eager, h_compiled), (step, n)
    assert counters["inductor"]["cudagraph_skips"] == 0
