"""The residual add + RMSNorm fused with the shared-input fp8_delayed pair (lowbit.nn.norm_pair_fold).

The fused kernels (Triton's interpreter on CPU, CUDA where there is one) against the torch steps
they replace followed by the pair's own path: the residual bit for bit, rstd within an ulp of
1 / sqrt(mean + eps) (two ulps: the interpreter's square root and torch's CUDA mean round
differently), and the codes, scales and amax histories bit for bit those of the pair quantizing the
y that rstd gives. Then the Inductor rewrite in a compiled Llama: which norms it takes, and that
training with it follows training without it.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.quantize import interpret
from lowbit.nn import norm_pair_fold as npf
from lowbit.nn import quant_shared_input as qsi
from lowbit.nn.convert import convert_model
from lowbit.nn.quant_linear_traced import _delayed_pair

# The fused kernels run on CUDA, or on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1).
KERNEL_DEVICES = (["cpu"] if interpret() else []) + (["cuda"] if torch.cuda.is_available() else [])
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(m: int, d: int, seed: int, exact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if exact:  # multiples of 1/8: every sum of squares is exact, in any order
        a = torch.randint(-16, 17, (m, d), generator=g) / 8
        b = torch.randint(-16, 17, (m, d), generator=g) / 8
    else:
        a = torch.randn(m, d, generator=g) * torch.logspace(-2, 2, d)
        b = torch.randn(m, d, generator=g)
    w = torch.randn(d, generator=g)
    return a.float(), b.to(torch.bfloat16), w


def _codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8).cpu()


@pytest.mark.parametrize("dev", KERNEL_DEVICES)
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize(("m", "d", "exact"), [(37, 96, True), (64, 128, False), (5, 200, False)])
def test_fused_kernels_are_the_norm_then_the_pair(dev, fmt, m, d, exact):
    # Three calls on one history: the first with its rows empty (the gate's amax of y), later ones
    # scaled by the history, the last one saturating (inputs grown 4x).
    a0, b, w = _inputs(m, d, 0, exact)
    hist, ref_hist = torch.zeros(6, 5, device=dev), torch.zeros(6, 5, device=dev)
    for step, mag in enumerate((1.0, 1.5, 4.0)):
        a = (a0 * mag).to(dev)
        s, rstd, d_x, sc, d_t, sc_t = npf.fused(a, b.to(dev), w.to(dev), 1e-5, hist, fmt)
        ref_s, ref_rstd, ref_y = npf.reference(a, b.to(dev), w.to(dev), 1e-5)
        assert torch.equal(s, ref_s), step
        # Within two ulps: the interpreter's square root (numpy's, in float64, then rounded) and
        # torch's mean on CUDA (the sum times 1/D) each round differently from the kernel's.
        torch.testing.assert_close(rstd, ref_rstd, rtol=2.0**-21, atol=0)
        # The pair's own path on the y of the kernel's rstd.
        y = ((s * rstd) * w.to(dev)).to(torch.bfloat16)
        if exact and torch.equal(rstd, ref_rstd):
            assert torch.equal(y, ref_y)
        q, q_sc, q_t, q_sc_t = _delayed_pair(y, ref_hist, fmt, fmt, qsi.X_ROW, qsi.XT_ROW)
        assert torch.equal(_codes(d_x), _codes(q)), step
        assert torch.equal(_codes(d_t), _codes(q_t)), step
        assert sc.item() == q_sc.item() and sc_t.item() == q_sc_t.item(), step
        assert torch.equal(hist, ref_hist), step
    assert hist[qsi.X_ROW, :3].gt(0).all() and hist[qsi.X_ROW, 3:].eq(0).all()
    assert d_x.dtype == q.dtype and d_t.shape == (d, m)


@pytest.mark.parametrize("dev", KERNEL_DEVICES)
def test_fused_kernels_propagate_a_nan(dev):
    a, b, w = (t.to(dev) for t in _inputs(8, 64, 1, False))
    a[3, 7] = float("nan")
    hist = torch.zeros(6, 4, device=dev)
    hist[:, 0] = 2.0
    s, rstd, d_x, sc, d_t, sc_t = npf.fused(a, b, w, 1e-5, hist, "fp8_e4m3")
    assert hist[qsi.X_ROW, 0].isnan() and hist[qsi.XT_ROW, 0].isnan()
    assert rstd[3].isnan() and not rstd[2].isnan()
    assert sc.item() == pytest.approx(2.0 / 448, rel=1e-6)  # from the history, written before the NaN


def _llama(n_layers: int = 2):  # noqa: ANN202
    from lowbit.nn.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(dim=64, n_layers=n_layers, n_heads=2, n_kv_heads=1, max_seq_len=32, vocab_size=128)
    model = Llama(cfg)
    convert_model(model, "fp8_delayed")
    return model, cfg


def _train(model, cfg, dev: str, steps: int = 3) -> list[tuple[float, torch.Tensor]]:  # noqa: ANN001
    from lowbit.trainer.loss import LanguageModelLoss

    model = model.to(dev)
    step = torch.compile(LanguageModelLoss(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1)).to(dev)
    out = []
    for _ in range(steps):
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = step(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((loss.item(), grads))
    return out


@pytest.fixture
def uncached():
    # The rewrite must run, not be loaded already applied from Inductor's caches.
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


@pytest.mark.parametrize("dev", DEVICES)
def test_compiled_llama_fuses_every_norm_after_an_add_and_trains_alike(dev, monkeypatch, uncached):
    # Each block has two norms; the first block's attention norm reads the embedding (no add), and
    # the final norm feeds the LM head, not a pair: 2 * n_layers - 1 rewrites. Training with them
    # follows training without: the norm's y may differ in the last bit where its rstd does.
    model, cfg = _llama(2)
    twin = _llama(2)[0]
    torch._dynamo.reset()
    monkeypatch.setattr(npf, "ENABLED", False)
    ref = _train(twin, cfg, dev)
    torch._dynamo.reset()
    monkeypatch.setattr(npf, "ENABLED", True)
    before = npf.FOLDED[0]
    got = _train(model, cfg, dev)
    assert npf.FOLDED[0] - before == 2 * cfg.n_layers - 1
    for (loss, grads), (ref_loss, ref_grads) in zip(got, ref):
        assert loss == pytest.approx(ref_loss, rel=2e-3)
        cos = torch.nn.functional.cosine_similarity(grads.float(), ref_grads.float(), dim=0)
        assert cos > 0.99
