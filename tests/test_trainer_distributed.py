"""Real multi-process runs through torchrun: gloo DDP and DeepSpeed's ZeRO engine on CPU."""

from __future__ import annotations

import os

import pytest
from conftest import launch

pytestmark = pytest.mark.slow


def test_ddp_two_ranks_match_one_rank_with_same_global_batch(tmp_path):
    common = ["train.steps=6", f"out_dir={tmp_path}"]
    one = launch(1, [*common, "run_name=one", "train.micro_batch_size=8"])
    two = launch(2, [*common, "run_name=two", "dist=ddp", "train.micro_batch_size=4"])
    assert two["world"] == 2 and one["world"] == 1
    for (s1, l1), (s2, l2) in zip(one["train_losses"], two["train_losses"]):
        assert s1 == s2
        assert l2 == pytest.approx(l1, rel=2e-4, abs=2e-4)
    assert two["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=2e-4)


def test_deepspeed_zero2_trains_and_resumes(tmp_path):
    common = [f"out_dir={tmp_path}", "dist=deepspeed", "dist.zero_stage=2", "train.micro_batch_size=4"]
    full = launch(2, [*common, "run_name=full", "train.steps=8", "checkpoint.every=0"])
    launch(2, [*common, "run_name=split", "train.steps=8", "train.stop_after=4"])
    assert (tmp_path / "split" / "checkpoints" / "step_00000004" / "deepspeed").is_dir()
    resumed = launch(2, [*common, "run_name=split", "train.steps=8"])
    assert resumed["step"] == 8 and resumed["dist"] == "deepspeed"
    losses = [v for _, v in full["train_losses"]]
    assert losses[-1] < losses[0]
    # ZeRO-2 restores the fp32 partitions and optimizer state exactly, so the resumed steps
    # reproduce the uninterrupted run to fp tolerance.
    for (s1, l1), (s2, l2) in zip(full["train_losses"], resumed["train_losses"]):
        assert s1 == s2
        assert l2 == pytest.approx(l1, rel=1e-5, abs=1e-5)


def test_compiled_ddp_matches_eager_ddp(tmp_path):
    # torch.compile of the DDP wrapper around model + loss (lowbit.trainer.loss): dynamo splits the
    # graph at DDP's buckets; the losses must be the eager run's up to fused-kernel rounding.
    # One block: compiling is most of the time, and the tiny model's parameters fill one DDP bucket
    # either way.
    common = ["train.steps=4", f"out_dir={tmp_path}", "dist=ddp", "train.micro_batch_size=4",
              "model.n_layers=1"]
    eager = launch(2, [*common, "run_name=eager"])
    compiled = launch(2, [*common, "run_name=compiled", "train.compile=true"])
    assert [s for s, _ in compiled["train_losses"]] == [1, 2, 3, 4]
    for (_, l1), (_, l2) in zip(eager["train_losses"], compiled["train_losses"]):
        assert l2 == pytest.approx(l1, rel=1e-4, abs=1e-4)
    assert compiled["final_val_loss"] == pytest.approx(eager["final_val_loss"], rel=1e-4)


def test_deepspeed_cpu_run_asks_for_the_cpu_accelerator_or_refuses(monkeypatch):
    # A CPU DeepSpeed run takes DeepSpeed's CPU accelerator (on a GPU machine its own choice would
    # be CUDA's) without leaving DS_ACCELERATOR behind; if DeepSpeed chose another accelerator
    # earlier in the process, the run refuses instead of running on the wrong device.
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import real_accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    from lowbit.trainer.engines import _import_deepspeed_on_cpu

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(real_accelerator, "ds_accelerator", None)  # as in a fresh process
    _import_deepspeed_on_cpu()
    assert real_accelerator.get_accelerator().device_name() == "cpu"
    assert "DS_ACCELERATOR" not in os.environ
    monkeypatch.setattr(real_accelerator, "ds_accelerator", CUDA_Accelerator())  # chosen before
    with pytest.raises(RuntimeError, match="already uses its 'cuda' accelerator"):
        _import_deepspeed_on_cpu()
