"""BF16 rounding for master-free updates: nearest, stochastic (hash stream), Kahan."""

import ml_dtypes
import numpy as np
import torch

from lowbit.optim.rounding import (
    lowbias32,
    lowbias32_int,
    random_bits,
    round_bf16_nearest,
    round_bf16_stochastic,
    write_param_,
)
from lowbit.quant.rounding import hash_bits


def test_optimizer_hash_stream_is_the_quantizers():
    # One lowbias32 stream for quantizers, optimizers and kernels: the same bits for the same seed.
    assert torch.equal(random_bits(12345, 4096), hash_bits(12345, 4096))


def test_lowbias32_matches_int_version():
    xs = [0, 1, 2, 12345, 2**31, 2**32 - 1]
    got = lowbias32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [lowbias32_int(x) for x in xs]
    assert all(0 <= g < 2**32 for g in got)
    assert len(set(random_bits(7, 1000).tolist())) == 1000


def test_nearest_matches_ml_dtypes_rne():
    torch.manual_seed(0)
    x = torch.randn(100_000) * torch.logspace(-20, 20, 100_000)
    x[:3] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8)])  # exact ties
    ref = x.numpy().astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(round_bf16_nearest(x).numpy(), ref)
    assert torch.equal(round_bf16_nearest(x).bfloat16().float(), round_bf16_nearest(x))


def test_stochastic_rounding_is_unbiased_and_on_grid():
    x = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1 to the next BF16 value
    r = round_bf16_stochastic(x, seed=3)
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    frac_up = (r > 1).float().mean().item()
    assert abs(frac_up - 0.125) < 0.005  # 2**-10 / 2**-7
    assert torch.equal(r, round_bf16_stochastic(x, seed=3))
    assert not torch.equal(r, round_bf16_stochastic(x, seed=4))


def test_small_updates_survive_sr_and_kahan_but_not_nearest():
    # 1000 steps of +1e-4 on weights of 1.0: each step is below half a BF16 ulp (2**-8 = 0.0039).
    n = 4096
    p_near = torch.ones(n, dtype=torch.bfloat16)
    p_sr = p_near.clone()
    p_kahan = p_near.clone()
    comp = torch.zeros(n, dtype=torch.bfloat16)
    for step in range(1000):
        for p, mode in ((p_near, "nearest"), (p_sr, "stochastic"), (p_kahan, "kahan")):
            old = p.float()
            c = comp if mode == "kahan" else None
            write_param_(p, old + 1e-4, mode, seed=step, comp=c, old_value=old)
    assert torch.all(p_near == 1.0)  # nearest rounding cancelled every update
    assert abs(p_sr.float().mean().item() - 1.1) < 0.005
    assert (p_kahan.float() - 1.1).abs().max().item() < 0.01
