"""The AdamW step that writes the fp8 delayed-scaling pair of each updated weight
(lowbit.kernels.adamw_pair): the update bit for bit against lowbit.optim.adamw.adamw_math and close
to torch's own AdamW, the codes, scales and history rows against lowbit.quant (delayed scaling's
AmaxHistory and quantize) on the updated weight.

Runs in the Triton interpreter on the CPU (small, ragged shapes), on CUDA when there is one."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from lowbit.optim.adamw import adam_scalars, adamw_math  # noqa: E402
from lowbit.quant.gemm import AmaxHistory  # noqa: E402
from lowbit.quant.quantize import QuantSpec, quantize  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = ["cuda"] if CUDA else ["cpu"]


def _adamw_pair():
    from lowbit.kernels import adamw_pair

    return adamw_pair


def _case(shape, dev, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g).mul_(0.02)
    grad = torch.randn(shape, generator=g).mul_(0.5)
    return p.to(dev), grad.to(dev)


def _torch_adamw(p, grads, hp, grad_scale=None):
    # torch's AdamW (fused where the device has it) over the same gradients.
    q = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([q], lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps,
                            weight_decay=hp.weight_decay, foreach=False)
    for gr in grads:
        q.grad = gr.clone() if grad_scale is None else gr / grad_scale
        opt.step()
    st = opt.state[q]
    return q.detach(), st["exp_avg"], st["exp_avg_sq"]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("shape", [(64, 64), (70, 130), (8, 200)])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_steps_match_torch_adamw_and_the_delayed_pair(dev, shape, fmt):
    ap = _adamw_pair()
    p, _ = _case(shape, dev, 0)
    h = 4
    hist = torch.zeros(6, h, device=dev)
    ha, hb = hist[3], hist[5]
    w, m, v = p.clone(), torch.zeros_like(p), torch.zeros_like(p)
    pair = ap.WeightPair.empty(w, fmt)
    table = ap.pair_table([(w, pair, ha, hb)])
    ref_hist = torch.zeros(h, device=dev)
    grads, steps = [], 3
    for step in range(1, steps + 1):
        _, gr = _case(shape, dev, step)
        grads.append(gr)
        hp = ap.AdamWScalars(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step)
        before = ref_hist.clone()
        s = adam_scalars(hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, hp.step)
        want = adamw_math(w, gr, m, v, s)
        ap.launch_step(w, gr, m, v, None, pair, ha, fmt, hp)
        for got, ref_t in zip((w, m, v), want):
            assert torch.equal(got, ref_t), step
        ap.launch_finish(table, h, fmt)
        # Reference: the pair of the updated weight under the history as it was (its max, or the
        # weight's own amax while it held only zeros), then the weight's amax recorded.
        ref = AmaxHistory(before)
        amax = ref.scale_amax(w.abs().max())
        q = quantize(w, QuantSpec(fmt, "tensor"), amax=amax)
        q_t = quantize(w.t().contiguous(), QuantSpec(fmt, "tensor"), amax=amax)
        assert torch.equal(pair.codes.view(torch.uint8), q.data.view(torch.uint8)), step
        assert torch.equal(pair.codes_t.view(torch.uint8), q_t.data.view(torch.uint8)), step
        assert torch.equal(pair.scale.reshape(()), q.scale.reshape(())), step
        assert torch.equal(pair.scale_t.reshape(()), q.scale.reshape(())), step
        ref.record(w.abs().max())
        ref_hist = ref.row
        assert torch.equal(ha, ref_hist) and torch.equal(hb, ref_hist), step
        assert pair.rec.item() == 0
    tw, tm, tv = _torch_adamw(p, grads, hp)
    torch.testing.assert_close(w, tw, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, tm, rtol=1e-6, atol=1e-7)  # torch lerps m: a rounding apart
    torch.testing.assert_close(v, tv, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("dev", DEVICES)
def test_grad_scale_divides_the_gradient(dev):
    ap = _adamw_pair()
    p, gr = _case((40, 72), dev, 5)
    pair = ap.WeightPair.empty(p, "fp8_e4m3")
    hist = torch.zeros(2, 8, device=dev)
    hp = ap.AdamWScalars(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.0, step=1)
    w, m, v = p.clone(), torch.zeros_like(p), torch.zeros_like(p)
    gs = torch.tensor([4.0], device=dev)
    want = adamw_math(w, gr / gs, m, v, adam_scalars(hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, 1))
    ap.launch_step(w, gr, m, v, gs, pair, hist[0], "fp8_e4m3", hp)
    for got, ref_t in zip((w, m, v), want):
        assert torch.equal(got, ref_t)
    tw, tm, tv = _torch_adamw(p, [gr], hp, grad_scale=4.0)
    torch.testing.assert_close(m, tm, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(w, tw, rtol=1e-6, atol=1e-7)
    # without the scale the moments would be 4x larger
    assert not torch.allclose(m, (1 - hp.beta1) * gr)


@pytest.mark.parametrize("dev", DEVICES)
def test_only_weights_with_empty_histories_are_redone(dev):
    # Two weights in one table: one with a history (scaled by its max), one without (its own amax).
    ap = _adamw_pair()
    fmt = "fp8_e4m3"
    hp = ap.AdamWScalars(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, step=1)
    a, ga = _case((96, 64), dev, 7)
    b, gb = _case((64, 160), dev, 8)
    ha = torch.zeros(2, 4, device=dev)
    hb = torch.zeros(2, 4, device=dev)
    ha[:, 1] = 0.125  # a stale, larger amax: a's scale comes from it, not from a's own
    pa, pb = ap.WeightPair.empty(a, fmt), ap.WeightPair.empty(b, fmt)
    table = ap.pair_table([(a, pa, ha[0], ha[1]), (b, pb, hb[0], hb[1])])
    for w, gr, pr, h in ((a, ga, pa, ha), (b, gb, pb, hb)):
        ap.launch_step(w, gr, torch.zeros_like(w), torch.zeros_like(w), None, pr, h[0], fmt, hp)
    ap.launch_finish(table, 4, fmt)
    qa = quantize(a, QuantSpec(fmt, "tensor"), amax=torch.tensor(0.125, device=dev))
    qb = quantize(b, QuantSpec(fmt, "tensor"))
    assert torch.equal(pa.codes.view(torch.uint8), qa.data.view(torch.uint8))
    assert torch.equal(pb.codes.view(torch.uint8), qb.data.view(torch.uint8))
    assert torch.equal(pb.scale.reshape(()), qb.scale.reshape(()))
    zero, stale = torch.zeros((), device=dev), torch.tensor(0.125, device=dev)
    assert torch.equal(ha[0], torch.stack([a.abs().max(), zero, stale, zero]))
    assert torch.equal(hb[1, 0], b.abs().max())


@pytest.mark.parametrize("dev", DEVICES)
def test_nan_weight_gives_nan_scale_and_history(dev):
    ap = _adamw_pair()
    p, gr = _case((64, 64), dev, 9)
    gr[3, 5] = float("nan")
    pair = ap.WeightPair.empty(p, "fp8_e4m3")
    hist = torch.full((2, 4), 0.5, device=dev)
    table = ap.pair_table([(p, pair, hist[0], hist[1])])
    hp = ap.AdamWScalars(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, step=1)
    ap.launch_step(p, gr, torch.zeros_like(p), torch.zeros_like(p), None, pair, hist[0], "fp8_e4m3", hp)
    ap.launch_finish(table, 4, "fp8_e4m3")
    assert torch.isnan(p[3, 5]) and torch.isnan(hist[0, 0]) and torch.isnan(hist[1, 0])
    q = quantize(p, QuantSpec("fp8_e4m3", "tensor"), amax=torch.tensor(0.5, device=dev))
    assert torch.equal(pair.codes.view(torch.uint8), q.data.view(torch.uint8))


def test_rejects_a_format_without_a_pair():
    ap = _adamw_pair()
    with pytest.raises(ValueError, match="fp8_e4m3"):
        ap.WeightPair.empty(torch.zeros(4, 4), "int8")
