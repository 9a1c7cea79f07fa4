"""Gradient clipping folded into torch's fused AdamW (lowbit/trainer/grad_clip.py) against
torch.nn.utils.clip_grad_norm_ followed by the same optimizer's step."""

from __future__ import annotations

import pytest
import torch

from lowbit.trainer.grad_clip import clip_and_step, folds_clipping

# torch's fused AdamW has a CPU kernel and a CUDA one; both take grad_scale.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _twins(fused: bool, dev: str = "cpu") -> tuple[list, list, torch.optim.Optimizer, torch.optim.Optimizer]:
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 33), (33,), (7, 5, 3)]
    a = [torch.nn.Parameter(torch.randn(s, generator=g).to(dev)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    return a, b, torch.optim.AdamW(a, **kw), torch.optim.AdamW(b, **kw)


def _set_grads(a: list, b: list, mult: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p, q in zip(a, b):
        grad = (torch.randn(p.shape, generator=g) * mult).to(p.device)
        p.grad, q.grad = grad.clone(), grad.clone()


# Adam's step hardly changes when every gradient is scaled alike, so the steps differ in size:
# clipped, under the limit, clipped harder. That is where clipping shows in the moments.
MULTS = (10.0, 1e-3, 50.0)


@pytest.mark.parametrize("dev", DEVICES)
def test_folded_clipping_matches_clip_grad_norm_then_step(dev):
    ref, ours, opt_ref, opt = _twins(fused=True, dev=dev)
    assert folds_clipping(opt)
    for i, mult in enumerate(MULTS):
        _set_grads(ref, ours, mult, seed=i)
        norm_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt_ref.step()
        norm = clip_and_step(opt, ours, 1.0)
        torch.testing.assert_close(norm, norm_ref)
        for p, q in zip(ref, ours):
            # One rounding apart: g / s against g * (1 / s).
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
    # The hook is handed back: a GradScaler could use it next.
    assert getattr(opt, "grad_scale", None) is None and folds_clipping(opt)


@pytest.mark.parametrize("dev", DEVICES)
def test_folded_clipping_really_clips(dev):
    ref, ours, opt_ref, opt = _twins(fused=True, dev=dev)
    for i, mult in enumerate(MULTS):
        _set_grads(ref, ours, mult, seed=i)
        opt_ref.step()  # unclipped
        clip_and_step(opt, ours, 1.0)
    assert max((p - q).abs().max().item() for p, q in zip(ref, ours)) > 1e-3


def test_no_clipping_leaves_the_step_alone():
    ref, ours, opt_ref, opt = _twins(fused=True)
    _set_grads(ref, ours, 10.0, seed=0)
    opt_ref.step()
    norm = clip_and_step(opt, ours, 0.0)
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours]))
    torch.testing.assert_close(norm, expected)
    for p, q in zip(ref, ours):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_other_optimizers_clip_the_gradients_themselves():
    ref, ours, opt_ref, opt = _twins(fused=False)
    assert not folds_clipping(opt)
    for i, mult in enumerate(MULTS):
        _set_grads(ref, ours, mult, seed=i)
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt_ref.step()
        clip_and_step(opt, ours, 1.0)
    for p, q in zip(ref, ours):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    sgd = torch.optim.SGD(ours, lr=0.1)
    assert not folds_clipping(sgd)
    fused = torch.optim.AdamW(ours, lr=0.1, fused=True)
    fused.grad_scale = torch.tensor(2.0)  # a GradScaler's: not ours to take
    assert not folds_clipping(fused)
