"""Our optimizers inside the real trainer: DeepSpeed ZeRO-2 client optimizer, DDP Shampoo resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SMALL

pytestmark = pytest.mark.slow


def _launch(nproc: int, overrides: list[str], timeout: int = 300) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    with socket.socket() as sock:  # an explicit free port: torchrun's --master_port=0 hung here
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={port}", str(ROOT / "train.py"), *SMALL, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("out_dir="))
    run_name = next(o.split("=", 1)[1] for o in overrides if o.startswith("run_name="))
    return json.loads(Path(out_dir, run_name, "summary.json").read_text())


def test_adamw4bit_as_deepspeed_zero2_client_optimizer(tmp_path):
    # ZeRO hands the optimizer flat 1-D fp32 partitions: the 4-bit states go block-wise there.
    s = _launch(2, [f"out_dir={tmp_path}", "run_name=z", "dist=deepspeed", "dist.zero_stage=2",
                    "optim=adamw4bit", "optim.min_quant_numel=1024", "train.steps=6"])
    losses = [v for _, v in s["train_losses"]]
    assert s["dist"] == "deepspeed" and s["world"] == 2
    assert losses[-1] < losses[0]


def test_ddp_shampoo4bit_per_rank_state_resumes_exactly(tmp_path):
    common = [f"out_dir={tmp_path}", "dist=ddp", "optim=shampoo4bit", "optim.max_preconditioner_dim=32",
              "optim.inverse_every=2", "train.steps=6"]
    full = _launch(2, [*common, "run_name=full", "checkpoint.every=0"])
    _launch(2, [*common, "run_name=split", "train.stop_after=3", "checkpoint.every=3"])
    ckpt = next((tmp_path / "split" / "checkpoints").iterdir())
    assert (ckpt / "optimizer.rank0.pt").exists() and (ckpt / "optimizer.rank1.pt").exists()
    resumed = _launch(2, [*common, "run_name=split"])
    assert resumed["step"] == 6
    for (s1, l1), (s2, l2) in zip(full["train_losses"], resumed["train_losses"]):
        assert s1 == s2
        assert l2 == l1  # bitwise resume on CPU: every block's statistics came back on its owner
