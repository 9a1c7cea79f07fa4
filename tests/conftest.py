"""Shared test helpers: compose the real Hydra config and run the real trainer in-process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. This must be set before any module
# imports triton (test collection imports lowbit.kernels early), so it lives here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)  # tests never reach the network


def import_with_env(module: str, var: str, value: str | None, check: str = "") -> subprocess.CompletedProcess:
    """`import module` (then the statement `check`) in a fresh interpreter with var=value set (None:
    var unset)."""
    env = {k: v for k, v in os.environ.items() if k != var}
    if value is not None:
        env[var] = value
    code = f"import {module}" + (f"; {check}" if check else "")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lowbit.trainer.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


# A run small enough for a unit test: ~0.2M params, a few hundred KB of stdlib text.
SMALL = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.warmup_steps=2",
    "train.eval_every=5",
    "train.eval_batches=2",
    "train.log_every=1",
    "data.max_bytes=300000",
    "logger=console",
    "logger.progress=false",
]


@pytest.fixture
def small_run(tmp_path):
    """Return run(extra_overrides) -> summary, writing into tmp_path."""
    from lowbit.trainer.run import run

    def _run(extra: list[str]) -> dict:
        # Each run as in a fresh process: compiled graphs of earlier runs (other model instances)
        # would otherwise count towards Dynamo's recompile limit (an fp8_delayed model's graph is
        # specialized on its layers' history keys), and past it a run falls back to eager code.
        torch._dynamo.reset()
        return run(compose([*SMALL, f"out_dir={tmp_path}", *extra]))

    return _run


@pytest.fixture
def graph_ops_on(monkeypatch):
    """QuantLinear's graph ops switched on (they are opt-in: LOWBIT_GRAPH_OPS, or the trainer's
    choice under CUDA graphs). Under the interpreter (CPU) they register as opaque custom ops, on
    CUDA as triton_ops."""
    from lowbit.nn import quant_linear_graph

    monkeypatch.setattr(quant_linear_graph, "MODE", "recorded")


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread: on tiny tensors (and small LAPACK calls) extra OpenMP
    threads only add barrier waits, which stall for up to a second per op on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def launch(nproc: int, overrides: list[str], timeout: int = 600) -> dict:
    """Run train.py (SMALL + overrides) under torchrun with `nproc` CPU processes, or plainly when
    nproc is 1 and no dist= is given; return the run's summary.json."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    if not any(o.startswith("train.device=") for o in overrides):
        # CPU processes on a GPU machine too: two ranks on one GPU are refused (pick_device).
        overrides = [*overrides, "train.device=cpu"]
    if nproc == 1 and not any(o.startswith("dist=") for o in overrides):
        cmd = [sys.executable, str(ROOT / "train.py"), *SMALL, *overrides]
    else:
        with socket.socket() as sock:  # an explicit free port: torchrun's --master_port=0 can hang
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            str(ROOT / "train.py"),
            *SMALL,
            *overrides,
        ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("out_dir="))
    run_name = next(o.split("=", 1)[1] for o in overrides if o.startswith("run_name="))
    return json.loads(Path(out_dir, run_name, "summary.json").read_text())
