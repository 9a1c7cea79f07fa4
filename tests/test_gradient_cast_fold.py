"""The bf16 cast of an fp32 gradient folded into its fp8_delayed pair quantizer
(lowbit.nn.gradient_cast_fold).

The kernel side (the pair kernel rounding an fp32 input to bf16 first) against the same kernels on
the cast, and the compiled graph with the pass against the graph without it: the same losses,
gradients and amax histories, bit for bit. On CPU the kernels run in the Triton interpreter and
the folded op casts first; on CUDA the fused kernel runs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import import_with_env
from torch import nn

from lowbit.nn import gradient_cast_fold as gcf
from lowbit.nn.convert import convert_model
from lowbit.quant.quantize import QuantSpec, quantize

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _gradient_like(r: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, c, generator=g) * torch.logspace(-6, 3, c)
    bits = x.view(torch.int32)
    # Ties and near-ties of the bf16 rounding (low 16 bits 0x8000, 0x7FFF, 0x8001), a carry into
    # the exponent (0x3F7FFFFF rounds to 1.0), fp32 subnormals and zeros.
    bits[0, :8] = (bits[0, :8] & ~0xFFFF) | 0x8000
    bits[1, :8] = (bits[1, :8] & ~0xFFFF) | 0x7FFF
    bits[2, :8] = (bits[2, :8] & ~0xFFFF) | 0x8001
    bits[3, 0] = 0x3F7FFFFF
    x[4, :4] = torch.tensor([1e-40, -3e-39, 0.0, -0.0])
    return x


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_round_bf16_pair_is_the_pair_of_the_bf16_cast(fmt):
    # fp8_tensor_pair_delayed_direct(g, round_bf16=True) on fp32 g against the same on g's bf16
    # cast, each on its own history rows: a first call on empty rows (the amax pass), then calls
    # scaled by the history (the 4x call saturates); equal codes, scales and rows after each.
    from lowbit.kernels.pair_quantize_op import fp8_tensor_pair_delayed_direct

    hist, ref_hist = torch.zeros(2, 5, device=DEV), torch.zeros(2, 5, device=DEV)
    for step, mag in enumerate((1.0, 4.0, 0.25)):
        g = (_gradient_like(70, 131, step) * mag).to(DEV)
        amax = hist[0].max().cpu() if step else None  # delayed scaling's choice for this call
        got = fp8_tensor_pair_delayed_direct(g, fmt, hist[0], hist[1], round_bf16=True)
        ref = fp8_tensor_pair_delayed_direct(g.to(torch.bfloat16), fmt, ref_hist[0], ref_hist[1])
        assert torch.equal(hist, ref_hist), step
        for a, b in zip(got, ref):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                               b.view(torch.uint8) if b.element_size() == 1 else b), step
        # And the reference quantizer (lowbit.quant) on the bf16 cast, X and X^T.
        g16 = g.to(torch.bfloat16).cpu()
        for codes, scale, x in ((got[0], got[1], g16), (got[2], got[3], g16.t())):
            q = quantize(x, QuantSpec(fmt), amax=amax)
            assert torch.equal(codes.cpu().view(torch.uint8), q.data.view(torch.uint8)), step
            assert torch.equal(scale.cpu().reshape(()), q.scale.reshape(())), step
    with pytest.raises(ValueError, match="round_bf16 reads an fp32 input"):
        fp8_tensor_pair_delayed_direct(g.to(torch.bfloat16), fmt, hist[0], hist[1], round_bf16=True)


def test_round_bf16_pair_of_a_nan_gradient_is_all_nan():
    from lowbit.kernels.pair_quantize_op import fp8_tensor_pair_delayed_direct

    g = _gradient_like(40, 64, 3).to(DEV)
    g[5, 7] = float("nan")
    hist = torch.zeros(2, 4, device=DEV)
    d, s, d_t, s_t = fp8_tensor_pair_delayed_direct(g, "fp8_e5m2", hist[0], hist[1], round_bf16=True)
    assert d.float().isnan().all() and d_t.float().isnan().all() and s.isnan() and hist[:, 0].isnan().all()


class _Residual(nn.Module):
    """An fp32 residual stream with a bf16-autocast layer writing into it, as in a Llama block
    (`alone`: the layer's output only widened to fp32, so its fp32 gradient feeds only the cast)."""

    def __init__(self, bias: bool, alone: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(64))
        self.proj = nn.Linear(64, 64, bias=bias)
        self.alone = alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.scale  # fp32 under autocast
        if self.alone:
            return self.proj(h).float() * 2.0
        return h + self.proj(h)


@pytest.fixture
def uncached():
    # The tests below count the pass's rewrites, so the pass must run: a graph compiled before (in
    # an earlier test or an earlier run, whose Inductor cache persists on disk) would be loaded from
    # the FX graph or AOT autograd cache, already folded, without running it.
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


def _train(model: nn.Module, steps: int = 3) -> list[tuple[str, torch.Tensor]]:
    # The output's gradient is given (the backward graph's input): computed inside the graph, the
    # unfolded cast could be fused into its producer, which Inductor may compute in another order.
    compiled = torch.compile(model)
    out = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(2, 48, 64, generator=g).to(DEV) * (step + 1)
        gy = torch.randn(2, 48, 64, generator=g).to(DEV)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            y = compiled(x)
        y.backward(gy)
        out += [(f"step {step} {name}", t.detach().clone()) for name, t in (
            ("y", y), ("dW", model.proj.weight.grad), ("dscale", model.scale.grad),
            ("history", model.proj.amax_history))]
        model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize(("bias", "alone"), [(False, False), (True, False), (False, True)])
def test_compiled_training_is_the_same_with_the_cast_folded(bias, alone, monkeypatch, uncached):
    # The pass rewrites the layer's dY quantizer (no bias: the cast feeds only it), and the compiled
    # steps give the unfolded graph's outputs, gradients and histories bit for bit. With a bias
    # its gradient also reads the bf16 dY, so the cast stays and nothing is rewritten; nor where
    # the fp32 gradient is computed only for the cast (`alone`: 2 * gy, cast to bf16 in one pass).
    torch.manual_seed(0)
    model = _Residual(bias, alone)
    convert_model(model, "fp8_delayed")
    model = model.to(DEV)
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    monkeypatch.setattr(gcf, "ENABLED", False)
    ref = _train(twin)
    torch._dynamo.reset()
    monkeypatch.setattr(gcf, "ENABLED", True)
    before = gcf.FOLDED[0]
    got = _train(model)
    assert gcf.FOLDED[0] - before == (0 if bias or alone else 1)
    for (name, a), (_, b) in zip(got, ref):
        assert torch.equal(a, b), f"{name}: {(a != b).sum().item()} of {a.numel()} differ"


def test_fold_env_knob_accepts_only_0_or_1():
    bad = import_with_env("lowbit.nn.gradient_cast_fold", "LOWBIT_FOLD_GRAD_CAST", "yes")
    assert bad.returncode != 0 and "LOWBIT_FOLD_GRAD_CAST='yes'; valid choices: 0, 1" in bad.stderr
    off = import_with_env("lowbit.nn.gradient_cast_fold", "LOWBIT_FOLD_GRAD_CAST", "0",
                          "import lowbit.nn.gradient_cast_fold as m; assert not m.ENABLED")
    assert off.returncode == 0, off.stderr
    on = import_with_env("lowbit.nn.gradient_cast_fold", "LOWBIT_FOLD_GRAD_CAST", None,
                         "import lowbit.nn.gradient_cast_fold as m; assert m.ENABLED")
    assert on.returncode == 0, on.stderr


def test_the_cast_is_folded_twice_per_llama_block(uncached):
    # In a compiled Llama with its loss, as the trainer runs it: each block's output projection and
    # down projection write into the fp32 residual stream, so both dY quantizers are rewritten.
    from lowbit.nn.llama import Llama, LlamaConfig
    from lowbit.trainer.loss import LanguageModelLoss

    torch.manual_seed(0)
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32, vocab_size=128)
    model = Llama(cfg)
    convert_model(model, "fp8_delayed")
    step = torch.compile(LanguageModelLoss(model.to(DEV)))
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1)).to(DEV)
    torch._dynamo.reset()
    before = gcf.FOLDED[0]
    with torch.autocast(DEV, dtype=torch.bfloat16):
        loss = step(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert gcf.FOLDED[0] - before == 2 * cfg.n_layers


def test_pass_chains_after_a_pass_already_set_and_keys_the_cache_on_it():
    # A pass set before install runs first; the cache key carries its uuid, and a plain callable
    # (no uuid) turns Inductor's caching off rather than being keyed on nothing.
    seen = []

    class Before(gcf.CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            seen.append(len(graph.nodes))

        def uuid(self) -> str:
            return "before-v1"

    chained = gcf._FoldPass(Before())
    graph = torch.fx.symbolic_trace(lambda x: x + 1).graph
    chained(graph)
    assert seen == [len(graph.nodes)]
    assert chained.uuid()[1:] == (gcf.ENABLED, gcf.norm_pair_fold.ENABLED, "before-v1")
    assert gcf._FoldPass(None).uuid() is not None
    assert gcf._FoldPass(lambda graph: None).uuid() is None
