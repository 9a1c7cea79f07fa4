"""Our optimizers inside the real trainer: DeepSpeed ZeRO-2 client optimizer, DDP Shampoo resume."""

from __future__ import annotations

import pytest
from conftest import launch

pytestmark = pytest.mark.slow


def test_adamw4bit_as_deepspeed_zero2_client_optimizer(tmp_path):
    # ZeRO hands the optimizer flat 1-D fp32 partitions: the 4-bit states go block-wise there.
    s = launch(
        2,
        [
            f"out_dir={tmp_path}",
            "run_name=z",
            "dist=deepspeed",
            "dist.zero_stage=2",
            "optim=adamw4bit",
            "optim.min_quant_numel=1024",
            "train.steps=6",
        ],
    )
    losses = [v for _, v in s["train_losses"]]
    assert s["dist"] == "deepspeed" and s["world"] == 2
    assert losses[-1] < losses[0]


def test_ddp_shampoo4bit_per_rank_state_resumes_exactly(tmp_path):
    common = [
        f"out_dir={tmp_path}",
        "dist=ddp",
        "optim=shampoo4bit",
        "optim.max_preconditioner_dim=32",
        "optim.inverse_every=2",
        "train.steps=6",
    ]
    full = launch(2, [*common, "run_name=full", "checkpoint.every=0"])
    launch(2, [*common, "run_name=split", "train.stop_after=3", "checkpoint.every=3"])
    ckpt = next((tmp_path / "split" / "checkpoints").iterdir())
    assert (ckpt / "optimizer.rank0.pt").exists() and (ckpt / "optimizer.rank1.pt").exists()
    resumed = launch(2, [*common, "run_name=split"])
    assert resumed["step"] == 6
    for (s1, l1), (s2, l2) in zip(full["train_losses"], resumed["train_losses"]):
        assert s1 == s2
        assert l2 == l1  # bitwise resume on CPU: every block's statistics came back on its owner
