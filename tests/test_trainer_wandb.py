"""W&B runs offline (no API key) and its run file holds the metrics the trainer logged."""

from __future__ import annotations

import time
from pathlib import Path

from wandb_records import history, record_kinds


def test_offline_wandb_files_hold_logged_metrics(small_run, tmp_path):
    s = small_run(
        ["train.steps=10", "run_name=w", "logger=both", "logger.progress=false", "logger.tags=[ci,cpu]"]
    )
    files = list(Path(tmp_path, "w", "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    # wandb.finish() can return before wandb-core has flushed the offline file (seen under load):
    # wait for the run's final "exit" record.
    deadline = time.time() + 60
    while "exit" not in record_kinds(files[0]) and time.time() < deadline:
        time.sleep(0.5)
    rows = history(files[0])
    train = {r["_step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(train) == list(range(1, 11)), (files[0].stat().st_size, record_kinds(files[0]))
    assert train[10] == s["train_losses"][-1][1]
    vals = [r["val/loss"] for r in rows if "val/loss" in r]
    assert vals[-1] == s["final_val_loss"]
    assert all("perf/tokens_per_s" in r for r in rows if "train/loss" in r)
